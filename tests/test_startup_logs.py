"""What a user sees on a default start: a handful of our structured lines, nothing raw.

vLLM, torch, transformers and safetensors each print on their own at start-up (progress bars,
``print``-style warnings from C++, tracebacks of optional imports). The server routes what is
worth reading through its own JSON logger and keeps the rest for ``--log-level debug``. These
tests read the whole stdout+stderr of a real ``aura serve`` (with its vLLM engine process), from
the first line to the drained exit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import start_server, stop_server
from server.logs import BENIGN_VLLM_WARNINGS

MAX_DEFAULT_LINES = 12  # "a handful": engine up, adapters, open-mode warning, ready, drain


def _args(tiny) -> list[str]:
    args = ["--model", str(tiny.llm), "--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "1024"]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args


def _run(tiny, home: Path, extra: list[str]) -> list[str]:
    log = home / "server.log"
    srv = start_server([*_args(tiny), "--log-format", "json", *extra], home, log)
    stop_server(srv)
    assert srv.proc.returncode == 0, log.read_text()[-3000:]
    return [line for line in log.read_text().splitlines() if line.strip()]


def _structured(line: str) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and {"ts", "level", "logger", "msg"} <= obj.keys() else None


@pytest.fixture(scope="module")
def default_lines(tiny, tmp_path_factory) -> list[str]:
    return _run(tiny, tmp_path_factory.mktemp("quiet"), [])


def test_default_start_prints_only_a_handful_of_structured_lines(default_lines):
    raw = [line for line in default_lines if _structured(line) is None]
    assert not raw, "raw output on a default start:\n" + "\n".join(raw[:20])
    assert len(default_lines) <= MAX_DEFAULT_LINES, "\n".join(default_lines)
    records = [_structured(line) for line in default_lines]
    assert {r["level"] for r in records} <= {"info", "warning"}, records
    benign = [r["msg"] for r in records if any(b in r["msg"] for b in BENIGN_VLLM_WARNINGS)]
    assert not benign, f"warnings kept for --log-level debug were shown: {benign}"


def test_debug_start_shows_what_the_default_hides(tiny, default_lines, tmp_path_factory):
    lines = _run(tiny, tmp_path_factory.mktemp("debug"), ["--log-level", "debug"])
    loggers = {r["logger"] for r in map(_structured, lines) if r is not None}
    assert any(name.startswith("vllm") for name in loggers), loggers
    assert len(lines) > 2 * len(default_lines)
