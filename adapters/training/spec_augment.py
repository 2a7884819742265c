"""SpecAugment for the student's log-mel input: time and frequency masks, drawn afresh each step.

The corpus's waveform augmentation (``augment.py``) is baked into each clip once, so after the
first epoch the student sees the same audio again and can memorise it: the GPU run's held-out
next-token loss bottomed out after ~2.5 epochs and then rose. Masks drawn per step give every
epoch different inputs at no cost in corpus size, and the teacher's targets stay those of the
clean clip, so distillation asks the student to fill in what a mask hid (Park et al. 2019;
adaptive time-mask widths as in Park et al. 2020).

A frequency warp (``freq_warp``, vocal tract length perturbation, Jaitly & Hinton 2013) moves
every formant by one factor per clip and step: the hearable corpus has few speakers, and the
character CTC A/B learned its training voices (training loss 2.9 -> 2.2 nats per character) while
held-out speakers stayed near the blank plateau (2.75). The warp acts on the mel axis through the
bins' centre frequencies, so a factor a moves energy at f Hz to a*f Hz, as a shorter vocal tract would.

Masks and warps are drawn from a generator seeded by (run seed, step, example index): a resumed run draws
the masks it would have drawn, and data-parallel ranks draw, for each example, the masks a single
process would, so the DDP equivalence holds with masking on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.features import FeatureConfig, mel_bin_centres_hz, mel_bin_position


@dataclass(frozen=True)
class SpecAugment:
    """``time_masks`` masks of up to ``time_width`` × the clip's frames each, ``freq_masks`` masks of
    up to ``freq_width`` mel bins each; masked cells take the clip's mean log-mel. With ``freq_warp``
    w > 0 the clip's frequencies are first scaled by a factor drawn from [1 - w, 1 + w]."""

    time_masks: int = 0
    time_width: float = 0.05
    freq_masks: int = 0
    freq_width: int = 10
    freq_warp: float = 0.0
    features: FeatureConfig = FeatureConfig()

    @property
    def enabled(self) -> bool:
        return self.time_masks > 0 or self.freq_masks > 0 or self.freq_warp > 0

    def __call__(self, features: torch.Tensor, num_frames: int, seed: int) -> torch.Tensor:
        """A masked copy of one clip's ``(n_mels, T)`` features (frames past ``num_frames`` untouched)."""
        if not self.enabled:
            return features
        g = torch.Generator().manual_seed(seed)
        if self.freq_warp > 0:  # drawn only when on, so runs with masks alone keep their masks
            factor = 1.0 + self.freq_warp * (2.0 * float(torch.rand((), generator=g)) - 1.0)
            features = warp_frequencies(features, num_frames, factor, self.features)
        n_mels = features.shape[0]
        keep = torch.ones((n_mels, num_frames), dtype=torch.bool)
        for _ in range(self.freq_masks):
            width = int(torch.randint(0, min(self.freq_width, n_mels) + 1, (1,), generator=g))
            start = int(torch.randint(0, n_mels - width + 1, (1,), generator=g))
            keep[start : start + width, :] = False
        max_t = int(self.time_width * num_frames)
        for _ in range(self.time_masks):
            width = int(torch.randint(0, max_t + 1, (1,), generator=g))
            start = int(torch.randint(0, num_frames - width + 1, (1,), generator=g))
            keep[:, start : start + width] = False
        out = features.clone()
        valid = out[:, :num_frames]
        fill = valid.mean()
        valid.masked_fill_(~keep.to(valid.device), fill)
        return out


def warp_frequencies(features: torch.Tensor, num_frames: int, factor: float, config: FeatureConfig) -> torch.Tensor:
    """A copy of ``(n_mels, T)`` log-mel features as if every frequency f had been ``factor`` * f:
    bin k reads the input at the position of its centre / factor, interpolated linearly between
    bins (clamped at both ends). Frames past ``num_frames`` are untouched."""
    n_mels = features.shape[0]
    source = mel_bin_position(config, mel_bin_centres_hz(config) / factor).clamp(0.0, n_mels - 1.0)
    lower = source.floor().long().clamp(max=n_mels - 2)
    frac = (source - lower).to(features.dtype).to(features.device)[:, None]
    lower = lower.to(features.device)
    out = features.clone()
    valid = features[:, :num_frames]
    out[:, :num_frames] = valid[lower] * (1.0 - frac) + valid[lower + 1] * frac
    return out


def mask_seed(run_seed: int, step: int, example: int) -> int:
    """One generator seed per (run, step, example): see the module docstring."""
    return (run_seed * 1_000_003 + step) * 10_000_019 + example
