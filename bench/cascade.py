"""AuRA serve vs the ASR -> LLM cascade it replaces, side by side, in one interleaved run.

    python -m bench.cascade [--concurrency 1 4 16] [--questions 20] [--max-tokens 32] [--rounds 1]
                            [--systems aura merged cascade]

Systems (each up for the whole run; rounds rotate their order so a noisy neighbour hits all alike):

- ``aura``: ``aura serve`` on the demo model (fp32) with the demo adapter as a LoRA (the server's
  default engine: segmented CPU LoRA kernel, eager);
- ``merged``: the same with ``--merge-adapter aura-demo`` (the LoRA in the weights, LoRA off);
- ``cascade``: faster-whisper tiny.en (int8, the CTranslate2 folder the demo's teacher comes from)
  transcribes the clip, then vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``, its
  defaults, same SmolLM2 weights, fp32, no LoRA) answers the transcript as the user message.

One client times every request from before it is sent (AuRA: the upload; cascade: before the ASR)
to the first streamed token and to the end. Questions are espeak-ng speech of ``bench.common``'s
questions, greedy, ``--max-tokens`` output tokens (no stop: EOS may end earlier; tok/s counts what
came). Prints TTFT p50/p90, total p50 and output tok/s per system and concurrency, the ratios to
the cascade, and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import StreamFailed, machine, make_clips, pct, stream_http, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("aura", "merged", "cascade")
ADAPTER = "aura-demo"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Tally:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0

    def add(self, results: list[tuple[float, float, int]], wall_s: float) -> None:
        self.ttft_s += [r[0] for r in results]
        self.total_s += [r[1] for r in results]
        self.tokens += sum(r[2] for r in results)
        self.wall_s += wall_s

    def summary(self) -> dict[str, float]:
        return {"ttft_p50_ms": pct(self.ttft_s, 50) * 1e3, "ttft_p90_ms": pct(self.ttft_s, 90) * 1e3,
                "total_p50_ms": pct(self.total_s, 50) * 1e3,
                "output_tok_s": self.tokens / self.wall_s if self.wall_s else float("nan"),
                "tokens_per_request": self.tokens / max(1, len(self.ttft_s)), "requests": len(self.ttft_s)}


class Cascade:
    """faster-whisper then vLLM's OpenAI server, timed as one request."""

    def __init__(self, url: str, model_name: str, whisper_dir: Path, workers: int, threads: int) -> None:
        from faster_whisper import WhisperModel

        self.url = url
        self.model_name = model_name
        # num_workers: transcriptions that may run at once (one per concurrent client, capped).
        self.asr = WhisperModel(str(whisper_dir), device="cpu", compute_type="int8", cpu_threads=threads,
                                num_workers=workers)
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def transcribe(self, wav: Path) -> str:
        segments, _ = self.asr.transcribe(str(wav), beam_size=1, language="en", vad_filter=False,
                                          condition_on_previous_text=False, without_timestamps=True)
        return " ".join(s.text.strip() for s in segments)

    async def one(self, client: httpx.AsyncClient, wav: Path, max_tokens: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        text = await asyncio.get_running_loop().run_in_executor(self.pool, self.transcribe, wav)
        body = {"model": self.model_name, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        first = None
        tokens = 0
        async with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise StreamFailed(f"http_{r.status_code}", r.status_code)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
        end = time.perf_counter()
        return (first or end) - t0, end - t0, tokens


async def aura_one(client: httpx.AsyncClient, wav: bytes, max_tokens: int) -> tuple[float, float, int]:
    r = await stream_http(client, wav, ADAPTER, max_tokens)
    return r.ttft_s, r.total_s, r.tokens


def start_vllm_server(model: Path, work: Path, max_num_seqs: int, timeout: float = 900.0) -> tuple[subprocess.Popen, str]:
    """vLLM's own OpenAI server with its defaults (compilation on), fp32 like the AuRA demo."""
    sys.path.insert(0, str(ROOT / "tests"))
    from launch import free_port

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = open(work / "vllm_server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
         "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
         "--max-num-seqs", str(max_num_seqs)],
        env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, work / "vllm_server.log", path="/health", timeout=timeout)
    return proc, url


async def bench(args: argparse.Namespace, urls: dict[str, str], cascade: Cascade | None,
                clips: list[Path]) -> dict[tuple[str, int], Tally]:
    wavs = {p: p.read_bytes() for p in clips}
    clients = {s: httpx.AsyncClient(base_url=u, timeout=600) for s, u in urls.items() if s != "cascade"}
    if cascade is not None:
        clients["cascade"] = httpx.AsyncClient(timeout=600)

    def job(system: str, i: int):
        clip = clips[i % len(clips)]
        if system == "cascade":
            return cascade.one(clients[system], clip, args.max_tokens)
        return aura_one(clients[system], wavs[clip], args.max_tokens)

    try:
        systems = list(args.systems)
        for s in systems:  # warm-up: every clip once (ASR, front end and the engines' first shapes)
            for c in sorted(set(args.concurrency)):
                await asyncio.gather(*(job(s, i) for i in range(min(c, 4))))
        tallies = {(s, c): Tally() for s in systems for c in args.concurrency}
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[: r % len(systems)]
            for c in args.concurrency:
                for s in order:
                    sem = asyncio.Semaphore(c)

                    async def guarded(i: int, s: str = s, sem: asyncio.Semaphore = sem):
                        async with sem:
                            return await job(s, i)

                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(guarded(i) for i in range(max(args.questions, c))))
                    wall = time.perf_counter() - t0
                    t = Tally()
                    t.add(list(results), wall)
                    tallies[s, c].add(list(results), wall)
                    print(json.dumps({"round": r, "system": s, "concurrency": c,
                                      **{k: round(v, 1) for k, v in t.summary().items()}}), flush=True)
        return tallies
    finally:
        for client in clients.values():
            await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--questions", type=int, default=20, help="spoken questions per round and concurrency")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--asr-threads", type=int, default=2, help="CTranslate2 threads per transcription")
    ap.add_argument("--asr-workers", type=int, default=4, help="transcriptions at once (faster-whisper num_workers)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from launch import start_server, stop_server  # the tests' own process launcher

    from adapters.provision.demo import demo_teacher_source, prepare_demo_models

    home = Path(os.environ.get("AURA_HOME", Path.home() / ".cache" / "aura"))
    models = prepare_demo_models(home, progress=False)
    work = Path(tempfile.mkdtemp(prefix="bench-cascade-"))
    clips = make_clips(work / "clips", args.questions)
    load_before = os.getloadavg()
    log(f"# cascade on {machine()}; load average {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}; "
        f"work {work}")
    servers = {}
    vllm_proc = None
    urls: dict[str, str] = {}
    try:
        base_args = ["--max-num-seqs", str(max(max(args.concurrency), 16))]
        if "aura" in args.systems:
            servers["aura"] = start_server(base_args, home, work / "aura.log", timeout=900)
            urls["aura"] = servers["aura"].url
        if "merged" in args.systems:
            servers["merged"] = start_server(base_args + ["--merge-adapter", ADAPTER], home, work / "merged.log",
                                             timeout=900)
            urls["merged"] = servers["merged"].url
        cascade = None
        if "cascade" in args.systems:
            vllm_proc, url = start_vllm_server(models.llm, work, max(max(args.concurrency), 16))
            cascade = Cascade(url, "smollm2", demo_teacher_source(), args.asr_workers, args.asr_threads)
            urls["cascade"] = url
        log("all systems up; measuring")
        tallies = asyncio.run(bench(args, urls, cascade, clips))
    finally:
        for srv in servers.values():
            stop_server(srv)
        if vllm_proc is not None:
            vllm_proc.terminate()
            try:
                vllm_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                vllm_proc.kill()
    load_after = os.getloadavg()
    print(f"\n# {machine()}; load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"(1-min); {args.questions} questions x {args.rounds} round(s), {args.max_tokens} output tokens, greedy")
    print("| system | c | TTFT p50 ms | TTFT p90 ms | total p50 ms | output tok/s | tokens/answer | TTFT p50 / cascade "
          "| tok/s / cascade |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in args.systems:
        for c in args.concurrency:
            r = tallies[s, c].summary()
            ref = tallies[("cascade", c)].summary() if "cascade" in args.systems and s != "cascade" else None
            ttft_x = f"{r['ttft_p50_ms'] / ref['ttft_p50_ms']:.2f}x" if ref else "-"
            tps_x = f"{r['output_tok_s'] / ref['output_tok_s']:.2f}x" if ref else "-"
            print(f"| {s} | {c} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['total_p50_ms']:.0f} "
                  f"| {r['output_tok_s']:.1f} | {r['tokens_per_request']:.1f} | {ttft_x} | {tps_x} |")


if __name__ == "__main__":
    main()
