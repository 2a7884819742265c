"""SpecAugment for the student's log-mel input: time and frequency masks, drawn afresh each step.

The corpus's waveform augmentation (``augment.py``) is baked into each clip once, so after the
first epoch the student sees the same audio again and can memorise it: the GPU run's held-out
next-token loss bottomed out after ~2.5 epochs and then rose. Masks drawn per step give every
epoch different inputs at no cost in corpus size, and the teacher's targets stay those of the
clean clip, so distillation asks the student to fill in what a mask hid (Park et al. 2019;
adaptive time-mask widths as in Park et al. 2020).

Masks are drawn from a generator seeded by (run seed, step, example index): a resumed run draws
the masks it would have drawn, and data-parallel ranks draw, for each example, the masks a single
process would, so the DDP equivalence holds with masking on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpecAugment:
    """``time_masks`` masks of up to ``time_width`` × the clip's frames each, ``freq_masks`` masks of
    up to ``freq_width`` mel bins each; masked cells take the clip's mean log-mel."""

    time_masks: int = 0
    time_width: float = 0.05
    freq_masks: int = 0
    freq_width: int = 10

    @property
    def enabled(self) -> bool:
        return self.time_masks > 0 or self.freq_masks > 0

    def __call__(self, features: torch.Tensor, num_frames: int, seed: int) -> torch.Tensor:
        """A masked copy of one clip's ``(n_mels, T)`` features (frames past ``num_frames`` untouched)."""
        if not self.enabled:
            return features
        g = torch.Generator().manual_seed(seed)
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


def mask_seed(run_seed: int, step: int, example: int) -> int:
    """One generator seed per (run, step, example): see the module docstring."""
    return (run_seed * 1_000_003 + step) * 10_000_019 + example
