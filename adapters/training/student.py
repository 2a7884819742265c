"""The student: the base LLM with LoRA, the adapter's audio layer, and the distillation heads.

Audio vectors replace the placeholder embeddings at the positions ``build_prompt`` reserved, the
LLM runs with its ordinary causal mask, and forward hooks read the chosen decoder blocks'
outputs at those positions for the heads (RMSNorm + Linear to the teacher's width, as in VoRA).
The heads (the character CTC head and the audio layer's head too) exist only for training; the exported adapter is LoRA +
audio layer, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.audio_layer import AudioEmbedding
from adapters.training.ctc import CHAR_SLOTS, CHARS
from adapters.training.data import Batch


class DistillHead(nn.Module):
    """Maps student hidden states to the teacher's width; RMSNorm first because the LLM's residual
    stream has a very different (and growing) scale from the teacher's."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class CharHead(nn.Module):
    """Characters (or ``units``: pieces, ``adapters.training.ctc.Units``) from one block's
    audio-position states: RMSNorm + Linear to ``CHAR_SLOTS`` distributions per audio token (blank +
    ``units`` classes), read out as one sequence at ``CHAR_SLOTS`` times the token rate. A linear
    read-out on purpose: what it can spell, the LoRA above can read; the capacity has to be in the
    states, not in the head."""

    def __init__(self, hidden: int, units: int = len(CHARS)) -> None:
        super().__init__()
        self.classes = units + 1
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.proj = nn.Linear(hidden, CHAR_SLOTS * self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden) -> (B, N * CHAR_SLOTS, classes) logits."""
        b, n, _ = x.shape
        return self.proj(self.norm(x)).reshape(b, n * CHAR_SLOTS, self.classes)


@dataclass
class StudentOutput:
    answer_logits: torch.Tensor | None  # (n_answer_tokens, V); None in a truncated stage
    answer_targets: torch.Tensor  # (n_answer_tokens,)
    audio_hidden: dict[int, torch.Tensor]  # student layer -> (B, N, hidden) at audio positions
    audio_mask: torch.Tensor  # (B, N) bool
    audio_tokens: torch.Tensor  # (B,) valid audio positions
    ctc_logits: torch.Tensor | None = None  # (B, N, V) LM-head logits at audio positions
    char_logits: torch.Tensor | None = None  # (B, N * CHAR_SLOTS, 1 + units) character head logits
    frame_pred: torch.Tensor | None = None  # (B, F, d_teacher) the audio head on the audio layer's frames
    frame_mask: torch.Tensor | None = None  # (B, F) bool: valid frames


def decoder_layers(causal_lm: Any) -> nn.ModuleList:
    """The list of decoder blocks of a Llama/Qwen2/Mistral-style model (``model.layers``)."""
    inner = getattr(causal_lm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(causal_lm).__name__} has no model.layers; use a Llama/Qwen2/Mistral-style causal LM")
    return layers


class AuraStudent(nn.Module):
    def __init__(self, peft_model: Any, audio_layer: AudioEmbedding, heads: dict[int, DistillHead],
                 char_head: CharHead | None = None, audio_head: DistillHead | None = None) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.audio_layer = audio_layer
        self.heads = nn.ModuleDict({str(k): v for k, v in heads.items()})
        self.layer_ids = sorted(heads)
        self.char_head = char_head
        self.audio_head = audio_head  # the audio layer's frames -> the teacher's width (audio_distill_weight)

    @property
    def causal_lm(self) -> Any:
        """The transformers model with LoRA layers injected (PEFT's wrapped model)."""
        return self.peft_model.get_base_model()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``trainable_state`` back in place (a checkpoint's, or the best validated step's)."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor, frame_lengths: torch.Tensor,
              audio_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the audio vectors written over each example's audio span.

        One indexed write for the whole batch: a per-example loop costs a GPU two host syncs
        and a few launches per example (``bench/step_ops.py`` counts them)."""
        embeds, n_tok, _ = self._embed(input_ids, features, frame_lengths, audio_starts)
        return embeds, n_tok

    def _embed(self, input_ids: torch.Tensor, features: torch.Tensor, frame_lengths: torch.Tensor,
               audio_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``embed``, and the audio layer's frames before the stacking with their valid counts."""
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        frames = self.audio_layer.frames(features, frame_lengths)
        audio, n_tok = self.audio_layer.tokens(*frames)
        audio = audio.to(embeds.dtype)
        valid = torch.arange(audio.shape[1], device=n_tok.device)[None, :] < n_tok[:, None]  # (B, N)
        rows, cols = valid.nonzero(as_tuple=True)
        return embeds.index_put((rows, audio_starts.to(cols.device)[rows] + cols), audio[rows, cols]), n_tok, frames

    def forward(self, batch: Batch, *, max_layer: int | None = None, ctc_layer: int | None = None,
                char_layer: int | None = None) -> StudentOutput:
        """One pass. ``max_layer`` runs blocks 0..max_layer only (no answer logits then: the LM head
        would read a half-finished residual stream); ``ctc_layer`` adds LM-head logits (after the
        final norm) of that block's output at the audio positions; ``char_layer`` adds the character
        head's logits of that block's output."""
        embeds, n_tok, (frames, frame_counts) = self._embed(batch.input_ids, batch.features, batch.frame_lengths,
                                                            batch.audio_starts)
        attention_mask = batch.attention_mask
        if max_layer is not None:
            # A truncated stage reads only audio positions, and the blocks are causal: nothing after the last audio
            # token of the batch (the rest of the prompt, the transcript) can change them. Dropping those positions
            # is exact and saves a quarter of the blocks' work on the CPU recipe (tests/test_training_stages.py).
            end = int((batch.audio_starts.to(n_tok.device) + n_tok).max())
            embeds, attention_mask = embeds[:, :end], attention_mask[:, :end]
        captured: dict[int, torch.Tensor] = {}
        inner = self.causal_lm.model
        blocks = decoder_layers(self.causal_lm)
        hooks = []
        wanted = set(self.layer_ids) | {k for k in (ctc_layer, char_layer) if k is not None}
        for layer in sorted(wanted):
            def hook(_m: nn.Module, _inp: Any, out: Any, layer: int = layer) -> None:
                captured[layer] = out[0] if isinstance(out, tuple) else out
            hooks.append(blocks[layer].register_forward_hook(hook))
        if max_layer is not None:
            inner.layers = nn.ModuleList(list(blocks)[: max_layer + 1])  # the same modules, fewer of them
        try:
            out = inner(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        finally:
            inner.layers = blocks
            for h in hooks:
                h.remove()
        sel = batch.labels != -100
        # The LM head only where there is an answer token: it is the largest matmul per position.
        logits = self.causal_lm.lm_head(out.last_hidden_state[sel]) if max_layer is None else None
        n_max = int(n_tok.max())
        pos = torch.arange(n_max, device=n_tok.device)[None, :]
        mask = pos < n_tok[:, None]
        # each example's audio span, gathered for the whole batch; zeros past its length
        at = (batch.audio_starts.to(pos.device)[:, None] + pos).clamp(max=embeds.shape[1] - 1)[..., None]
        at_audio: dict[int, torch.Tensor] = {}
        for layer, h in captured.items():
            at_audio[layer] = torch.where(mask[..., None], h.gather(1, at.expand(-1, -1, h.shape[-1])), 0.0)
        ctc_logits = self.causal_lm.lm_head(inner.norm(at_audio[ctc_layer])) if ctc_layer is not None else None
        char_logits = None
        if char_layer is not None:
            assert self.char_head is not None, "char_layer needs the student built with a char_head"
            char_logits = self.char_head(at_audio[char_layer])
        audio_hidden = {k: v for k, v in at_audio.items() if k in self.layer_ids}
        frame_pred = frame_mask = None
        if self.audio_head is not None:
            frame_pred = self.audio_head(frames)
            frame_mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < frame_counts[:, None]
        return StudentOutput(logits, batch.labels[sel], audio_hidden, mask, n_tok, ctc_logits, char_logits,
                             frame_pred, frame_mask)

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], audio_start: int, features: torch.Tensor, num_frames: int,
               *, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
        """Greedy decoding with a KV cache, step for step what the reference engine does."""
        device = next(self.audio_layer.parameters()).device
        ids = torch.tensor([prompt_ids], device=device)
        embeds, _ = self.embed(ids, features[None].to(device), torch.tensor([num_frames], device=device),
                               torch.tensor([audio_start], device=device))
        return greedy_from_embeds(self.peft_model, embeds[0], max_new_tokens=max_new_tokens, eos_ids=eos_ids)


@torch.inference_mode()
def greedy_from_embeds(lm: nn.Module, embeds: torch.Tensor, *, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding of a causal LM from (L, d) prompt embeddings with a KV cache: the trainer's
    held-out WER and the read-out diagnostics decode the way the reference engine does."""
    out = lm(inputs_embeds=embeds[None], use_cache=True)
    tokens: list[int] = []
    while True:
        token = int(torch.argmax(out.logits[0, -1].float()))
        tokens.append(token)
        if token in eos_ids or len(tokens) >= max_new_tokens:
            return tokens
        out = lm(input_ids=torch.tensor([[token]], device=embeds.device), past_key_values=out.past_key_values, use_cache=True)
