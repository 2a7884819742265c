"""The AuRA audio embedding layer: log-mel frames -> vectors that sit in the LLM prompt.

A Whisper-style conv stem (so it can be initialised from the teacher's stem, as VoRA does with
its patch embedding), frame stacking to cut the token rate, then LayerNorm + Linear to the LLM
width. The same module runs in the trainer and in the server.

Batching must never change an example's output (a request's tokens may not depend on who it
was batched with), so every stage masks what lies beyond each example's length exactly as the
example alone would see zero padding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class AudioLayerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stem: Literal["whisper_conv"] = "whisper_conv"
    n_mels: int = Field(80, ge=1)
    conv_channels: int = Field(384, ge=1)
    stack_factor: int = Field(4, ge=1, le=32)
    hidden_size: int = Field(..., ge=1, description="The LLM's hidden size.")

    def num_tokens(self, num_frames: int) -> int:
        """Audio tokens for a clip of ``num_frames`` log-mel frames (conv stride 2, then stacking)."""
        if num_frames <= 0:
            return 0
        after_stem = (num_frames + 1) // 2
        return -(-after_stem // self.stack_factor)


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class AudioEmbedding(nn.Module):
    def __init__(self, config: AudioLayerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.conv_channels
        self.conv1 = nn.Conv1d(config.n_mels, c, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(c * config.stack_factor)
        self.proj = nn.Linear(c * config.stack_factor, config.hidden_size)

    def forward(
        self, features: torch.Tensor, frame_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_mels, T) log-mel + (B,) valid frames -> (B, N, hidden) vectors + (B,) valid tokens."""
        frame_lengths = frame_lengths.to(features.device)
        mask = _length_mask(frame_lengths, features.shape[-1])[:, None, :]
        x = F.gelu(self.conv1(features * mask)) * mask
        x = F.gelu(self.conv2(x))
        stem_lengths = (frame_lengths + 1) // 2
        x = x * _length_mask(stem_lengths, x.shape[-1])[:, None, :]
        x = x.transpose(1, 2)  # (B, T2, C)
        k = self.config.stack_factor
        pad = (-x.shape[1]) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        b, t, c = x.shape
        x = x.reshape(b, t // k, c * k)
        token_lengths = -(-stem_lengths // k)
        x = self.proj(self.norm(x))
        return x, token_lengths

    @torch.no_grad()
    def init_from_whisper_stem(self, conv1_weight: torch.Tensor, conv1_bias: torch.Tensor,
                               conv2_weight: torch.Tensor, conv2_bias: torch.Tensor) -> None:
        """Start from the teacher's own stem (VoRA-style), so distillation starts from its frames."""
        self.conv1.weight.copy_(conv1_weight)
        self.conv1.bias.copy_(conv1_bias)
        self.conv2.weight.copy_(conv2_weight)
        self.conv2.bias.copy_(conv2_bias)

    @torch.no_grad()
    def match_output_scale(self, target_rms: float) -> None:
        """Scale the projection so fresh audio vectors have the RMS of the LLM's token embeddings.

        An untrained layer whose outputs are 50x larger than any token embedding wrecks the LLM's
        first steps; matching the scale makes training start from a sane prompt.
        """
        probe = torch.randn(256, self.proj.in_features)
        rms = self.proj(probe).pow(2).mean().sqrt().item()
        if rms > 0:
            self.proj.weight.mul_(target_rms / rms)
            self.proj.bias.mul_(target_rms / rms)
