"""Structured, quiet-by-default logging with the request id on every line of a request."""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import os
import tempfile
import time
import warnings

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_") and not (k == "vllm_process_name" and v == "MainProcess"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")
                  and not (k == "vllm_process_name" and v == "MainProcess")}
        rid = request_id_var.get()
        head = time.strftime("%H:%M:%S", time.localtime(record.created))
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        line = f"{head} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if rid:
            line += f" request_id={rid}"
        if tail:
            line += f" {tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# vLLM start-up warnings that say nothing actionable on this deployment (CPU build without
# Triton or tcmalloc, eager mode chosen on purpose, the shutdown's process reaping). Shown with
# --log-level debug; every other vLLM warning and error is shown as one of our lines.
BENIGN_VLLM_WARNINGS = (
    "Triton is not installed", "requires Triton", "libtcmalloc is not found", "libiomp is not found",
    "Enforce eager set", "Inductor compilation was disabled", "Reset SSM cache type",
    "different tokenizers for different LoRAs", "Process manager: force killing", "force killing sub process",
    "leaked shared_memory", "doesn't include CPU backend", "workers still running after grace period",
)


class BenignVllmWarnings(logging.Filter):
    """Drops :data:`BENIGN_VLLM_WARNINGS` unless vLLM logs at DEBUG."""

    def __init__(self, keep_all: bool = False) -> None:
        super().__init__()
        self.keep_all = keep_all

    def filter(self, record: logging.LogRecord) -> bool:
        if self.keep_all or record.levelno > logging.WARNING:
            return True
        try:
            msg = record.getMessage()  # vLLM often logs "%s is not found ..." with args
        except (TypeError, ValueError):
            msg = str(record.msg)
        return not any(s in msg for s in BENIGN_VLLM_WARNINGS)


def logging_config(level: str, fmt: str) -> dict[str, object]:
    """The one ``logging.dictConfig`` of every AuRA process: ours (``server``, ``adapters`` at
    ``level``), vLLM's (``vllm``: warnings and errors only, :data:`BENIGN_VLLM_WARNINGS` dropped;
    everything with ``--log-level debug``) and everyone else's (root: warnings and errors), all
    through our formatter on stderr. vLLM applies the same file in its engine processes
    (``VLLM_LOGGING_CONFIG_PATH``)."""
    debug = level.upper() == "DEBUG"
    formatter = "server.logs.JsonFormatter" if fmt == "json" else "server.logs.TextFormatter"
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"aura": {"()": formatter}},
        "filters": {"benign": {"()": "server.logs.BenignVllmWarnings", "keep_all": debug}},
        "handlers": {
            "aura": {"class": "logging.StreamHandler", "formatter": "aura", "stream": "ext://sys.stderr"},
            "aura_vllm": {"class": "logging.StreamHandler", "formatter": "aura", "filters": ["benign"],
                          "stream": "ext://sys.stderr"},
        },
        "root": {"handlers": ["aura"], "level": "DEBUG" if debug else "WARNING"},
        "loggers": {
            "vllm": {"handlers": ["aura_vllm"], "level": "DEBUG" if debug else "WARNING", "propagate": False},
            **{name: {"level": level.upper()} for name in ("server", "adapters", "aura")},
        },
    }


# How a process that vLLM spawns learns the log settings before its first import logs anything
# (see :func:`setup_child_logging`): "<level>:<format>".
CHILD_ENV = "AURA_PROCESS_LOGGING"


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure this process, and leave what the processes it spawns need in the environment."""
    _apply(level, fmt)
    # vLLM configures its own logger in its engine processes: hand it ours.
    fd, path = tempfile.mkstemp(prefix="aura-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(logging_config(level, fmt), f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    os.environ[CHILD_ENV] = f"{level.upper()}:{fmt}"
    if level.upper() != "DEBUG":
        # What speaks below Python's logging in child processes, quiet unless debugging: torch's C++
        # warnings (the CPU worker's "NUMA binding" notice) and the multiprocessing resource tracker's
        # shutdown warning about vLLM's shared memory (a process of its own that imports nothing of ours).
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        quiet = "ignore:resource_tracker:UserWarning"
        os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)


def setup_child_logging() -> bool:
    """In a process spawned by multiprocessing from a configured AuRA process (vLLM's engine), apply
    the parent's logging before anything else is imported: vLLM configures logging only after its
    imports, and what they log meanwhile would reach stderr raw. Returns whether it applied."""
    value = os.environ.get(CHILD_ENV, "")
    level, _, fmt = value.partition(":")
    if not level or fmt not in ("json", "text"):
        return False
    _apply(level, fmt)
    return True


def _apply(level: str, fmt: str) -> None:
    logging.config.dictConfig(logging_config(level, fmt))
    # Python warnings (deprecations in dependencies) become log lines too; vLLM's and torch's
    # deprecation notices are noise here unless debugging.
    logging.captureWarnings(True)
    if level.upper() != "DEBUG":
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(vllm|torch)(\.|$)")
