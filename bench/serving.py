"""Serving latency: the HTTP server vs the same prompts sent straight to vLLM's AsyncLLM.

    python -m bench.serving [--model DIR --adapter NAME=PATH] [--concurrency 1 8 32]

Phase 1 starts ``aura serve`` in a subprocess and streams spoken questions over HTTP at each
concurrency (TTFT, inter-token latency, output tokens/s). Phase 2 stops it and, in-process on the
same settings, runs (a) the served pipeline itself, ``ChatService.run`` (admission, adapter lease,
front end, engine: everything but HTTP), and (b) the engine alone on prompts the service built
(``ChatService.prepare``: same adapter, same audio vectors). server/direct is the server's whole
overhead over the engine, service/direct the pipeline's without HTTP. It also reports what the
audio front end (decode + log-mel + audio layer) costs per clip, as a share of TTFT.
Prefix caching is off in both phases: every real request carries unique audio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from bench.common import RunStats, StreamResult, machine, make_clips, pct, stream_http


def _requests_for(c: int) -> int:
    return max(8, 2 * c)


async def http_phase(url: str, clips: list[bytes], concurrencies: list[int], max_tokens: int,
                     adapter: str | None) -> dict[int, dict]:
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_http(client, clips[0], adapter, 4)  # warm-up
        for c in concurrencies:
            n = _requests_for(c)
            sem = asyncio.Semaphore(c)

            async def one(i: int) -> StreamResult:
                async with sem:
                    return await stream_http(client, clips[i % len(clips)], adapter, max_tokens)

            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(n)))
            out[c] = RunStats(list(results), time.perf_counter() - t0).summary()
            print(f"  http c={c}: {json.dumps({k: round(v, 1) for k, v in out[c].items()})}", file=sys.stderr)
    return out


async def direct_phase(settings, clips: list[bytes], concurrencies: list[int], max_tokens: int,
                       adapter: str | None) -> tuple[dict[int, dict], dict[str, float]]:
    from server.context import RequestContext
    from server.serving import AudioInput, ChatJob, TextDelta
    from server.state import build_state

    state = await build_state(settings)
    name = state.service.resolve_adapter(adapter)
    version = state.registry.get(name)

    def job(wav: bytes) -> ChatJob:
        return ChatJob(adapter=name, turns=[("user", [AudioInput(wav)])], max_tokens=max_tokens, stream=True)

    async def timed(token_ids: AsyncIterator[list[int]], t0: float) -> StreamResult:
        """TTFT, per-token gaps and token count of a stream of token-id chunks that began at ``t0``."""
        first = last = None
        itl, tokens = [], 0
        async for ids in token_ids:
            if not ids:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.append((now - last) / len(ids))
            last = now
            tokens += len(ids)
        end = time.perf_counter()
        return StreamResult((first or end) - t0, itl, tokens, end - t0)

    async def served(wav: bytes) -> StreamResult:
        """The served pipeline, in-process: the same ChatService.run the HTTP route calls."""
        ctx = RequestContext.local(settings.request_timeout_s)
        chunks = state.service.run(job(wav), ctx)
        return await timed((c.token_ids async for c in chunks if isinstance(c, TextDelta)), ctx.arrived_at)

    prepared, frontend_ms = [], []
    for wav in clips:
        p = await state.service.prepare(job(wav), RequestContext.local(settings.request_timeout_s), version)
        prepared.append(p)
        frontend_ms.append(p.timings.total_s * 1e3)
    decode_ms = [p.timings.decode_s * 1e3 for p in prepared]
    embed_ms = [(p.timings.features_s + p.timings.embed_s) * 1e3 for p in prepared]

    async def run(p) -> StreamResult:
        req = p.request
        req.request_id = os.urandom(8).hex()
        t0 = time.perf_counter()
        return await timed((c.token_ids async for c in state.engine.generate(req)), t0)

    out: dict[int, dict] = {}
    service_out: dict[int, dict] = {}
    await run(prepared[0])  # warm-up
    await served(clips[0])
    for c in concurrencies:
        n = _requests_for(c)
        sem = asyncio.Semaphore(c)
        for label, target, fn in (("direct", out, lambda i: run(prepared[i % len(prepared)])),
                                  ("service", service_out, lambda i: served(clips[i % len(clips)]))):

            async def one(i: int) -> StreamResult:
                async with sem:
                    return await fn(i)

            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(n)))
            target[c] = RunStats(list(results), time.perf_counter() - t0).summary()
            print(f"  {label} c={c}: {json.dumps({k: round(v, 1) for k, v in target[c].items()})}", file=sys.stderr)
    state.frontend.close()
    await state.engine.shutdown()
    front = {"frontend_p50_ms": pct(frontend_ms, 50), "frontend_p99_ms": pct(frontend_ms, 99),
             "decode_p50_ms": pct(decode_ms, 50), "features_embed_p50_ms": pct(embed_ms, 50)}
    return out, service_out, front


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="base model folder (default: the demo model)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-direct", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from launch import start_server, stop_server  # the tests' own process launcher
    from server.config import Settings

    work = Path(tempfile.mkdtemp(prefix="aura-bench-"))
    clips = [p.read_bytes() for p in make_clips(work / "clips", args.clips)]
    adapters = dict(a.split("=", 1) for a in args.adapter)
    adapter = next(iter(adapters), None)
    home = Path(os.environ.get("AURA_HOME", Path.home() / ".cache" / "aura"))
    server_args = ["--dtype", args.dtype, "--max-num-seqs", str(max(args.concurrency))]
    if args.model:
        server_args += ["--model", str(args.model)]
    for name, path in adapters.items():
        server_args += ["--adapter", f"{name}={path}"]
    env = {"AURA_ENABLE_PREFIX_CACHING": "false"}
    print(f"phase 1: HTTP server ({machine()})", file=sys.stderr)
    srv = start_server(server_args, home, work / "server.log", env=env)
    try:
        http = asyncio.run(http_phase(srv.url, clips, args.concurrency, args.max_tokens, adapter))
    finally:
        stop_server(srv)
    direct, service, front = {}, {}, {}
    if not args.skip_direct:
        print("phase 2: same prompts straight to AsyncLLM", file=sys.stderr)
        settings = Settings(model=args.model, dtype=args.dtype, max_num_seqs=max(args.concurrency),
                            enable_prefix_caching=False, adapters=adapters, home=home)
        direct, service, front = asyncio.run(direct_phase(settings, clips, args.concurrency, args.max_tokens, adapter))

    print(f"\nmachine: {machine()}; max_tokens={args.max_tokens}; prefix caching off")
    print("| concurrency | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | output tok/s | direct TTFT p50 (ms) "
          "| server/direct TTFT | service (no HTTP) TTFT p50 (ms) | service/direct TTFT |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        h, d, s = http[c], direct.get(c), service.get(c)
        ratio = f"{h['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x" if d else "-"
        dt = f"{d['ttft_p50_ms']:.0f}" if d else "-"
        st = f"{s['ttft_p50_ms']:.0f}" if s else "-"
        sratio = f"{s['ttft_p50_ms'] / d['ttft_p50_ms']:.2f}x" if s and d else "-"
        print(f"| {c} | {h['ttft_p50_ms']:.0f} / {h['ttft_p99_ms']:.0f} | {h['itl_p50_ms']:.1f} / {h['itl_p99_ms']:.1f} "
              f"| {h['output_tok_s']:.1f} | {dt} | {ratio} | {st} | {sratio} |")
    if front:
        share = front["frontend_p50_ms"] / http[args.concurrency[0]]["ttft_p50_ms"] * 100
        print(f"\naudio front end per clip: p50 {front['frontend_p50_ms']:.1f} ms (decode {front['decode_p50_ms']:.1f} ms, "
              f"log-mel + audio layer {front['features_embed_p50_ms']:.1f} ms), p99 {front['frontend_p99_ms']:.1f} ms "
              f"= {share:.1f}% of TTFT p50 at concurrency {args.concurrency[0]}")
    print(json.dumps({"http": http, "direct": direct, "service": service, "frontend": front}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
