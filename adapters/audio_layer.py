"""The AuRA audio embedding layer: log-mel frames -> vectors that sit in the LLM prompt.

A Whisper-style conv stem (so it can be initialised from the teacher's stem, as VoRA does with
its patch embedding), optionally a few *causal* transformer blocks of the teacher's shape
(initialised from its first blocks), frame stacking to cut the token rate, then LayerNorm +
Linear to the LLM width. The same module runs in the trainer and in the server.

Why blocks at all: linear probes showed the words are lost before the LLM's first block: a
conv stem plus a linear map leaves all acoustic modelling to LoRA on a 135M LLM. A block or two
of Whisper's own (about 1.8M parameters each at tiny's width) hands the LLM the teacher's
early representation instead, and stays within the issue's budget of 5% of parameters and of a
request's FLOPs (``python -m bench.audio_layer_cost`` prints both).

Why causal by default: realtime sessions prefill the prompt while the user is still speaking,
which pays off when early audio vectors do not depend on later audio. Causal blocks keep that
(the conv stem looks one mel frame ahead, as before). But Whisper's blocks were trained seeing
the whole clip, and run causally they keep little of it: a linear probe reads Whisper tiny.en's
block 3 at character CER 0.39 on unseen speakers, the same block causal at 0.62, worse than its
block 0 unmasked (``bench/probe_lookahead.py``), and 40 ms of lookahead wins back much of it.
So ``encoder_lookahead`` lets each frame attend k frames (k x 20 ms) ahead. No request waits for
it: a clip's vectors are computed once the clip is whole (a realtime turn's at end of speech, as
before); a realtime prefill while the user speaks re-sends the positions whose vectors moved, the
last (blocks x k) block frames' worth (the final request uses the offline vectors, so answers are the same).
Keys past a clip's end are masked, so right padding stays invisible and batching cannot change
an example's vectors either way.

Why ``encoder_stride``: a Whisper-width block costs ~3.5 MFLOPs per frame, and at the stem's 50 Hz two of them
are 4.8% of a 3 s request's FLOPs but 9.2% of a 10 s one's and 13.5% of a 30 s one's (the LLM reads 12.5 tokens
per second, the blocks 50 frames), past the issue's 5% budget. Averaging ``encoder_stride`` stem frames into one
before the blocks divides their per-frame cost by the stride and their attention by its square; the stacking then
takes ``stack_factor`` block frames, so a token spans ``encoder_stride x stack_factor`` stem frames
(``frames_per_token``). The teacher's weights still initialise the blocks, but Whisper never saw a mean of
frames at positions of another rate: on the CPU A/B such blocks learned slower than at stride 1 (README finding 11).
A mean also forgets the order of the frames it merges (a 60 ms vowel-then-stop and stop-then-vowel average alike);
``encoder_merge: linear`` lays the s frames side by side and maps them to one frame through a learned matrix that
starts as the mean, so training can keep the order in directions the blocks read (~0.3 MFLOPs per stem frame at
tiny's width, whatever the stride). On the CPU A/B it spelled 100 steps sooner than the mean at 80 ms and then
joined its curve; one block at 40 ms beat both within the budget (README finding 12).

Batching must never change an example's output (a request's tokens may not depend on who it
was batched with), so every stage masks what lies beyond each example's length exactly as the
example alone would see zero padding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator
from torch import nn

MAX_ENCODER_LAYERS = 12
MAX_LOOKAHEAD = 250  # 5 s per block: realtime prefill re-sends the positions that far back, so keep it short
MAX_ENCODER_STRIDE = 8
EncoderMerge = Literal["mean", "linear"]  # how encoder_stride stem frames become one block frame
# queries per attention call: bounds a long clip's attention scores to O(chunk x frames) memory
ATTENTION_CHUNK = 512


# keys added to the format after its first adapters; at their field defaults they leave a layer as those adapters' was
LATER_KEYS = frozenset({"encoder_layers", "encoder_heads", "encoder_ffn_dim", "encoder_lookahead", "encoder_stride",
                        "encoder_merge"})


class AudioLayerConfig(BaseModel):
    """The audio layer's shape, as ``aura_config.json`` declares it.

    Serialised, a key added after the format's first adapters is written only where it changes the layer: servers
    refuse keys they do not know (extra="forbid", so a newer adapter is never misread), and an adapter that uses none of
    the newer parts then still loads on an older server, as a rolling upgrade needs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stem: Literal["whisper_conv"] = "whisper_conv"
    n_mels: int = Field(80, ge=1)
    conv_channels: int = Field(384, ge=1)
    stack_factor: int = Field(4, ge=1, le=32)
    hidden_size: int = Field(..., ge=1, description="The LLM's hidden size.")
    encoder_layers: int = Field(0, ge=0, le=MAX_ENCODER_LAYERS,
                                description="Causal transformer blocks (Whisper's shape) between the stem and the stacking.")
    encoder_heads: int = Field(6, ge=1, le=64, description="Attention heads of those blocks; must divide conv_channels.")
    encoder_ffn_dim: int | None = Field(None, ge=1, le=65536,
                                        description="Feed-forward width of those blocks; None = 4 x conv_channels (Whisper's).")
    encoder_lookahead: int = Field(0, ge=0, le=MAX_LOOKAHEAD,
                                   description="Block frames (20 ms x encoder_stride each) a block's frame may attend "
                                               "ahead; 0 = causal.")
    encoder_stride: int = Field(1, ge=1, le=MAX_ENCODER_STRIDE,
                                description="Stem frames (20 ms) averaged into one before the blocks: 2 halves their "
                                            "cost; stack_factor then stacks block frames. Needs encoder_layers > 0.")
    encoder_merge: EncoderMerge = Field(
        "mean", description="How encoder_stride stem frames become one: 'mean' averages them; 'linear' maps them side by "
                            "side through a learned matrix that starts as the mean. 'linear' needs encoder_stride > 1.")

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        fields = type(self).model_fields
        return {k: v for k, v in data.items() if k not in LATER_KEYS or v != fields[k].default}

    @property
    def ffn_dim(self) -> int:
        return self.encoder_ffn_dim or 4 * self.conv_channels

    @property
    def frames_per_token(self) -> int:
        """Stem frames (20 ms, the teacher's frame rate) per audio token: the stride, then the stacking."""
        return self.encoder_stride * self.stack_factor

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "AudioLayerConfig":
        if self.encoder_layers and self.conv_channels % self.encoder_heads:
            raise ValueError(f"audio_layer.encoder_heads={self.encoder_heads} must divide conv_channels={self.conv_channels}")
        if self.encoder_stride > 1 and not self.encoder_layers:
            raise ValueError("audio_layer.encoder_stride pools frames for the blocks: it needs encoder_layers > 0 "
                             "(without blocks, stack_factor sets the token rate)")
        if self.encoder_merge != "mean" and self.encoder_stride == 1:
            raise ValueError(f"audio_layer.encoder_merge={self.encoder_merge!r} merges encoder_stride frames into one: "
                             "it needs encoder_stride > 1")
        return self

    def flops(self, num_frames: int) -> int:
        """Multiply-adds x 2 of one clip of ``num_frames`` log-mel frames through this layer.

        Counts every matrix product (convolutions, block projections, attention scores and mixing over
        the frames each query sees, the output projection); norms and activations are a rounding error
        beside them.
        """
        c, n_mels = self.conv_channels, self.n_mels
        t2 = pooled_frames(num_frames, 1)
        total = 2 * num_frames * n_mels * c * 3 + 2 * t2 * c * c * 3
        tb = pooled_frames(num_frames, self.encoder_stride)  # block frames
        if self.encoder_merge == "linear":
            total += 2 * tb * self.encoder_stride * c * c
        per_frame = 2 * (4 * c * c + 2 * c * self.ffn_dim)  # q, k, v, out + fc1, fc2
        k = min(self.encoder_lookahead, max(tb - 1, 0))
        seen = tb * (tb + 1) // 2 + k * tb - k * (k + 1) // 2  # keys of every query: 0 .. min(i + k, tb - 1)
        attention = 2 * 2 * c * seen  # scores + mixing
        total += self.encoder_layers * (tb * per_frame + attention)
        total += 2 * self.num_tokens(num_frames) * c * self.stack_factor * self.hidden_size
        return total

    def num_tokens(self, num_frames: int) -> int:
        """Audio tokens for a clip of ``num_frames`` log-mel frames (conv stride 2, then the blocks' stride and
        the stacking: one token per ``frames_per_token`` stem frames, the last one partial)."""
        return pooled_frames(num_frames, self.frames_per_token)


def pooled_frames(num_frames: int, stem_frames: int) -> int:
    """What a clip of ``num_frames`` log-mel frames becomes after the stem (conv stride 2) when every ``stem_frames``
    stem frames are pooled to one, the last one partial: the layer's block frames (the stride), its tokens (stride x
    stacking), and the trainer's teacher targets for either, which must line up with them one to one."""
    return -(-((max(num_frames, 0) + 1) // 2) // stem_frames)


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def mean_pool(x: torch.Tensor, lengths: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, C) frames + (B,) valid counts -> (B, ceil(T / group), C) means over consecutive groups of each
    clip's *valid* frames (a partial last group averages what it has; groups past a clip's end are zero) +
    (B,) pooled counts. The student's stride and the teacher's targets pool the same way."""
    b, t, c = x.shape
    n = -(-t // group)
    valid = _length_mask(lengths, n * group).to(x.dtype)
    x = F.pad(x, (0, 0, 0, n * group - t)) * valid[..., None]
    counts = valid.view(b, n, group).sum(-1).clamp(min=1)
    return x.view(b, n, group, c).sum(2) / counts[..., None], -(-lengths // group)


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's position table (the values its checkpoints hold), computed for any length."""
    half = channels // 2
    increment = math.log(10000) / max(half - 1, 1)
    inv = torch.exp(-increment * torch.arange(half, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class CausalBlock(nn.Module):
    """A pre-norm Whisper encoder block (same parameter names and shapes) whose frame i attends to frames
    0 .. i + lookahead (0 = causal) of its own clip: keys past a clip's length are masked, so right padding
    stays invisible with lookahead too."""

    def __init__(self, width: int, heads: int, ffn_dim: int, lookahead: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.lookahead = lookahead
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, width)

    def _attend(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t, c = h.shape
        split = lambda x: x.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        parts = []
        for start in range(0, t, ATTENTION_CHUNK):
            end = min(t, start + ATTENTION_CHUNK)
            keys = min(t, end + self.lookahead)
            # query i sees keys 0 .. i + lookahead: the chunk's own (and the next few) keys banded, all earlier fully
            mask = torch.ones(end - start, keys, dtype=torch.bool, device=h.device).tril(start + self.lookahead)
            if self.lookahead:  # ... and none past its clip's end (causal queries never reach them)
                # (a clip of no frames keeps key 0, so its rows are not all masked: SDPA would give NaN)
                mask = mask[None, None] & _length_mask(lengths.clamp(min=1), keys)[:, None, None, :]
            parts.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], attn_mask=mask))
        return torch.cat(parts, dim=2).transpose(1, 2).reshape(b, t, c)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, C) frames + (B,) valid frames per clip."""
        x = x + self.out_proj(self._attend(self.self_attn_layer_norm(x), lengths))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEmbedding(nn.Module):
    def __init__(self, config: AudioLayerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.conv_channels
        self.conv1 = nn.Conv1d(config.n_mels, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1)
        # the learned merge (encoder_merge: linear) starts as the mean: a fresh layer equals the mean-pooling one on whole
        # groups (a partial last group counts its missing frames as zeros, as the clip alone would at any batch)
        self.merge = nn.Linear(c * config.encoder_stride, c) if config.encoder_merge == "linear" else None
        if self.merge is not None:
            with torch.no_grad():
                self.merge.weight.copy_(torch.eye(c).repeat(1, config.encoder_stride) / config.encoder_stride)
                self.merge.bias.zero_()
        self.blocks = nn.ModuleList(CausalBlock(c, config.encoder_heads, config.ffn_dim, config.encoder_lookahead)
                                    for _ in range(config.encoder_layers))
        self.norm = nn.LayerNorm(c * config.stack_factor)
        self.proj = nn.Linear(c * config.stack_factor, config.hidden_size)

    def forward(
        self, features: torch.Tensor, frame_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) log-mel + (B,) valid frames -> (B, N, hidden) vectors + (B,) valid tokens."""
        return self.tokens(*self.frames(features, frame_lengths))

    def frames(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) log-mel + (B,) valid frames -> (B, T', C) frames before the stacking (the blocks' output,
        or the stem's without blocks; zero past each clip's end) + (B,) valid frames. Training reads them too: the
        audio-layer distillation (``audio_distill_weight``) aims the blocks' output at the teacher's deeper states."""
        frame_lengths = frame_lengths.to(features.device)
        mask = _length_mask(frame_lengths, features.shape[-1])[:, None, :]
        x = F.gelu(self.conv1(features * mask)) * mask
        x = F.gelu(self.conv2(x))
        stem_lengths = (frame_lengths + 1) // 2
        stem_mask = _length_mask(stem_lengths, x.shape[-1])[:, None, :]
        x = x * stem_mask
        x = x.transpose(1, 2)  # (B, T2, C)
        lengths = stem_lengths
        if len(self.blocks):
            if self.config.encoder_stride > 1:
                x, lengths = self._pool(x, lengths)
            x = x + sinusoids(x.shape[1], x.shape[2]).to(x.dtype).to(x.device)
            for block in self.blocks:
                x = block(x, lengths)
            x = x * _length_mask(lengths, x.shape[1])[..., None]  # padding is zero again, as a clip alone would stack it
        return x, lengths

    def tokens(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames``' output -> (B, N, hidden) vectors + (B,) valid tokens: stack_factor frames per token, then
        LayerNorm + Linear to the LLM's width."""
        k = self.config.stack_factor
        pad = (-x.shape[1]) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        b, t, c = x.shape
        x = x.reshape(b, t // k, c * k)
        token_lengths = -(-lengths // k)
        x = self.proj(self.norm(x))
        return x, token_lengths

    def _pool(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_stride stem frames -> one block frame: their mean, or the learned merge of the frames side by side
        (frames past a clip's end are zero here, so a clip's merged frames do not depend on its batch)."""
        s = self.config.encoder_stride
        if self.merge is None:
            return mean_pool(x, lengths, s)
        b, t, c = x.shape
        x = F.pad(x, (0, 0, 0, (-t) % s))
        return self.merge(x.reshape(b, -1, s * c)), -(-lengths // s)

    @torch.no_grad()
    def init_from_whisper(self, encoder: nn.Module) -> None:
        """Start from the teacher's own stem and first blocks (VoRA-style), so training starts from its frames.

        ``encoder`` is a Hugging Face ``WhisperEncoder``; shapes must match (the trainer checks).
        """
        self.conv1.load_state_dict(encoder.conv1.state_dict())
        self.conv2.load_state_dict(encoder.conv2.state_dict())
        for ours, theirs in zip(self.blocks, encoder.layers, strict=False):
            attn = theirs.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                getattr(ours, name).load_state_dict(getattr(attn, name).state_dict())
            for name in ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2"):
                getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())

    @torch.no_grad()
    def match_output_scale(self, target_rms: float) -> None:
        """Scale the projection so fresh audio vectors have the RMS of the LLM's token embeddings.

        An untrained layer whose outputs are 50x larger than any token embedding wrecks the LLM's
        first steps; matching the scale makes training start from a sane prompt.
        """
        scale_to_rms(self.proj, target_rms)


def embedding_rms(model: nn.Module) -> float:
    """RMS of an LLM's input token embeddings: the scale the audio layer's outputs start at, so the
    prompt's audio positions look like token positions to the frozen blocks from the first step."""
    embed = model.get_input_embeddings().weight
    return float(embed.detach().float().pow(2).mean().sqrt())


@torch.no_grad()
def scale_to_rms(proj: nn.Linear, target_rms: float) -> None:
    """Scale a fresh projection so its outputs for unit-normal inputs have RMS ``target_rms``
    (the audio layer's start, and any stand-in that writes vectors into the LLM prompt)."""
    rms = proj(torch.randn(256, proj.in_features)).pow(2).mean().sqrt().item()
    if rms > 0:
        proj.weight.mul_(target_rms / rms)
        proj.bias.mul_(target_rms / rms)
