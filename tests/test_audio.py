"""Decoding real speech from every container the server accepts, and refusing bad uploads cleanly.

The reference is one espeak-ng utterance at 16 kHz mono; every other file is transcoded from it,
so a decode is judged against known samples rather than against itself.
"""

from __future__ import annotations

import io
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

import adapters.audio as audio_mod
from adapters.audio import AudioError, DecodedAudio, decode_audio, load_audio_file
from audio_helpers import convert, speak

UTTERANCE = "What is the capital of France?"
DECODE_TIMEOUT_S = 20.0  # generous on a loaded 2-core box; a hang is minutes, not seconds

# name -> (file name, ffmpeg args, substring of PyAV's container name, lossless)
FORMATS: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
    "wav16k": ("ref.wav", (), "wav", True),
    "wav44k_stereo": ("stereo44k.wav", ("-ar", "44100", "-ac", "2"), "wav", False),
    "flac": ("a.flac", ("-c:a", "flac"), "flac", True),
    "mp3": ("a.mp3", ("-c:a", "libmp3lame", "-b:a", "64k"), "mp3", False),
    "ogg_vorbis": ("vorbis.ogg", ("-c:a", "libvorbis"), "ogg", False),
    "ogg_opus": ("a.opus", ("-c:a", "libopus", "-b:a", "32k"), "ogg", False),
    "webm_opus": ("a.webm", ("-c:a", "libopus", "-b:a", "32k"), "webm", False),
    "m4a_aac": ("a.m4a", ("-c:a", "aac", "-b:a", "64k"), "mp4", False),
}
LOSSY_MIN_CORRELATION = 0.95  # measured 0.988 (webm/opus) to 0.9994 (mp3) at these bitrates


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("audio")
    raw = speak(UTTERANCE, tmp / "espeak.wav")
    ref = convert(raw, tmp / "ref.wav", "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le")
    out = {"wav16k": ref}
    for name, (fname, args, _, _) in FORMATS.items():
        if name != "wav16k":
            out[name] = convert(ref, tmp / fname, *args)
    return out


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> np.ndarray:
    return load_audio_file(files["wav16k"]).samples


def _decode_or_error(data: bytes, **kwargs: object) -> DecodedAudio | AudioError:
    """Run a decode under a deadline so a hang fails the test instead of stalling the suite."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(decode_audio, data, **kwargs)
        try:
            return future.result(timeout=DECODE_TIMEOUT_S)
        except AudioError as exc:
            return exc


def _best_correlation(x: np.ndarray, ref: np.ndarray, max_lag: int = 800) -> float:
    """Peak normalised cross-correlation within +-50 ms: codecs add priming delay, not content."""
    n = min(len(x), len(ref))
    a, b = x[:n].astype(np.float64), ref[:n].astype(np.float64)
    full = np.correlate(a, b, mode="full")[n - 1 - max_lag : n + max_lag]
    return float(full.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _wav_bytes(channels: int, rate: int, frames: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(channels * frames, np.int16).tobytes())
    return buf.getvalue()


def _expect(kind: str, data: bytes, **kwargs: object) -> AudioError:
    result = _decode_or_error(data, **kwargs)
    assert isinstance(result, AudioError), f"expected AudioError({kind}), decoded {result!r}"
    assert result.kind == kind, result.message
    assert str(result) == result.message and result.message
    return result


# --- decoding real speech ------------------------------------------------------------------


def test_reference_is_real_speech(reference: np.ndarray) -> None:
    assert reference.dtype == np.float32 and reference.ndim == 1
    assert 1.5 < len(reference) / 16000 < 3.5
    assert 0.1 < np.abs(reference).max() <= 1.0


@pytest.mark.parametrize("name", list(FORMATS))
def test_decodes_every_container_to_16k_mono(name: str, files: dict[str, Path], reference: np.ndarray) -> None:
    _, _, container, lossless = FORMATS[name]
    decoded = load_audio_file(files[name])

    assert decoded.sample_rate == 16000
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    assert container in decoded.source_format
    assert abs(decoded.duration_s - len(reference) / 16000) < 0.1  # codec priming/padding only
    if name == "wav44k_stereo":
        assert (decoded.source_sample_rate, decoded.source_channels) == (44100, 2)
    if lossless:
        assert len(decoded.samples) == len(reference)
        np.testing.assert_allclose(decoded.samples, reference, atol=1e-6)
    else:
        assert _best_correlation(decoded.samples, reference) > LOSSY_MIN_CORRELATION


def test_stereo_downmix_keeps_level(files: dict[str, Path], reference: np.ndarray) -> None:
    """Identical channels must average to the same signal, not sum to twice it."""
    decoded = load_audio_file(files["wav44k_stereo"])
    ratio = np.abs(decoded.samples).max() / np.abs(reference).max()
    assert 0.9 < ratio < 1.1


def test_other_target_rate(files: dict[str, Path], reference: np.ndarray) -> None:
    decoded = decode_audio(files["flac"].read_bytes(), sample_rate=8000)
    assert decoded.sample_rate == 8000
    assert abs(len(decoded.samples) - len(reference) / 2) <= 2


def test_load_audio_file_matches_decode_audio(files: dict[str, Path]) -> None:
    a = load_audio_file(files["mp3"])
    b = decode_audio(files["mp3"].read_bytes())
    np.testing.assert_array_equal(a.samples, b.samples)


def test_pcm_wav_files_load_without_ffmpeg_and_equal_its_decode(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Corpus clips (16 kHz mono PCM) are read directly: the same samples FFmpeg gives, and no
    PyAV needed (a training image may lack it); other files still need FFmpeg."""
    via_ffmpeg = decode_audio(files["wav16k"].read_bytes())
    monkeypatch.setattr(audio_mod, "av", None)
    direct = load_audio_file(files["wav16k"])
    np.testing.assert_array_equal(direct.samples, via_ffmpeg.samples)
    assert (direct.source_format, direct.source_channels, direct.source_sample_rate) == ("wav", 1, 16000)
    with pytest.raises(RuntimeError, match="PyAV"):
        load_audio_file(files["wav44k_stereo"])  # not at the model's rate: only FFmpeg resamples it


def test_thread_safe(files: dict[str, Path]) -> None:
    """The server decodes from a thread pool: concurrent decodes must equal sequential ones."""
    blobs = [p.read_bytes() for p in files.values()] * 3
    sequential = [decode_audio(b).samples for b in blobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda b: decode_audio(b).samples, blobs))
    for s, c in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(s, c)


# --- refusing bad uploads ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_unsupported(seed: int) -> None:
    err = _expect("unsupported", np.random.default_rng(seed).bytes(4096 * (seed + 1)))
    assert "send" in err.message


def test_empty_bytes() -> None:
    result = _decode_or_error(b"")
    assert isinstance(result, AudioError) and result.kind in {"empty", "unsupported"}


def test_wav_with_no_samples_is_empty() -> None:
    _expect("empty", _wav_bytes(1, 16000, 0))


def test_too_large_is_checked_before_decoding(files: dict[str, Path]) -> None:
    data = files["wav16k"].read_bytes()
    err = _expect("too_large", data, max_bytes=len(data) - 1)
    assert str(len(data) - 1) in err.message or "MB" in err.message
    _expect("too_large", b"not audio at all", max_bytes=4)  # size wins over format
    assert isinstance(_decode_or_error(data, max_bytes=len(data)), DecodedAudio)


def test_too_long(files: dict[str, Path]) -> None:
    err = _expect("too_long", files["mp3"].read_bytes(), max_duration_s=1.0)
    assert "limit is 1 s" in err.message or "1 s limit" in err.message
    assert isinstance(_decode_or_error(files["mp3"].read_bytes(), max_duration_s=5.0), DecodedAudio)
    exactly_at_limit = _wav_bytes(1, 44100, 44100 * 2)
    assert isinstance(_decode_or_error(exactly_at_limit, max_duration_s=2.0), DecodedAudio)


def test_too_long_stops_decoding_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusing ten minutes of audio must not decode ten minutes of audio."""
    fed: list[int] = []
    real = av.AudioResampler

    class CountingResampler:
        def __init__(self, **kwargs: object) -> None:
            self._inner = real(**kwargs)

        def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
            if frame is not None:
                fed.append(frame.samples)
            return self._inner.resample(frame)

    monkeypatch.setattr(audio_mod.av, "AudioResampler", CountingResampler)
    data = _wav_bytes(1, 8000, 8000 * 600)
    err = _expect("too_long", data, max_duration_s=2.0)
    assert "600.0 s" in err.message  # the header's duration, quoted for the user
    assert sum(fed) <= 2 * 2.0 * 8000


def test_too_many_channels() -> None:
    err = _expect("bad_params", _wav_bytes(64, 16000, 160))
    assert "64 channels" in err.message


@pytest.mark.parametrize("rate", [800, 1_000_000])
def test_sample_rate_out_of_range(rate: int) -> None:
    err = _expect("bad_params", _wav_bytes(1, rate, 800))
    assert f"{rate} Hz" in err.message


def test_no_audio_stream(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=duration=0.2:size=32x32:rate=10", "-c:v", "mpeg4", str(video)],
        check=True, capture_output=True, timeout=60,
    )
    err = _expect("unsupported", video.read_bytes())
    assert "no audio stream" in err.message


@pytest.mark.parametrize("name", ["mp3", "ogg_vorbis", "ogg_opus", "webm_opus", "m4a_aac", "flac"])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.7, 0.95])
def test_truncated_file_decodes_prefix_or_fails_cleanly(
    name: str, fraction: float, files: dict[str, Path], reference: np.ndarray
) -> None:
    data = files[name].read_bytes()
    result = _decode_or_error(data[: int(len(data) * fraction)])
    if isinstance(result, AudioError):
        assert result.kind in {"corrupt", "unsupported", "empty"}, result.message
    else:
        assert result.duration_s <= len(reference) / 16000 + 0.1


@pytest.mark.parametrize("name", list(FORMATS))
def test_damaged_bytes_never_escape_as_other_errors(name: str, files: dict[str, Path]) -> None:
    rng = np.random.default_rng(7)
    data = files[name].read_bytes()
    for _ in range(4):
        damaged = bytearray(data)
        start = int(rng.integers(64, len(data) - 600))
        damaged[start : start + 512] = rng.bytes(512)
        result = _decode_or_error(bytes(damaged))
        assert isinstance(result, (DecodedAudio, AudioError))


def test_stream_that_breaks_midway_is_corrupt(files: dict[str, Path]) -> None:
    """FFmpeg's mp3 decoder gives up on garbage mid-stream; the user hears where it broke."""
    data = bytearray(files["mp3"].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 500] = np.random.default_rng(1).bytes(500)
    err = _expect("corrupt", bytes(data))
    assert "after" in err.message and "re-export" in err.message
