"""Alignment loss at the audio positions: CTC over the LLM's own vocabulary through its own LM head.

The distillation loss says *what the audio sounds like* (the teacher's features); nothing in it
says *which words* were spoken until the next-token loss, 20 layers further up, back-propagates
through the whole LLM. CTC reads the hidden states of one early block at the audio positions,
applies the LLM's final norm and LM head (frozen, shared with generation), and asks that the
collapsed argmax sequence be the transcript's tokens. That gives the audio layer and the early
LoRA a direct, dense word-level signal, and works with a student truncated after that block,
so its steps are several times cheaper than full-depth steps.

The blank symbol is a token id the transcripts never contain (the tokenizer's end-of-turn
token). ``greedy_ctc`` decodes the same way for a cheap held-out WER during training.

The same loss also runs over characters (``CHARS``) through a small training-only head on an early
block (``char_ctc_weight``): the LM head's 49k sub-word vocabulary at 12.5 Hz is a hard target for
the first blocks, and linear probes found the words missing from them. ``CHAR_SLOTS`` characters
per audio token (25 Hz) leave room above the ~14 characters/s of speech.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHARS = " abcdefghijklmnopqrstuvwxyz'"  # id 0 is the blank; character k is id k + 1
CHAR_SLOTS = 2  # characters per audio token: 12.5 Hz tokens -> 25 Hz


def encode_chars(text: str) -> list[int]:
    """The character CTC target of a transcript: lower-cased, anything outside ``CHARS`` dropped."""
    return [CHARS.index(c) + 1 for c in text.lower() if c in CHARS]


def normalize_chars(text: str) -> str:
    """What a character target spells, spaces collapsed: the reference a character error rate compares to."""
    return decode_chars(encode_chars(text))


def decode_chars(ids: list[int]) -> str:
    """Best-path character ids (no blanks) back to text, spaces collapsed."""
    return " ".join("".join(CHARS[i - 1] for i in ids).split())


@dataclass(frozen=True)
class Units:
    """What the character head spells in: ``size`` classes after the blank (id 0). ``encode`` turns a
    transcript into class ids 1..size, ``decode`` class ids back to the normalised characters a
    character error rate compares (so every unit set is scored alike); ``token_ids[k]`` is the
    LLM token of class k + 1 where the units are the LLM's own tokens (pieces)."""

    name: str
    size: int
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    token_ids: tuple[int, ...] | None = None


CHAR_UNITS = Units("chars", len(CHARS), encode_chars, decode_chars)


def _bpe_spec(student: Path) -> dict[str, Any]:
    """The student's ``tokenizer.json``, checked to be a BPE."""
    spec: dict[str, Any] = json.loads((Path(student) / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{student}: pieces need a BPE tokenizer.json")
    return spec


def _cut_with(spec: dict[str, Any], merges: int) -> Tokenizer:
    from tokenizers import Tokenizer

    kept = {**spec, "model": {**spec["model"], "merges": spec["model"]["merges"][:merges]}}
    return Tokenizer.from_str(json.dumps(kept))


def piece_units(student: Path, merges: int) -> Units:
    """The pieces of the LLM's BPE with its first ``merges`` merges as the head's units: every token
    such a cut can produce (the byte alphabet plus one token per merge kept), over the normalised
    transcript (lower case, ``CHARS`` only: what the audio carries). A small sub-word inventory: few
    classes for the head to learn, and tokens the LLM reads as its own."""
    full = _bpe_spec(student)
    cut = _cut_with(full, merges)
    vocab: dict[str, int] = full["model"]["vocab"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in full["model"]["merges"][:merges]]
    alphabet = {tok for tok in vocab if len(tok) == 1}  # the byte-level alphabet's single symbols
    ids = tuple(sorted({vocab[t] for t in alphabet} | {vocab[a + b] for a, b in pairs if a + b in vocab}))
    index = {t: k + 1 for k, t in enumerate(ids)}

    def encode(text: str) -> list[int]:
        return [index[t] for t in cut.encode(normalize_chars(text), add_special_tokens=False).ids]

    def decode(classes: list[int]) -> str:
        return normalize_chars(cut.decode([ids[k - 1] for k in classes]))

    return Units(f"pieces{merges}", len(ids), encode, decode, ids)


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]], blank: int) -> torch.Tensor:
    """Mean per-token CTC loss. ``logits`` (B, N, V) over audio positions, ``lengths`` (B,) valid positions.

    Normalised by target length (``reduction="mean"``) so long and short clips weigh alike;
    impossible alignments (a clip with fewer audio tokens than its transcript needs) count zero.

    Over a large vocabulary (the LM head's 49k tokens) the loss runs on the K classes the batch's
    transcripts use, plus the blank: a path only ever visits those, so with ``log p(k) = z_k - lse(z)``
    the loss is the K-class CTC of ``log_softmax(z_K)`` plus, per valid position, ``lse(z) - lse(z_K)``.
    That is the same loss and gradient (``tests/test_training_stages.py``) without the (N, B, V)
    log-probabilities, their CTC gradient and the softmax backward over them: a tenth of a CPU
    stage-1 step (``bench/step_time.py``), and ~2.6 GB per such tensor on a batch-128 GPU step. The
    K-class part runs in float64: it is small, and its gradient and the log-sum-exp term's cancel in part.
    """
    z = logits.float()
    device = z.device
    flat_list = [t for seq in targets for t in seq]
    target_lengths = torch.tensor([len(seq) for seq in targets], dtype=torch.long, device=device)
    lengths = lengths.to(device=device, dtype=torch.long)
    classes = sorted(set(flat_list) | {blank})  # from the host-side targets: no device sync on a GPU
    if len(classes) * 2 > z.shape[-1]:  # a small alphabet (the character head): nothing to save
        logp = F.log_softmax(z, dim=-1).transpose(0, 1)  # (N, B, V)
        flat = torch.tensor(flat_list, dtype=torch.long, device=device)
        return F.ctc_loss(logp, flat, lengths, target_lengths, blank=blank, reduction="mean", zero_infinity=True)
    index = {c: k for k, c in enumerate(classes)}
    sub = z.index_select(-1, torch.tensor(classes, device=device)).double()  # (B, N, K)
    lse_sub = sub.logsumexp(-1)
    logp = (sub - lse_sub[..., None]).transpose(0, 1)
    per = F.ctc_loss(logp, torch.tensor([index[t] for t in flat_list], dtype=torch.long, device=device), lengths,
                     target_lengths, blank=index[blank], reduction="none", zero_infinity=True)
    valid = torch.arange(z.shape[1], device=device)[None, :] < lengths[:, None]
    rest = torch.where(valid, z.logsumexp(-1).double() - lse_sub, 0.0).sum(1)  # (B,): the other classes' share, in nats
    # the positions a path needs: one per label, and a blank between repeated labels
    needed = torch.tensor([len(seq) + sum(a == b for a, b in zip(seq, seq[1:])) for seq in targets], device=device)
    return (torch.where(lengths >= needed, per + rest, 0.0) / target_lengths.clamp(min=1)).mean().float()


def greedy_ctc(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path: argmax per position, repeats collapsed, blanks removed."""
    best = logits.argmax(-1).tolist()
    out = []
    for b, n in enumerate(lengths.tolist()):
        seq, prev = [], None
        for t in best[b][: int(n)]:
            if t != prev and t != blank:
                seq.append(t)
            prev = t
        out.append(seq)
    return out
