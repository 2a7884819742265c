"""Decode uploaded audio of any container FFmpeg reads into mono float32 at the model's rate.

Decoding runs in-process with PyAV rather than by spawning ``ffmpeg``: a subprocess per request
costs tens of milliseconds and a pipe dance, while PyAV decodes from memory and releases the GIL
inside FFmpeg, so a thread pool scales. Every call builds its own container and resampler and
shares no state, which is what makes it safe to call from many threads at once.

Uploads are untrusted: limits are enforced while decoding (a small file can expand to hours of
audio), and every failure leaves as :class:`AudioError` with a ``kind`` the server maps to an
HTTP status and a message that tells the caller what to change.
"""

from __future__ import annotations

import io
import os
import wave
from dataclasses import dataclass
from typing import Literal

import numpy as np

try:
    import av
except ImportError:  # a training image without FFmpeg: PCM WAV files still load (load_audio_file)
    av = None

AudioErrorKind = Literal["too_large", "too_long", "unsupported", "corrupt", "empty", "bad_params"]


class AudioError(Exception):
    """Why an upload cannot be used; ``kind`` is one of :data:`AudioErrorKind`.

    The server turns ``too_large`` into 413, ``unsupported`` into 415 and the rest into 400/422,
    so the kind must describe the input, never an internal fault.
    """

    def __init__(self, message: str, kind: AudioErrorKind) -> None:
        super().__init__(message)
        self.message: str = message
        self.kind: AudioErrorKind = kind

    def __repr__(self) -> str:
        return f"AudioError(kind={self.kind!r}, message={self.message!r})"


@dataclass(frozen=True)
class DecodedAudio:
    """Decoded mono samples plus what the source was, for logs, metrics and usage reporting."""

    samples: np.ndarray
    sample_rate: int
    source_format: str
    source_sample_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words without PyAV's ``: '<none>'`` filename suffix, which means nothing to a caller."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).strip()


def _size(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _check_params(channels: int, rate: int, *, max_channels: int, min_rate: int, max_rate: int) -> None:
    if channels > max_channels:
        raise AudioError(
            f"audio has {channels} channels; at most {max_channels} are accepted: "
            "send mono or stereo audio",
            "bad_params",
        )
    if rate and not min_rate <= rate <= max_rate:
        raise AudioError(
            f"audio sample rate is {rate} Hz; it must be between {min_rate} and {max_rate} Hz: "
            "resample it (16000 Hz is ideal)",
            "bad_params",
        )


# FFmpeg's default probe reads up to 5 MB and analyses 5 s of packets before the first frame;
# for a WAV that is ~7 ms of a ~10 ms decode. Stream parameters of every container we accept
# are in the first few KB, and a stream whose parameters change mid-way is re-checked per frame.
_PROBE_OPTIONS = {"probesize": "8192", "analyzeduration": "0"}


def decode_audio(
    data: bytes,
    *,
    sample_rate: int = 16000,
    max_bytes: int | None = None,
    max_duration_s: float | None = None,
    max_channels: int = 32,
    min_sample_rate: int = 1000,
    max_sample_rate: int = 768000,
) -> DecodedAudio:
    """Decode ``data`` to mono float32 at ``sample_rate``, enforcing the server's limits.

    Limits are checked as early as they can be: size before FFmpeg sees a byte, channel count and
    rate from the stream header and again per frame (they may change mid-stream), and duration
    per decoded frame, so refusing an hour-long upload costs one frame past the limit.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if max_bytes is not None and len(data) > max_bytes:
        raise AudioError(
            f"upload is {_size(len(data))}; the limit is {_size(max_bytes)}: "
            "send a shorter clip or a compressed format (mp3, ogg/opus, m4a)",
            "too_large",
        )
    if not data:
        raise AudioError("the audio upload is empty: send the file's bytes", "empty")
    if av is None:
        raise RuntimeError("decoding needs PyAV (pip install av); only PCM WAV files load without it")

    try:
        container = av.open(io.BytesIO(data), mode="r", options=_PROBE_OPTIONS)
    except av.error.EOFError as exc:
        raise AudioError(
            f"audio file ends before its headers are complete ({_reason(exc)}): "
            "it looks truncated; send the whole file",
            "corrupt",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure to open means FFmpeg cannot read it
        raise AudioError(
            f"not a readable audio file ({_reason(exc)}): send wav, flac, mp3, ogg, webm or m4a",
            "unsupported",
        ) from exc

    try:
        with container:
            return _decode_opened(
                container,
                sample_rate=sample_rate,
                max_duration_s=max_duration_s,
                max_channels=max_channels,
                min_sample_rate=min_sample_rate,
                max_sample_rate=max_sample_rate,
            )
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - header probing or closing failed; still the input's fault
        raise AudioError(
            f"the audio file is damaged ({_reason(exc)}): re-export or re-record it", "corrupt"
        ) from exc


def _decode_opened(
    container: av.container.InputContainer,
    *,
    sample_rate: int,
    max_duration_s: float | None,
    max_channels: int,
    min_sample_rate: int,
    max_sample_rate: int,
) -> DecodedAudio:
    """Demux the first audio stream, resample to mono, and stop at the duration limit."""
    source_format = container.format.name
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise AudioError(
            f"the {source_format} file has no audio stream (found: {', '.join(kinds)}): "
            "send a file with sound",
            "unsupported",
        )
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    _check_params(
        ctx.channels, ctx.sample_rate,
        max_channels=max_channels, min_rate=min_sample_rate, max_rate=max_sample_rate,
    )

    chunks: list[np.ndarray] = []
    resampler: av.AudioResampler | None = None
    resampler_key: tuple[str, str, int] | None = None
    source_rate = ctx.sample_rate
    source_channels = ctx.channels
    decoded_s = 0.0
    seen_frame = False

    def drain(frames: list[av.AudioFrame]) -> None:
        chunks.extend(f.to_ndarray().reshape(-1) for f in frames)

    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                channels = frame.layout.nb_channels
                _check_params(
                    channels, frame.sample_rate,
                    max_channels=max_channels, min_rate=min_sample_rate, max_rate=max_sample_rate,
                )
                if not seen_frame:
                    source_rate, source_channels, seen_frame = frame.sample_rate, channels, True
                decoded_s += frame.samples / frame.sample_rate
                # The epsilon keeps float accumulation from refusing a clip of exactly the limit.
                if max_duration_s is not None and decoded_s > max_duration_s + 1e-6:
                    raise AudioError(_too_long_message(container, max_duration_s), "too_long")
                # Chained oggs and some ADTS streams change format mid-stream; a resampler is
                # configured by its first frame, so start a fresh one after flushing the old.
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                if key != resampler_key:
                    if resampler is not None:
                        drain(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                    resampler_key = key
                # Only samples matter; dropping timestamps keeps a damaged file's odd ones
                # out of the resampler's filter graph.
                frame.pts = None
                drain(resampler.resample(frame))
        if resampler is not None:
            drain(resampler.resample(None))
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types; none may escape
        where = f"after {decoded_s:.2f} s" if seen_frame else "before any sound was decoded"
        raise AudioError(
            f"the {source_format} audio is damaged: decoding failed {where} ({_reason(exc)}): "
            "re-export or re-record the file",
            "corrupt",
        ) from exc

    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError("the audio contains no samples: send a clip with sound in it", "empty")
    return DecodedAudio(
        samples=samples,
        sample_rate=sample_rate,
        source_format=source_format,
        source_sample_rate=int(source_rate),
        source_channels=int(source_channels),
    )


def _too_long_message(container: av.container.InputContainer, limit_s: float) -> str:
    """Quote the header's duration when it has one; decoding stopped at the limit, so it is all we know."""
    if container.duration is not None and container.duration > 0:
        total = container.duration / av.time_base
        if total > limit_s:
            return f"audio is {total:.1f} s long; the limit is {limit_s:g} s: send a shorter clip"
    return f"audio is longer than the {limit_s:g} s limit: send a shorter clip"


def _read_pcm_wav(data: bytes, sample_rate: int) -> DecodedAudio | None:
    """16-bit mono PCM WAV already at ``sample_rate`` (what corpus tools write), read without FFmpeg.

    FFmpeg's conversion of such a file is exactly ``int16 / 32768`` (no resampling, one channel),
    so this gives the same samples; anything else returns None and takes the FFmpeg path.
    """
    try:
        with wave.open(io.BytesIO(data)) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getcomptype()) != (1, 2, sample_rate, "NONE"):
                return None
            pcm = w.readframes(w.getnframes())
    except (wave.Error, EOFError):
        return None
    if len(pcm) < 2:
        return None
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)
    return DecodedAudio(samples=samples, sample_rate=sample_rate, source_format="wav",
                        source_sample_rate=sample_rate, source_channels=1)


def load_audio_file(path: str | os.PathLike[str], *, sample_rate: int = 16000) -> DecodedAudio:
    """Decode a local file the same way uploads are decoded, so tools and tests see what the server sees.

    Local files are trusted (corpus clips, test fixtures): a plain PCM WAV at the model's rate is
    read directly, several times faster than FFmpeg and with the same samples, which is what lets
    the trainer run on an image without FFmpeg.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    return _read_pcm_wav(data, sample_rate) or decode_audio(data, sample_rate=sample_rate)
