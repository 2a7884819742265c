"""Training losses: next-token CE on answer tokens, layer-wise distillation at audio positions, and
the text-reading KL (the LLM on the transcript as text -> the student on the audio)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over answer tokens; ``logits`` (n, V) and ``targets`` (n,) are already the answer positions only."""
    return F.cross_entropy(logits.float(), targets)


def distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Masked mean over audio tokens of (1 - cos) or of the per-token mean squared error.

    ``pred``/``target`` (B, N, d), ``mask`` (B, N) bool. Cosine ignores the teacher's scale, which
    differs from layer to layer (VoRA uses it for that reason); MSE also matches magnitudes.
    """
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    elif kind == "mse":
        per_token = (pred - target).pow(2).mean(-1)
    else:
        raise ValueError(f"unknown distillation loss {kind!r} (cosine or mse)")
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def text_kd_loss(student_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(reference || student); both (n, V) at the same answer tokens.

    The reference is the frozen LLM reading the words as text, so its whole next-token
    distribution (not one sampled target) says what hearing those words should make the LLM predict.
    """
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    stu = F.log_softmax(student_logits.float(), dim=-1)
    return (ref.exp() * (ref - stu)).sum(-1).mean()
