"""Our torch log-mel against transformers' WhisperFeatureExtractor, the teacher's reference input.

Measured on this CPU build the two are bit-identical (max abs diff 0.0): both run torch.stft and
a float32 matmul with the same float32-rounded filter bank. The tests allow 1e-5 normalised
units (4e-5 in log10, well under 0.001 dB) so a different FFT/BLAS backend or a GPU still
passes, while a wrong window, padding, mel scale or normalisation shows up as >= 1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from adapters.audio import load_audio_file
from adapters.features import FeatureConfig, log_mel, mel_filters
from audio_helpers import speak

ATOL = 1e-5
CFG = FeatureConfig()


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Real speech (two voices/speeds, decoded by our own front end) plus noise of odd length."""
    tmp: Path = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    return {
        "speech": load_audio_file(speak("What is the capital of France?", tmp / "a.wav")).samples,
        "speech_fast": load_audio_file(
            speak("The quick brown fox jumps over the lazy dog.", tmp / "b.wav", voice="en-gb", speed=190)
        ).samples,
        "noise": (0.1 * rng.standard_normal(3 * 16000 + 77)).astype(np.float32),
        "quiet_noise": (1e-4 * rng.standard_normal(16000 + 5)).astype(np.float32),
    }


def _reference(extractor: WhisperFeatureExtractor, x: np.ndarray) -> np.ndarray:
    return extractor(x, sampling_rate=16000, return_tensors="np").input_features[0]


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --- mel bank ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels: int) -> None:
    cfg = FeatureConfig(n_mels=n_mels)
    ref = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    ).T
    ours64 = mel_filters(cfg, dtype=torch.float64)
    ours32 = mel_filters(cfg)
    assert ours32.shape == (n_mels, 201) and ours32.dtype == torch.float32
    assert _max_diff(ours64, ref) < 1e-12
    assert _max_diff(ours32, ref.astype(np.float32)) < 1e-8


def test_mel_filters_are_cached() -> None:
    assert mel_filters(CFG) is mel_filters(FeatureConfig(), "cpu", torch.float32)


# --- teacher path: exactly the extractor ---------------------------------------------------


@pytest.mark.parametrize("name", ["speech", "speech_fast", "noise", "quiet_noise"])
def test_padded_matches_whisper_extractor(
    name: str, clips: dict[str, np.ndarray], extractor: WhisperFeatureExtractor
) -> None:
    x = clips[name]
    ours, frames = log_mel([torch.from_numpy(x)], CFG, pad_to_frames=3000)
    ref = _reference(extractor, x)
    assert ours.shape == (1, 80, 3000) and ours.dtype == torch.float32
    assert _max_diff(ours[0], ref) < ATOL
    assert frames.tolist() == [len(x) // 160]


def test_padded_batch_matches_extractor_batch(
    clips: dict[str, np.ndarray], extractor: WhisperFeatureExtractor
) -> None:
    xs = list(clips.values())
    ours, _ = log_mel([torch.from_numpy(x) for x in xs], CFG, pad_to_frames=3000)
    ref = extractor(xs, sampling_rate=16000, return_tensors="np").input_features
    assert _max_diff(ours, ref) < ATOL


def test_padded_truncates_long_audio_like_extractor(extractor: WhisperFeatureExtractor) -> None:
    x = (0.05 * np.random.default_rng(3).standard_normal(31 * 16000)).astype(np.float32)
    ours, frames = log_mel([torch.from_numpy(x)], CFG, pad_to_frames=3000)
    assert _max_diff(ours[0], _reference(extractor, x)) < ATOL
    assert frames.tolist() == [3000]


# --- student path: valid frames only -------------------------------------------------------


@pytest.mark.parametrize("name", ["speech", "speech_fast", "noise"])
def test_unpadded_matches_extractor_valid_frames(
    name: str, clips: dict[str, np.ndarray], extractor: WhisperFeatureExtractor
) -> None:
    """Equal as long as the extractor's max lies in the valid frames, true for these clips:
    its extra frames are silence or half-empty windows at the clip's end."""
    x = clips[name]
    ours, frames = log_mel([torch.from_numpy(x)], CFG)
    n = CFG.num_frames(len(x))
    assert ours.shape == (1, 80, n) and frames.tolist() == [n]
    assert _max_diff(ours[0], _reference(extractor, x)[:, :n]) < ATOL


def test_batch_equals_individual(clips: dict[str, np.ndarray]) -> None:
    xs = [torch.from_numpy(x) for x in clips.values()]
    xs += [xs[0][:12345], torch.zeros(100)]  # a cut clip and one shorter than a hop
    batch, frames = log_mel(xs, CFG)
    assert frames.tolist() == [CFG.num_frames(len(x)) for x in xs]
    assert batch.shape == (len(xs), 80, max(frames.tolist()))
    assert torch.isfinite(batch).all()
    for i, x in enumerate(xs):
        alone, alone_frames = log_mel([x], CFG)
        n = int(alone_frames[0])
        if n:
            assert _max_diff(batch[i, :, :n], alone[0]) < 1e-6
        assert (batch[i, :, n:] == 0).all()  # padding frames are exactly zero


def test_padded_tensor_with_lengths_ignores_garbage(clips: dict[str, np.ndarray]) -> None:
    xs = [torch.from_numpy(x) for x in clips.values()]
    lengths = torch.tensor([len(x) for x in xs])
    padded = torch.randn(len(xs), int(lengths.max()) + 999)  # junk past each length
    for i, x in enumerate(xs):
        padded[i, : len(x)] = x
    from_list, list_frames = log_mel(xs, CFG)
    from_tensor, tensor_frames = log_mel(padded, CFG, lengths=lengths)
    assert torch.equal(list_frames, tensor_frames)
    assert _max_diff(from_list, from_tensor) < 1e-6


def test_float64_input_agrees_with_float32(clips: dict[str, np.ndarray]) -> None:
    """float32 rounding in the STFT is the only difference; measured ~2e-5 on speech."""
    x = torch.from_numpy(clips["speech"])
    f32, _ = log_mel([x], CFG)
    f64, _ = log_mel([x.double()], CFG)
    assert f64.dtype == torch.float32
    assert _max_diff(f32, f64) < 1e-3


def test_all_too_short_gives_empty_features() -> None:
    features, frames = log_mel([torch.zeros(10), torch.zeros(159)], CFG)
    assert features.shape == (2, 80, 0) and frames.tolist() == [0, 0]


def test_feature_config_is_frozen_and_strict() -> None:
    assert CFG.num_frames(16000) == 100 and CFG.num_frames(16159) == 100
    with pytest.raises(pydantic.ValidationError):
        FeatureConfig(n_mel=80)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        CFG.n_mels = 128  # type: ignore[misc]
    assert FeatureConfig.model_validate_json(CFG.model_dump_json()) == CFG
