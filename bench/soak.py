"""Soak: N streaming clients against one server for a long time, RSS of every process sampled.

    python -m bench.soak --minutes 30 --clients 64                 # demo model, its own server
    python -m bench.soak --minutes 3 --clients 16 --tiny           # tiny random model (smoke run)
    python -m bench.soak --url http://127.0.0.1:8000 --pid PID ... # a server you started

The question it answers: does memory stay flat once warm? A leak per request (a cache keyed by
request, a label per adapter version, an unreleased lease) shows as a slope in the API server's
RSS; the engine core and its worker are sampled separately, because vLLM's KV cache and LoRA
slots are allocated up front and should not move at all. Every ``--sample-s`` seconds (default:
each minute) the RSS of the API process and of each child process is recorded; the run prints a
table (one row per sample, one column per process) and a summary line with the growth after the
warm-up (the first sample after ``--warmup-s``) — the number to watch.

The clients are :mod:`bench.load`'s (streamed requests, Retry-After honoured on 429). Loopback
only; the run stops by itself after ``--minutes``.
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

from bench.common import make_clips, pct
from bench.load import Tally, one_request

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def process_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of the API process and every descendant, keyed by a short role name."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            name = "api" if p.pid == pid else _role(p)
            rss = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        key, n = name, 2
        while key in out:
            key, n = f"{name}#{n}", n + 1
        out[key] = round(rss, 1)
    return out


def _role(p) -> str:
    """vLLM names its processes (setproctitle): VLLM::EngineCore, VLLM::Worker...; else the command."""
    name = p.name()
    if name.startswith("VLLM") or "Engine" in name or "Worker" in name:
        return name.replace("VLLM::", "")
    cmd = " ".join(p.cmdline()[:3])
    if "multiprocessing" in cmd or "spawn" in cmd:
        return "mp-child"
    return name[:24]


def start_server(args: argparse.Namespace, work: Path):
    """``aura serve`` on a free loopback port (the tests' launcher); returns its ServerProc."""
    sys.path.insert(0, str(ROOT / "tests"))
    from launch import start_server as launch

    cmd = ["--log-level", "WARNING", "--max-num-seqs", str(args.max_num_seqs)]
    if args.tiny:
        from adapters.adapter import init_adapter
        from tiny_models import make_tiny_llama, save_smollm2_tokenizer

        llm = make_tiny_llama(work / "llm", save_smollm2_tokenizer(work / "tokenizer"))
        adapter = init_adapter(llm, work / "alpha", rank=8, seed=1, lora_init_std=0.05, conv_channels=64)
        cmd += ["--model", str(llm), "--dtype", "float32", "--max-model-len", "1024", "--adapter", f"alpha={adapter}"]
    elif args.model:
        cmd += ["--model", str(args.model)]
    home = args.home or work / "home"
    home.mkdir(parents=True, exist_ok=True)
    return launch(cmd, home, work / "server.log", timeout=600)


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict:
    clips = [p.read_bytes() for p in make_clips(Path(args.clips), args.num_clips)]
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        models = (await c.get("/v1/models")).json()["data"]
    adapters = args.adapters.split(",") if args.adapters else [m["id"] for m in models if m.get("kind") == "adapter"]
    tally = Tally()
    rng = random.Random(args.seed)
    samples: list[tuple[float, int, dict[str, float]]] = []
    t_start = time.monotonic()
    stop_at = t_start + args.minutes * 60
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:

        async def client_loop(i: int) -> None:
            while time.monotonic() < stop_at:
                backoff = await one_request(client, rng.choice(clips), rng.choice(adapters), args.max_tokens,
                                            tally, f"tenant-{i % 4}")
                if backoff:
                    await asyncio.sleep(min(backoff, max(0.0, stop_at - time.monotonic())))

        async def sampler() -> None:
            while True:
                samples.append((time.monotonic() - t_start, tally.served, process_rss(pid)))
                log(f"  t={samples[-1][0]:6.0f} s  served={tally.served:6d}  rss={samples[-1][2]}")
                await asyncio.sleep(args.sample_s)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(i) for i in range(args.clients)))
        sampling.cancel()
        if time.monotonic() - t_start - samples[-1][0] > 1.0:
            samples.append((time.monotonic() - t_start, tally.served, process_rss(pid)))
    wall = time.monotonic() - t_start
    roles = sorted({k for _, _, r in samples for k in r}, key=lambda k: (k != "api", k))
    warm = next((s for s in samples if s[0] >= args.warmup_s), samples[-1])
    last = samples[-1]
    growth = {k: round(last[2].get(k, float("nan")) - warm[2].get(k, float("nan")), 1) for k in roles}
    return {
        "clients": args.clients, "minutes": args.minutes, "adapters": adapters, "wall_s": round(wall, 1),
        "requests_served": tally.served, "throttled_429": tally.throttled, "errors": dict(tally.errors),
        "ttft_p50_ms": round(pct(tally.ttft, 50) * 1e3, 1), "ttft_p99_ms": round(pct(tally.ttft, 99) * 1e3, 1),
        "roles": roles, "samples": [{"t_s": round(t, 1), "served": n, "rss_mb": r} for t, n, r in samples],
        "warmup_s": args.warmup_s, "growth_after_warmup_mb": growth,
    }


def print_table(result: dict) -> None:
    roles = result["roles"]
    head = f"{'t (s)':>7} {'served':>7} " + " ".join(f"{r[:16]:>16}" for r in roles) + f" {'total':>9}"
    print(head)
    print("-" * len(head))
    for s in result["samples"]:
        vals = [s["rss_mb"].get(r) for r in roles]
        total = sum(v for v in vals if v is not None)
        cells = " ".join(f"{v:>16.1f}" if v is not None else f"{'-':>16}" for v in vals)
        print(f"{s['t_s']:>7.0f} {s['served']:>7d} {cells} {total:>9.1f}")
    print(f"RSS growth after warm-up ({result['warmup_s']:g} s), MiB: {result['growth_after_warmup_mb']}")
    print(f"served {result['requests_served']} requests in {result['wall_s']} s; 429s {result['throttled_429']}; "
          f"errors {result['errors'] or 0}; TTFT p50 {result['ttft_p50_ms']} ms, p99 {result['ttft_p99_ms']} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=60.0, help="RSS sampling period (default: each minute)")
    p.add_argument("--warmup-s", type=float, default=60.0, help="growth is measured from the first sample after this")
    p.add_argument("--url", help="a running server (loopback); needs --pid. Default: start one")
    p.add_argument("--pid", type=int, help="the API server's pid (its children are sampled too)")
    p.add_argument("--tiny", action="store_true", help="start the server on the tests' tiny random model")
    p.add_argument("--model", type=Path, help="start the server on this model (default: the demo model)")
    p.add_argument("--home", type=Path, help="AURA_HOME for a started server (default: a temp folder)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--adapters", help="comma-separated adapter names (default: every adapter the server lists)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--clips", default=".cache/bench-clips")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if args.url and not args.pid:
        p.error("--url needs --pid (RSS is read from the processes)")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("loopback only")
    srv = None
    with tempfile.TemporaryDirectory(prefix="aura-soak-") as tmp:
        work = Path(tmp)
        if args.url:
            url, pid = args.url, args.pid
        else:
            log("starting the server ...")
            srv = start_server(args, work)
            url, pid = srv.url, srv.proc.pid
        try:
            result = asyncio.run(soak(url, pid, args))
        finally:
            if srv is not None:
                from launch import stop_server

                stop_server(srv)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
