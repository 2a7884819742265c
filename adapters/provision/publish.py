"""What every demo-model converter shares: stage messages, the provenance record, config fixes.

A converted folder is published whole (:func:`adapters.atomic_dir.atomic_dir`) with
:data:`PROVENANCE_FILE` written last: what it came from and how, so a folder can be traced back
to its source file and a finished conversion told apart from anything else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapters.adapter import sha256_file

logger = logging.getLogger(__name__)

# Marker written last into every converted folder: what it came from and how, so that a folder
# can be traced back to its source file (and a different source can be told apart).
PROVENANCE_FILE = "aura_conversion.json"

# Loader bookkeeping that transformers 5 writes into tokenizer_config.json; meaningless elsewhere.
TOKENIZER_CONFIG_LEFTOVERS = ("gguf_file", "name_or_path", "is_local", "local_files_only")


def say(message: str, progress: bool) -> None:
    """Report a stage so that a user waiting on 2 cores sees what is happening.

    Goes through ``logging`` when the application configured it; otherwise (a bare script or a
    REPL, where INFO would be swallowed) and only when ``progress`` is on, straight to stderr
    through tqdm so that it does not tear a progress bar.
    """
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    elif progress:
        tqdm.write(f"[aura] {message}", file=sys.stderr)
    else:
        logger.debug(message)


def write_provenance(folder: Path, *, kind: str, source: Path, files: list[Path], extra: dict[str, Any]) -> None:
    record = {
        "converter": f"adapters.provision.{kind}",
        "source": str(source),
        "source_files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def patch_config_json(path: Path, *, drop: tuple[str, ...], set_: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(set_)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own bars (GGUF de-quantizing); silence them with ours."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
