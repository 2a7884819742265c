"""bf16 vs fp32 on the CPU for the demo: do greedy answers change, and what is bf16 worth?

    python -m bench.precision [--questions 20] [--max-tokens 32] [--concurrency 1 16] [--merge]

Starts ``aura serve`` on the demo model and adapter once per dtype (one server at a time), asks the
same espeak-ng questions greedily and compares the token ids: sequences identical, first token
identical, and the share of each answer before the first differing token. Then streams the same
questions at each concurrency for output tokens/s and TTFT. ``--merge`` serves the adapter merged
(``--merge-adapter aura-demo``) in both dtypes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import machine, make_clips, pct, stream_http

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")


def answer(url: str, wav: Path, max_tokens: int) -> tuple[list[int], str]:
    with open(wav, "rb") as f:
        r = httpx.post(f"{url}/v1/audio/chat", files={"file": ("q.wav", f, "audio/wav")},
                       data={"adapter": "aura-demo", "max_tokens": str(max_tokens), "return_token_ids": "true"},
                       timeout=600)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["message"]["content"]


async def speed(url: str, clips: list[Path], c: int, max_tokens: int) -> dict[str, float]:
    wavs = [p.read_bytes() for p in clips]
    sem = asyncio.Semaphore(c)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int):
            async with sem:
                return await stream_http(client, wavs[i % len(wavs)], "aura-demo", max_tokens)

        await asyncio.gather(*(one(i) for i in range(min(c, 4))))  # warm-up at this batch shape
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(i) for i in range(max(len(wavs), c))))
        wall = time.perf_counter() - t0
    return {"ttft_p50_ms": pct([r.ttft_s for r in res], 50) * 1e3,
            "ttft_p90_ms": pct([r.ttft_s for r in res], 90) * 1e3,
            "output_tok_s": sum(r.tokens for r in res) / wall}


def prefix_share(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--merge", action="store_true", help="serve the demo adapter merged (--merge-adapter)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from launch import start_server, stop_server

    home = Path(os.environ.get("AURA_HOME", Path.home() / ".cache" / "aura"))
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    clips = make_clips(work / "clips", args.questions)
    load = os.getloadavg()[0]
    answers: dict[str, list[tuple[list[int], str]]] = {}
    speeds: dict[str, dict[int, dict[str, float]]] = {}
    for dtype in DTYPES:
        srv_args = ["--dtype", dtype, "--max-num-seqs", str(max(max(args.concurrency), 16))]
        srv_args += ["--merge-adapter", "aura-demo"] if args.merge else []
        srv = start_server(srv_args, home, work / f"{dtype}.log", timeout=900)
        try:
            answers[dtype] = [answer(srv.url, p, args.max_tokens) for p in clips]
            speeds[dtype] = {c: asyncio.run(speed(srv.url, clips, c, args.max_tokens)) for c in args.concurrency}
        finally:
            stop_server(srv)
    a, b = answers["float32"], answers["bfloat16"]
    same = sum(x[0] == y[0] for x, y in zip(a, b))
    first = sum(x[0][:1] == y[0][:1] for x, y in zip(a, b))
    share = sum(prefix_share(x[0], y[0]) for x, y in zip(a, b)) / len(a)
    print(f"\n# {machine()}; load average {load:.1f} -> {os.getloadavg()[0]:.1f}; demo model + adapter"
          f"{' (merged)' if args.merge else ''}; {len(clips)} questions, {args.max_tokens} tokens, greedy")
    print(f"bf16 vs fp32: identical answers {same}/{len(a)}, identical first token {first}/{len(a)}, "
          f"mean shared prefix {share:.0%}")
    for (ta, xa), (tb, xb) in zip(a, b):
        if ta != tb:
            print(f"  fp32: {xa!r}\n  bf16: {xb!r}")
    print("| dtype | c | TTFT p50 ms | TTFT p90 ms | output tok/s |")
    print("|---|---|---|---|---|")
    for dtype in DTYPES:
        for c, r in speeds[dtype].items():
            print(f"| {dtype} | {c} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['output_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
