"""Start and stop a real ``aura serve`` process on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    url: str
    proc: subprocess.Popen
    log: Path


def start_server(args: list[str], home: Path, log: Path, *, env: dict[str, str] | None = None,
                 timeout: float = 300.0) -> ServerProc:
    port = free_port()
    full_env = {**os.environ, "AURA_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-format", "text", *args],
        cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return ServerProc(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_server(server: ServerProc) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
