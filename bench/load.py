"""Load test: many concurrent streaming clients, mixed adapters, bounded in time and count.

    python -m bench.load --url http://127.0.0.1:8000 --clients 64 --duration 180 --adapters alpha,beta

Loopback only (refuses other hosts); stops by itself after ``--duration`` seconds or
``--max-requests`` requests, whichever comes first. Reports: requests served, errors other than
the deliberate 429s (backpressure, which clients honour via Retry-After), TTFT and ITL p50/p99,
and the server's RSS over the run (``process_resident_memory_bytes`` from /metrics, i.e. the API
server process; ``--pid`` adds its children, the vLLM engine core, via psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from bench.common import StreamFailed, make_clips, pct, stream_http

_RSS = re.compile(r"^process_resident_memory_bytes ([0-9.e+]+)$", re.M)


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    served: int = 0
    tokens: int = 0
    throttled: int = 0
    errors: Counter = field(default_factory=Counter)
    rss: list[tuple[float, float, float]] = field(default_factory=list)  # (t, API server bytes, total bytes)


async def one_request(client: httpx.AsyncClient, wav: bytes, adapter: str, max_tokens: int, tally: Tally,
                      tenant: str) -> float:
    """One streamed request; returns how long to back off (Retry-After on 429, else 0)."""
    try:
        result = await stream_http(client, wav, adapter, max_tokens, headers={"X-Tenant": tenant})
    except StreamFailed as e:
        if e.status == 429:
            tally.throttled += 1
            return e.retry_after or 1.0
        tally.errors[e.reason] += 1
        return 0.5
    except httpx.HTTPError as e:
        tally.errors[type(e).__name__] += 1
        return 0.5
    tally.served += 1
    tally.tokens += result.tokens
    if result.tokens:
        tally.ttft.append(result.ttft_s)
    tally.itl.extend(result.itl_s)
    return 0.0


async def server_rss(client: httpx.AsyncClient, pid: int | None) -> tuple[float, float] | None:
    """(API server process RSS, RSS of it plus its children — the vLLM engine core and worker)."""
    if pid is not None:
        import psutil

        try:
            p = psutil.Process(pid)
            main = float(p.memory_info().rss)
            return main, main + float(sum(x.memory_info().rss for x in p.children(recursive=True)))
        except psutil.Error:
            return None
    try:
        m = _RSS.search((await client.get("/metrics", timeout=10)).text)
    except httpx.HTTPError:
        return None
    return (float(m.group(1)), float("nan")) if m else None


async def run(args: argparse.Namespace) -> dict:
    clips = [p.read_bytes() for p in make_clips(Path(args.clips), args.num_clips)]
    adapters = args.adapters.split(",")
    tally = Tally()
    stop_at = time.monotonic() + args.duration
    issued = 0
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.request_timeout, limits=limits) as client:
        t_start = time.monotonic()

        async def client_loop(i: int) -> None:
            nonlocal issued
            tenant = f"tenant-{i % args.tenants}"
            while time.monotonic() < stop_at and issued < args.max_requests:
                issued += 1
                backoff = await one_request(client, rng.choice(clips), rng.choice(adapters), args.max_tokens,
                                            tally, tenant)
                if backoff:
                    await asyncio.sleep(min(backoff, max(0.0, stop_at - time.monotonic())))

        async def sampler() -> None:
            while time.monotonic() < stop_at and issued < args.max_requests:
                rss = await server_rss(client, args.pid)
                if rss is not None:
                    tally.rss.append((time.monotonic() - t_start, *rss))
                await asyncio.sleep(args.rss_every)

        rss0 = await server_rss(client, args.pid)
        if rss0 is not None:
            tally.rss.append((0.0, *rss0))
        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(i) for i in range(args.clients)))
        wall = time.monotonic() - t_start
        sampling.cancel()
        rss1 = await server_rss(client, args.pid)
        if rss1 is not None:
            tally.rss.append((wall, *rss1))

    def mb(x: float) -> float:
        return round(x / 2**20, 1)

    api = [a for _, a, _ in tally.rss]
    total = [t for _, _, t in tally.rss]
    return {
        "clients": args.clients, "adapters": adapters, "max_tokens": args.max_tokens, "wall_s": round(wall, 1),
        "requests_served": tally.served, "throttled_429": tally.throttled,
        "errors": dict(tally.errors), "errors_total": sum(tally.errors.values()),
        "requests_per_s": round(tally.served / wall, 2), "output_tok_s": round(tally.tokens / wall, 1),
        "ttft_p50_ms": round(pct(tally.ttft, 50) * 1e3, 1), "ttft_p99_ms": round(pct(tally.ttft, 99) * 1e3, 1),
        "itl_p50_ms": round(pct(tally.itl, 50) * 1e3, 2), "itl_p99_ms": round(pct(tally.itl, 99) * 1e3, 2),
        "api_rss_start_mb": mb(api[0]) if api else None, "api_rss_end_mb": mb(api[-1]) if api else None,
        "api_rss_max_mb": mb(max(api)) if api else None,
        "api_rss_growth_mb": mb(api[-1] - api[0]) if api else None,
        "total_rss_start_mb": mb(total[0]) if total else None, "total_rss_end_mb": mb(total[-1]) if total else None,
        "total_rss_growth_mb": mb(total[-1] - total[0]) if total else None,
        "rss_source": "psutil (API server; + engine children)" if args.pid else "/metrics process_resident_memory_bytes",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=180.0, help="seconds (the run stops by itself)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after issuing this many")
    p.add_argument("--adapters", default="default", help="comma-separated adapter names, picked at random")
    p.add_argument("--tenants", type=int, default=4, help="clients spread over this many X-Tenant values")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--clips", default=".cache/bench-clips")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--rss-every", type=float, default=5.0)
    p.add_argument("--pid", type=int, help="server pid: RSS of it and its children via psutil")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing to load-test {host}: loopback only")
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
