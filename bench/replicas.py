"""Scale-out on Ray Serve: 1 vs 2 model replicas, adapter-affinity routing vs Serve's default routing.

    python -m bench.replicas [--adapters 20] [--concurrency 16] [--requests 160] [--max-loras 4]

Starts ``aura serve --replicas N`` three times on the tiny test model (one local Ray cluster each,
one after the other): 1 replica; 2 replicas with adapter affinity (Serve model multiplexing, the
default); 2 replicas with ``--no-replica-affinity`` (Serve's default power-of-two routing). Each
run streams the same spoken questions over the same random sequence of ``--adapters`` adapters
at ``--concurrency`` and reports requests/s, TTFT p50/p99 and the share of requests that made a
replica load an adapter (first use, or again after its LRU evicted it; from ``GET /v1/adapters``).
Prints one JSON object; progress goes to stderr. On a 2-core machine two replicas share the same
two cores, so requests/s cannot double: read the load share and TTFT tail, not the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import RunStats, StreamFailed, StreamResult, machine, make_clips, stream_http
from bench.hot_swap import make_adapters

ROOT = Path(__file__).resolve().parent.parent

CONFIGS: list[tuple[str, list[str]]] = [
    ("1 replica", ["--replicas", "1"]),
    ("2 replicas, adapter affinity", ["--replicas", "2"]),
    ("2 replicas, default routing", ["--replicas", "2", "--no-replica-affinity"]),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def load_phase(url: str, clips: list[bytes], names: list[str], order: list[int], concurrency: int,
                     max_tokens: int) -> tuple[RunStats, int, dict[str, int]]:
    sem = asyncio.Semaphore(concurrency)
    failures: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> StreamResult | None:
            async with sem:
                try:
                    return await stream_http(client, clips[i % len(clips)], names[order[i]], max_tokens)
                except StreamFailed as e:
                    failures[e.reason] = failures.get(e.reason, 0) + 1
                    return None

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(len(order))))
        wall = time.perf_counter() - t0
        listing = (await client.get("/v1/adapters")).json()
    loads = sum(r["loads"] for r in listing["replicas"])
    return RunStats([r for r in results if r is not None], wall), loads, failures


def run_config(label: str, flags: list[str], model: Path, adapters: list[Path], work: Path, clips: list[bytes],
               order: list[int], args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from launch import start_server, stop_server

    names = [p.name for p in adapters]
    cli = [*flags, "--model", str(model), "--dtype", "float32", "--max-model-len", "1024",
           "--cpu-kv-cache-gib", "0.25", "--max-loras", str(args.max_loras), "--ray-num-cpus", "2",
           "--log-level", "WARNING", "--no-log-requests"]
    for name, path in zip(names, adapters):
        cli += ["--adapter", f"{name}={path}"]
    home = work / f"home-{len(label)}-{abs(hash(label)) % 10000}"
    home.mkdir(parents=True, exist_ok=True)
    log(f"{label}: starting")
    t0 = time.perf_counter()
    srv = start_server(cli, home, home / "cluster.log", timeout=900)
    log(f"{label}: ready in {time.perf_counter() - t0:.0f} s; {len(order)} requests at c={args.concurrency}")
    try:
        stats, loads, failures = asyncio.run(load_phase(srv.url, clips, names, order, args.concurrency,
                                                        args.max_tokens))
    finally:
        stop_server(srv)
    s = stats.summary()
    out = {"requests": len(order), "ok": len(stats.results), "failures": failures,
           "req_per_s": round(len(stats.results) / stats.wall_s, 2),
           "ttft_p50_ms": round(s["ttft_p50_ms"]), "ttft_p99_ms": round(s["ttft_p99_ms"]),
           "output_tok_s": round(s["output_tok_s"], 1), "adapter_loads": loads,
           "load_share": round(loads / len(order), 3)}
    log(f"{label}: {json.dumps(out)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=4, help="adapters one replica holds (engine slots, multiplexing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, nargs="*", help="run only these configs (0, 1, 2)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="aura-bench-replicas-"))
    model, adapters = make_adapters(None, work, args.adapters)
    clips = [c.read_bytes() for c in make_clips(ROOT / ".cache" / "bench-clips", 16)]
    rng = random.Random(args.seed)
    order = [rng.randrange(args.adapters) for _ in range(args.requests)]
    results = {}
    for i, (label, flags) in enumerate(CONFIGS):
        if args.only is None or i in args.only:
            results[label] = run_config(label, flags, model, adapters, work, clips, order, args)
    print(json.dumps({"machine": machine(), "model": "tiny random Llama (tests/tiny_models.py), fp32",
                      "adapters": args.adapters, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                      "max_loras": args.max_loras, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
