"""Structured, quiet-by-default logging with the request id on every line of a request."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
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
        msg = str(record.msg)
        return not any(s in msg for s in BENIGN_VLLM_WARNINGS)


def vllm_logging_config(level: str, fmt: str) -> dict[str, object]:
    """A ``logging.dictConfig`` for vLLM's ``vllm`` logger — in this process and in the engine
    processes it spawns, which read it from ``VLLM_LOGGING_CONFIG_PATH`` — that writes through our
    formatter: one log format on stderr, vLLM's info lines only with ``--log-level debug``."""
    debug = level.upper() == "DEBUG"
    formatter = "server.logs.JsonFormatter" if fmt == "json" else "server.logs.TextFormatter"
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"aura": {"()": formatter}},
        "filters": {"benign": {"()": "server.logs.BenignVllmWarnings", "keep_all": debug}},
        "handlers": {"aura": {"class": "logging.StreamHandler", "formatter": "aura", "filters": ["benign"],
                              "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["aura"], "level": "DEBUG" if debug else "WARNING", "propagate": False}},
    }


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
    for name in ("server", "adapters", "aura"):
        logging.getLogger(name).setLevel(level.upper())
    # Python warnings (deprecations in dependencies) become log lines too; vLLM's own are noise here.
    logging.captureWarnings(True)
    if level.upper() != "DEBUG":
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
    # vLLM configures its own logger when imported (here and in its engine processes): hand it ours.
    fd, path = tempfile.mkstemp(prefix="aura-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(vllm_logging_config(level, fmt), f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = path
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    logging.getLogger("vllm").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
