"""vLLM general plugin: the engine process exits when the API process that started it dies.

vLLM's EngineCore runs in a child process of the API process. When the API process ends
cleanly it shuts the engine down; when it is SIGKILLed (OOM killer, ``kill -9``, a crashed
supervisor) nothing tells the child, which was seen to live on as an orphan holding ~2 GB and
the model. This plugin gives the engine process a watchdog thread that notices the parent's
death and ends the process: first SIGTERM to itself (vLLM's own handler shuts the engine down
cleanly), then, if it is still alive after a grace period, an immediate exit.

Registered under the ``vllm.general_plugins`` entry point group (pyproject.toml), so vLLM calls
``register`` in every process it builds. It acts only in a process whose parent is the process
named by ``AURA_ENGINE_PARENT_PID`` (``VLLMEngine.start`` exports its own pid before vLLM spawns
its processes, which inherit the environment): the engine core. Anywhere else — the API process
itself, vLLM's worker processes (vLLM already ties those to the engine core), unrelated programs
— it does nothing.

Why a thread polling ``os.getppid()`` and not ``prctl(PR_SET_PDEATHSIG)``: the death signal
fires when the *thread* that spawned the child exits, and vLLM may be started from a worker
thread of the API process; the parent pid changes only when the parent process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

ENTRY_POINT_NAME = "aura_parent_watch"  # its name in pyproject.toml's vllm.general_plugins group
ENV_VAR = "AURA_ENGINE_PARENT_PID"
POLL_S = 0.5
GRACE_S = 10.0  # after SIGTERM: time for vLLM's clean shutdown before the process exits outright

_started = False


def watched_parent() -> int | None:
    """The pid this process must outlive no longer than, or None when this process is not the
    direct child of the AuRA process that exported it."""
    try:
        parent = int(os.environ.get(ENV_VAR, ""))
    except ValueError:
        return None
    if parent == os.getpid() or parent != os.getppid():
        return None
    return parent


def register() -> None:
    """Entry point: start the watchdog thread once, in the engine process only."""
    global _started
    parent = watched_parent()
    if parent is None or _started:
        return
    _started = True
    threading.Thread(target=_watch, args=(parent,), name="aura-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    log.warning("the AuRA API process died: the engine process exits", extra={"parent_pid": parent})
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
