"""Whisper-compatible log-mel features in plain torch, batched, on the input's device.

Training distils toward a Whisper-style teacher and serving feeds the same features to the
adapter's audio layer, so both sides must compute them with this one function. torchaudio is
not used (it does not import in the serving image); the mel bank is built here and checked
against ``transformers.audio_utils.mel_filter_bank`` in the tests.

Whisper pads every clip to 30 s and normalises by the loudest frame of the padded clip. The
student path does not pay for 30 s of padding: each clip is padded just far enough
(``n_fft // 2`` zeros) that its valid frames equal Whisper's, and the max is taken over its own
valid frames only, so an example's features never depend on what it is batched with. The
teacher path (``pad_to_frames``) reproduces ``WhisperFeatureExtractor`` exactly instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import pydantic
import torch
from pydantic import ConfigDict, PositiveInt

LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below each example's max, as in Whisper


class FeatureConfig(pydantic.BaseModel):
    """The feature recipe an adapter was trained with; stored in ``aura_config.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["whisper_log_mel"] = "whisper_log_mel"
    sample_rate: PositiveInt = 16000
    n_mels: PositiveInt = 80
    n_fft: PositiveInt = 400
    hop_length: PositiveInt = 160

    def num_frames(self, num_samples: int) -> int:
        """Frames Whisper keeps for ``num_samples``: the STFT's last (centred, half-empty) frame is dropped."""
        return num_samples // self.hop_length


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney scale: linear below 1 kHz, logarithmic above (what Whisper and librosa use)."""
    logstep = 27.0 / math.log(6.4)
    linear = 3.0 * hz / 200.0
    return torch.where(hz >= 1000.0, 15.0 + torch.log(hz / 1000.0) * logstep, linear)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    linear = 200.0 * mel / 3.0
    return torch.where(mel >= 15.0, 1000.0 * torch.exp(logstep * (mel - 15.0)), linear)


def _mel_points(config: FeatureConfig) -> torch.Tensor:
    """The n_mels + 2 equally spaced Slaney-mel points over 0..sr/2 (float64, in mel): the filter
    bank's edges, and bin k's centre at point k + 1."""
    f64 = torch.float64  # in double so float32 filters round the same way as numpy's
    lo, hi = _hz_to_mel(torch.tensor([0.0, config.sample_rate / 2.0], dtype=f64)).tolist()
    return torch.linspace(lo, hi, config.n_mels + 2, dtype=f64)


def mel_bin_position(config: FeatureConfig, hz: torch.Tensor) -> torch.Tensor:
    """Fractional index of the mel bin centred at ``hz``."""
    points = _mel_points(config)
    return (_hz_to_mel(hz.to(points.dtype)) - points[0]) / (points[1] - points[0]) - 1.0


def mel_bin_centres_hz(config: FeatureConfig) -> torch.Tensor:
    """(n_mels,) centre frequency of each mel bin, in Hz (float64)."""
    return _mel_to_hz(_mel_points(config))[1:-1]


@functools.lru_cache(maxsize=32)
def _mel_filters_cached(config: FeatureConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    n_freqs = config.n_fft // 2 + 1
    f64 = torch.float64
    filter_hz = _mel_to_hz(_mel_points(config))
    fft_hz = torch.linspace(0.0, float(config.sample_rate // 2), n_freqs, dtype=f64)

    slopes = filter_hz[None, :] - fft_hz[:, None]  # (n_freqs, n_mels + 2)
    widths = filter_hz.diff()
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = torch.clamp(torch.minimum(down, up), min=0.0)
    bank = bank * (2.0 / (filter_hz[2:] - filter_hz[:-2]))[None, :]  # slaney area normalisation
    return bank.T.contiguous().to(device=device, dtype=dtype)


def mel_filters(
    config: FeatureConfig, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) slaney mel bank over 0..sr/2, cached; treat the result as read-only."""
    return _mel_filters_cached(config, torch.device(device if device is not None else "cpu"), dtype)


@functools.lru_cache(maxsize=32)
def _hann(n_fft: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, device=device, dtype=dtype)


def _as_batch(
    waveforms: Sequence[torch.Tensor] | torch.Tensor, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a zero-padded (B, n) batch and its lengths; samples past a length are zeroed
    because the caller's padding may be anything and Whisper's padding is silence."""
    if isinstance(waveforms, torch.Tensor):
        batch = waveforms.unsqueeze(0) if waveforms.dim() == 1 else waveforms
        if batch.dim() != 2:
            raise ValueError(f"expected a (B, n) or (n,) waveform tensor, got shape {tuple(waveforms.shape)}")
        if lengths is None:
            lengths = torch.full((batch.shape[0],), batch.shape[1], dtype=torch.int64)
    else:
        if lengths is not None:
            raise ValueError("lengths is only for a padded (B, n) tensor; a list carries its own lengths")
        items = [torch.as_tensor(w) for w in waveforms]
        if not items:
            raise ValueError("log_mel needs at least one waveform")
        if any(w.dim() != 1 for w in items):
            raise ValueError("each waveform in a list must be 1-D (mono samples)")
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in items) else torch.float32
        lengths = torch.tensor([w.shape[0] for w in items], dtype=torch.int64)
        batch = torch.nn.utils.rnn.pad_sequence([w.to(dtype) for w in items], batch_first=True)

    # float64 is honoured (reference checks); anything else, half included, runs in float32
    # because torch.stft has no half-precision CPU kernel and Whisper's features are float32.
    batch = batch.to(torch.float64 if batch.dtype == torch.float64 else torch.float32)
    lengths = lengths.to(device=batch.device, dtype=torch.int64)
    if lengths.shape != (batch.shape[0],):
        raise ValueError(f"lengths must have shape ({batch.shape[0]},), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > batch.shape[1]).any()):
        raise ValueError(f"lengths must lie in [0, {batch.shape[1]}]")
    positions = torch.arange(batch.shape[1], device=batch.device)
    return torch.where(positions[None, :] < lengths[:, None], batch, 0.0), lengths


def _log_mel_frames(batch: torch.Tensor, config: FeatureConfig, num_frames: int) -> torch.Tensor:
    """log10 mel power of the first ``num_frames`` centred STFT frames, (B, n_mels, num_frames)."""
    window = _hann(config.n_fft, batch.device, batch.dtype)
    stft = torch.stft(
        batch, config.n_fft, config.hop_length, window=window,
        center=True, pad_mode="reflect", return_complex=True,
    )
    power = (stft[..., :num_frames].abs() ** 2).contiguous()
    mel = mel_filters(config, batch.device, batch.dtype) @ power
    return torch.clamp(mel, min=LOG_FLOOR).log10()


def log_mel(
    waveforms: Sequence[torch.Tensor] | torch.Tensor,
    config: FeatureConfig,
    *,
    lengths: torch.Tensor | None = None,
    pad_to_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features (B, n_mels, T) float32 and valid frame counts (B,) int64.

    Without ``pad_to_frames`` T is the longest example's frame count and frames past an
    example's own count are 0.0. With it, every clip is truncated or zero-padded to
    ``pad_to_frames * hop_length`` samples and normalised over all frames, exactly as
    ``WhisperFeatureExtractor`` feeds a Whisper encoder; the returned counts still say how many
    frames hold the clip's own audio, for picking the teacher's outputs at audio positions.
    """
    batch, lengths = _as_batch(waveforms, lengths)
    hop = config.hop_length

    if pad_to_frames is not None:
        if pad_to_frames <= 0:
            raise ValueError(f"pad_to_frames must be positive, got {pad_to_frames}")
        target = pad_to_frames * hop
        if target <= config.n_fft // 2:
            raise ValueError(f"pad_to_frames={pad_to_frames} is shorter than half an FFT window")
        batch = torch.nn.functional.pad(batch[:, :target], (0, max(0, target - batch.shape[1])))
        logspec = _log_mel_frames(batch, config, pad_to_frames)
        peak = logspec.amax(dim=(1, 2), keepdim=True)
        features = (torch.maximum(logspec, peak - DYNAMIC_RANGE) + 4.0) / 4.0
        return features.float(), torch.clamp(lengths, max=target) // hop

    frame_lengths = lengths // hop
    num_frames = int(frame_lengths.max())
    if num_frames == 0:
        return batch.new_zeros((batch.shape[0], config.n_mels, 0), dtype=torch.float32), frame_lengths
    # n_fft // 2 trailing zeros make the last valid frame's window see silence, as in Whisper's
    # 30 s padding, instead of the reflection of the clip that center=True would add.
    batch = torch.nn.functional.pad(batch[:, : int(lengths.max())], (0, config.n_fft // 2))
    logspec = _log_mel_frames(batch, config, num_frames)
    valid = (torch.arange(num_frames, device=batch.device)[None, :] < frame_lengths[:, None])[:, None, :]
    peak = logspec.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)
    features = (torch.maximum(logspec, peak - DYNAMIC_RANGE) + 4.0) / 4.0
    return features.masked_fill(~valid, 0.0).float(), frame_lengths
