"""Adapter hot swap and many-tenant costs, against a real ``aura serve`` on loopback.

    python -m bench.hot_swap [--model DIR] [--adapters 50 --spread 20 --concurrency 16] [--budget-s 600]

Without ``--model`` it uses a tiny random Llama (the tests' model: real architecture, SmolLM2
tokenizer, random weights), so it measures the serving machinery rather than the model. It makes
``--adapters`` fresh adapters with ``init_adapter``, starts the server with ``--max-loras 4`` and
all adapters registered through a config file, then measures:

1. Hot-swap cost: time from ``POST /v1/adapters`` (replacing an adapter) to the first token of a
   request on the new version; and the inter-token latency p99 of other tenants' streams while a
   load is in progress vs. the same streams with no load happening.
2. Many tenants: ``--requests`` streamed requests spread round-robin over ``--spread`` adapters
   at ``--concurrency`` (more adapters than engine slots, so vLLM's LRU swaps LoRAs in and out),
   vs. the same load on one adapter: throughput and TTFT p50/p99.

Loopback only; the whole run stops after ``--budget-s`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import machine, make_clips, pct, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-admin-key"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_adapters(model: Path | None, work: Path, n: int) -> tuple[Path, list[Path]]:
    from transformers.utils import logging as hf_logging

    from adapters.adapter import init_adapter

    hf_logging.disable_progress_bar()

    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import make_tiny_llama, save_smollm2_tokenizer

        model = work / "llm"
        if not (model / "config.json").exists():
            make_tiny_llama(model, save_smollm2_tokenizer(work / "tokenizer"))
    out = []
    for i in range(n):
        d = work / "adapters" / f"a{i:02d}"
        if not (d / "aura_config.json").exists():
            init_adapter(model, d, rank=8, seed=i + 1, lora_init_std=0.05, conv_channels=64)
        out.append(d)
    return model, out


def start(model: Path, adapters: list[Path], work: Path, max_loras: int,
          max_cpu_loras: int | None = None) -> tuple[subprocess.Popen, str]:
    from server.tenancy import hash_key

    config = {"admin_keys": [hash_key(ADMIN_KEY)],
              "adapters": [{"name": p.name, "source": str(p)} for p in adapters]}
    (work / "aura.yaml").write_text(json.dumps(config))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logf = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(model), "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "32",
         "--max-loras", str(max_loras), "--config", str(work / "aura.yaml"), "--log-format", "text",
         "--log-level", "WARNING", *(["--max-cpu-loras", str(max_cpu_loras)] if max_cpu_loras else [])],
        cwd=ROOT, env={**os.environ, "AURA_HOME": str(work / "home")}, stdout=logf, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, work / "server.log")
    return proc, url


async def stream(client: httpx.AsyncClient, wav: bytes, adapter: str, max_tokens: int,
                 stamps: list[tuple[float, float]] | None = None) -> tuple[float, float, int]:
    """(start, first-token time, tokens); inter-token gaps go to ``stamps`` as (time, gap)."""
    data = {"stream": "true", "max_tokens": str(max_tokens), "return_token_ids": "true", "adapter": adapter}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", "/v1/audio/chat", files={"file": ("q.wav", wav)}, data=data) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            k = sum(len(c.get("token_ids") or []) for c in json.loads(line[6:]).get("choices", []))
            if not k:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            elif stamps is not None:
                stamps.append((now, (now - last) / k))
            last = now
            n += k
    return t0, first or time.perf_counter(), n


async def hot_swap_phase(url: str, clips: list[bytes], adapters: list[Path], swaps: int, window_s: float,
                         background: int) -> dict:
    """Background tenants stream on a01..; meanwhile ``hot`` is replaced ``swaps`` times."""
    stamps: list[tuple[float, float]] = []
    loads: list[tuple[float, float]] = []
    swap_to_first: list[float] = []
    post_s: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=HEADERS) as client:
        r = await client.post("/v1/adapters", json={"name": "hot", "source": str(adapters[0])})
        r.raise_for_status()

        async def tenant(i: int) -> None:
            while not stop.is_set():
                await stream(client, clips[i % len(clips)], adapters[1 + i % 3].name, 64, stamps)

        bg = [asyncio.create_task(tenant(i)) for i in range(background)]
        await asyncio.sleep(2)  # warm up
        t_base0 = time.perf_counter()
        await asyncio.sleep(window_s)  # baseline: no loads
        t_base1 = time.perf_counter()
        for k in range(swaps):
            src = adapters[(k % 2) + 4]
            t0 = time.perf_counter()
            r = await client.post("/v1/adapters", json={"name": "hot", "source": str(src)})
            t1 = time.perf_counter()
            r.raise_for_status()
            loads.append((t0, t1))
            post_s.append(t1 - t0)
            _, first, _ = await stream(client, clips[0], "hot", 4)
            swap_to_first.append(first - t0)
            await asyncio.sleep(window_s / swaps)
        stop.set()
        await asyncio.gather(*bg)
    base = [g for t, g in stamps if t_base0 <= t <= t_base1]
    during = [g for t, g in stamps if any(a <= t <= b for a, b in loads)]
    return {
        "swaps": swaps, "background_streams": background,
        "post_to_first_token_ms_p50": pct(swap_to_first, 50) * 1e3,
        "post_to_first_token_ms_max": max(swap_to_first) * 1e3,
        "post_latency_ms_p50": pct(post_s, 50) * 1e3,
        "itl_p99_ms_no_load": pct(base, 99) * 1e3, "itl_p50_ms_no_load": pct(base, 50) * 1e3,
        "itl_p99_ms_during_load": pct(during, 99) * 1e3, "itl_p50_ms_during_load": pct(during, 50) * 1e3,
        "itl_samples_no_load": len(base), "itl_samples_during_load": len(during),
    }


async def spread_phase(url: str, clips: list[bytes], names: list[str], requests: int, concurrency: int,
                       max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=HEADERS) as client:
        async def one(i: int):
            async with sem:
                return await stream(client, clips[i % len(clips)], names[i % len(names)], max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ttft = [f - s for s, f, _ in res]
    return {"adapters": len(names), "requests": requests, "concurrency": concurrency,
            "req_per_s": requests / wall, "out_tok_per_s": sum(n for *_, n in res) / wall,
            "ttft_ms_p50": pct(ttft, 50) * 1e3, "ttft_ms_p99": pct(ttft, 99) * 1e3, "wall_s": wall}


async def run(args: argparse.Namespace, url: str, clips: list[bytes], adapters: list[Path]) -> dict:
    out: dict = {}
    if "hot_swap" in args.phases:
        log("phase 1: hot swap under load")
        out["hot_swap"] = await hot_swap_phase(url, clips, adapters, args.swaps, args.window_s, args.background)
        log(json.dumps(out["hot_swap"]))
    if "spread" not in args.phases:
        return out
    names = [p.name for p in adapters[: args.spread]]
    await spread_phase(url, clips, names, len(names), args.concurrency, 2)  # touch each once
    log(f"phase 2: {args.requests} requests over {len(names)} adapters vs one, c={args.concurrency}")
    out["one_adapter"] = await spread_phase(url, clips, names[:1], args.requests, args.concurrency, args.max_tokens)
    log(json.dumps(out["one_adapter"]))
    out["spread"] = await spread_phase(url, clips, names, args.requests, args.concurrency, args.max_tokens)
    log(json.dumps(out["spread"]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="base model folder (default: a tiny random Llama)")
    p.add_argument("--work", type=Path, help="where models, adapters and logs go (default: a temp dir)")
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--spread", type=int, default=20)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-cpu-loras", type=int, help="adapters in the engine's host cache (default: the server's)")
    p.add_argument("--phases", nargs="+", choices=("hot_swap", "spread"), default=["hot_swap", "spread"])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--swaps", type=int, default=6)
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--background", type=int, default=4, help="other tenants' concurrent streams in phase 1")
    p.add_argument("--budget-s", type=float, default=600.0, help="hard stop for the whole run")
    args = p.parse_args()
    if args.adapters < max(args.spread, 6):
        sys.exit("--adapters must be at least max(--spread, 6)")

    work = args.work or Path(tempfile.mkdtemp(prefix="aura-bench-hot-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("budget exhausted")))
    signal.alarm(int(args.budget_s))
    t0 = time.perf_counter()
    log(f"making {args.adapters} adapters in {work}")
    model, adapters = make_adapters(args.model, work, args.adapters)
    clips = [c.read_bytes() for c in make_clips(work / "clips", 8)]
    log(f"starting the server (max_loras={args.max_loras}, {len(adapters)} adapters registered)")
    t_start = time.perf_counter()
    proc, url = start(model, adapters, work, args.max_loras, args.max_cpu_loras)
    startup_s = time.perf_counter() - t_start
    try:
        results = asyncio.run(run(args, url, clips, adapters))
    except TimeoutError:
        log("budget exhausted; partial results only")
        results = {}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        signal.alarm(0)
    report = {"machine": machine(), "model": str(args.model or "tiny random Llama (2 layers, hidden 128)"),
              "registered_adapters": len(adapters), "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
              "server_startup_s": round(startup_s, 1), "total_s": round(time.perf_counter() - t0, 1),
              **{k: {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in v.items()}
                 for k, v in results.items()}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
