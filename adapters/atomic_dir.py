"""Write a whole folder so that readers see either the old one or the finished new one, never half.

Adapters (``save_adapter``) and converted demo models (``adapters.provision``) are folders of
several files that only make sense together; a killed writer must not leave something that
looks finished. The folder is built under a hidden name next to the target (same filesystem, so
``rename`` is atomic), flushed to disk, and renamed into place only when the block succeeds.
The hidden name carries the writer's pid, so :func:`remove_stale_partials` can tell the leftovers
of a dead writer from the work of a live one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool, shared: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``out_dir`` only if the block succeeds.

    ``overwrite`` off: an existing ``out_dir`` is an error, also when another process finished
    the same target meanwhile (its result wins, ours is dropped). ``shared``: publish the folder
    readable by every user (0755/0644: a model cache read by a server account or a container);
    otherwise it keeps ``mkdtemp``'s owner-only 0700.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        if shared:
            for path in tmp.rglob("*"):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            os.chmod(tmp, 0o755)
        _fsync_tree(tmp)
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} appeared while it was being written (another process?)")
            trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, trash)
            os.rename(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the hidden folders that writers of ``out_dir`` left when their process died (same
    host only); folders of live processes are kept, another process may be writing right now.
    Returns what was removed."""
    if not out_dir.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)-")
    removed = []
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename, so a crash cannot publish a folder of empty files."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
