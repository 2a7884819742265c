"""espeak-ng voices for the spoken corpus: every English accent x every voice variant, split so
held-out clips are spoken by voices training never heard.

A voice is ``accent+variant`` (``en-gb-scotland+f3``, ``en-us+croak``) plus a speed (words per
minute) and a pitch (0-99). The held-out split owns whole variants: no held-out variant is used
in training with any accent, so a held-out clip's timbre is new to the adapter, not just its
accent/variant combination.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SPEED_RANGE = (125, 210)  # words per minute; espeak-ng's default is 175
PITCH_RANGE = (20, 80)
# mbrola voices need the separate mbrola binary and databases; gmw/ are espeak-ng's own.
_OWN_VOICE_FILE = re.compile(r"^gmw/")


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    return exe


@lru_cache(maxsize=1)
def english_accents() -> tuple[str, ...]:
    """espeak-ng's own English voices (``espeak-ng --voices=en``, mbrola ones left out)."""
    out = subprocess.run([espeak_binary(), "--voices=en"], capture_output=True, text=True, check=True, timeout=30).stdout
    names = []
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and _OWN_VOICE_FILE.match(cols[4]) and cols[1].startswith("en") and cols[1] not in names:
            names.append(cols[1])
    if not names:
        raise RuntimeError("espeak-ng lists no English voices")
    return tuple(names)


@lru_cache(maxsize=1)
def variants() -> tuple[str, ...]:
    """Every voice variant file of the installed espeak-ng (``voices/!v``)."""
    out = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    m = re.search(r"Data at:\s*(\S+)", out)
    vdir = Path(m.group(1)) / "voices" / "!v" if m else None
    if vdir is None or not vdir.is_dir():
        return ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "whisper")
    return tuple(sorted(p.name for p in vdir.iterdir() if p.is_file() and re.fullmatch(r"[A-Za-z0-9_]+", p.name)))


def split_variants(heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) variants by a hash of the name: stable when espeak-ng adds variants.

    ``""`` (no variant, the accent's own voice) always trains. Held-out always gets at least one
    male- and one female-sounding standard variant, so its voices are not all oddities.
    """
    train, held = [""], []
    for v in variants():
        h = int(hashlib.sha256(f"{seed}:{v}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < heldout_fraction else train).append(v)
    for must in ("m3", "f4"):
        if must in train and must in variants():
            train.remove(must)
            held.append(must)
    return train, sorted(held)


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    speed: int
    pitch: int

    @property
    def name(self) -> str:
        return self.accent + (f"+{self.variant}" if self.variant else "")


def sample_voice(rng: random.Random, accents: list[str] | tuple[str, ...], variant_pool: list[str]) -> Voice:
    return Voice(rng.choice(list(accents)), rng.choice(variant_pool), rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE))


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by FFT (numpy only; torchaudio does not load with the CPU torch)."""
    if rate_in == rate_out or len(x) == 0:
        return x.astype(np.float32)
    n_out = max(1, int(round(len(x) * rate_out / rate_in)))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, n_out) * (n_out / len(x))).astype(np.float32)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        ch = w.getnchannels()
        if ch > 1:
            data = data.reshape(-1, ch).mean(1)
        return data, w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    """16-bit mono PCM, written to a temp name and renamed so a killed build leaves no torn clip."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    tmp.replace(path)


def speak(text: str, voice: Voice, *, sample_rate: int = 16000) -> np.ndarray:
    """espeak-ng speech for ``text`` in ``voice``, mono float32 at ``sample_rate``."""
    with tempfile.TemporaryDirectory(prefix="aura-tts-") as d:
        wav = Path(d) / "a.wav"
        subprocess.run([espeak_binary(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(wav), text],
                       check=True, capture_output=True, timeout=60)
        x, rate = read_wav(wav)
    return resample(x, rate, sample_rate)
