"""Shared pieces of the benchmark scripts: speech clips, percentiles, a streaming client."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from clients import SSE_DONE, AuraError, parse_event

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "What is two plus two?",
    "Which planet is closest to the sun?", "What do bees make?",
    "How many days are in a week?", "What is the largest ocean on Earth?",
    "What animal says moo?", "What is the opposite of hot?",
    "How many hours are in a day?", "What is frozen water called?",
    "Which season comes after winter?", "What is the capital of Italy?",
    "How many wheels does a bicycle have?", "What color are bananas?",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3"]


def make_clips(out: Path, n: int) -> list[Path]:
    """``n`` distinct spoken questions (question x voice), made with espeak-ng once."""
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is needed to make benchmark audio (apt-get install espeak-ng)")
    out.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        q, v = QUESTIONS[i % len(QUESTIONS)], VOICES[(i // len(QUESTIONS)) % len(VOICES)]
        path = out / f"q{i:03d}.wav"
        if not path.exists():
            subprocess.run(["espeak-ng", "-v", v, "-s", "160", "-w", str(path), q], check=True, capture_output=True)
        clips.append(path)
    return clips


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class StreamResult:
    ttft_s: float
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    total_s: float = 0.0


@dataclass
class RunStats:
    results: list[StreamResult]
    wall_s: float

    def summary(self) -> dict[str, float]:
        ttft = [r.ttft_s for r in self.results]
        itl = [x for r in self.results for x in r.itl_s]
        toks = sum(r.tokens for r in self.results)
        return {
            "requests": len(self.results),
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            "output_tok_s": toks / self.wall_s if self.wall_s else float("nan"),
        }


class StreamFailed(Exception):
    """A streamed request that did not end in ``[DONE]``; ``reason`` is a short tally key."""

    def __init__(self, reason: str, status: int = 0, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


async def stream_http(client: httpx.AsyncClient, wav: bytes, adapter: str | None, max_tokens: int,
                      headers: dict[str, str] | None = None) -> StreamResult:
    """One streamed /v1/audio/chat request, timed per token; raises :class:`StreamFailed`."""
    data = {"stream": "true", "max_tokens": str(max_tokens), "return_token_ids": "true"}
    if adapter:
        data["adapter"] = adapter
    t0 = time.perf_counter()
    first = last = None
    itl: list[float] = []
    tokens = 0
    done = False
    async with client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)}, data=data,
                             headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            raise StreamFailed(f"http_{r.status_code}", r.status_code, float(r.headers.get("retry-after", "0")))
        async for line in r.aiter_lines():
            if line == SSE_DONE:
                done = True
                continue
            try:
                chunk = parse_event(line)
            except AuraError as e:
                raise StreamFailed(f"stream_{e.code}") from None
            if chunk is None:
                continue
            n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.append((now - last) / n)
            last = now
            tokens += n
    if not done:
        raise StreamFailed("stream_truncated")
    end = time.perf_counter()
    return StreamResult(ttft_s=(first or end) - t0, itl_s=itl, tokens=tokens, total_s=end - t0)


def wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, *, path: str = "/ready",
                     timeout: float = 300.0) -> None:
    """Poll ``url + path`` until it answers 200; a process that exits first, or a timeout, ends the
    benchmark with the tail of its log (a benchmark against a server that never came up is no run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"server not ready after {timeout:.0f} s: see {log_path}")


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"
