"""Real speech for tests, made on the spot with espeak-ng and ffmpeg.

Synthetic sines say little about a speech front end; a spoken sentence exercises silence,
voicing and sibilants, and generating it keeps binary fixtures out of the repository. Import
as ``from audio_helpers import speak, convert`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def speak(text: str, path: str | Path, voice: str = "en-us", speed: int = 150) -> Path:
    """Synthesise ``text`` to a WAV at ``path`` (espeak-ng's native 22050 Hz mono)."""
    path = Path(path)
    subprocess.run(
        [_tool("espeak-ng"), "-v", voice, "-s", str(speed), "-w", str(path), text],
        check=True, capture_output=True, timeout=60,
    )
    return path


def convert(src: str | Path, dst: str | Path, *ffmpeg_args: str) -> Path:
    """Transcode ``src`` to ``dst`` with ffmpeg; the output container follows ``dst``'s suffix
    unless ``ffmpeg_args`` names one (e.g. ``"-f", "ogg"``)."""
    dst = Path(dst)
    subprocess.run(
        [_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-i", str(src), *ffmpeg_args, str(dst)],
        check=True, capture_output=True, timeout=120,
    )
    return dst
