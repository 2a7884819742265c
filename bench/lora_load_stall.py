"""How long a LoRA load stalls the other streams of the engine, with and without preparing it off the step loop.

    python -m bench.lora_load_stall [--model DIR --adapter DIR] [--loads 12] [--streams 4]

The server's own engine (``server/engine/vllm_engine.py``, the CPU defaults: segmented LoRA,
max_loras 4, rank 16) on the demo model and the demo adapter unless told otherwise. ``--streams``
requests on the (pinned) demo adapter decode without pause; meanwhile the adapter's files are
loaded ``--loads`` times under a new LoRA id each (what a hot swap does), alternating two ways:

- ``in_loop``: plain ``add_lora``: vLLM reads, parses and packs the LoRA inside its step loop;
- ``off_loop``: the server's default: the workers read and pack it in a thread
  (``server/engine/lora_prepare.py``), then ``add_lora`` only registers it and copies it into a slot.

Per load it records the largest gap between two tokens of any background stream while the load
was in progress (what a user of another adapter sees), and the load's own wall time. Measured at
the engine, so no HTTP/SSE coalescing hides or adds gaps; the quiet gaps come from the same streams
outside any load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path

from bench.common import machine, pct
from bench.lora_overhead import DEMO_ADAPTER, make_prompts, open_model


async def bench(args: argparse.Namespace, model_dir: Path, tokenizer, hidden: int, linear: list[str]) -> dict:
    from server.engine.base import GenerationRequest, LoraHandle, SamplingOptions
    from server.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(model=str(model_dir), tokenizer=tokenizer, hidden_size=hidden, dtype=args.dtype,
                        max_model_len=1024, max_num_seqs=16, max_lora_rank=16, max_loras=4,
                        lora_target_modules=linear, disable_log_stats=True)
    await engine.start()
    base_lora = LoraHandle("bg", 1, args.adapter)
    await engine.add_lora(base_lora, pin=True)
    prompts = make_prompts(model_dir, tokenizer, args.streams)
    stamps: list[tuple[float, float]] = []  # (arrival, gap since the stream's previous token)
    stop = asyncio.Event()

    async def stream(i: int) -> None:
        while not stop.is_set():
            p = prompts[i]
            req = GenerationRequest(request_id=uuid.uuid4().hex, token_ids=p.token_ids, is_token_ids=p.is_token_ids,
                                    audio_embeds=p.embeds, sampling=SamplingOptions(max_tokens=args.max_tokens),
                                    lora=base_lora)
            last = None
            async for chunk in engine.generate(req):
                now = time.perf_counter()
                if chunk.token_ids and last is not None:
                    stamps.append((now, now - last))
                if chunk.token_ids:
                    last = now

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    await asyncio.sleep(3)  # warm up
    loads: list[tuple[str, float, float]] = []
    for k in range(args.loads):
        mode = "off_loop" if k % 2 else "in_loop"
        engine.prepare_loras_off_loop = mode == "off_loop"
        lora = LoraHandle(f"hot{k}", 100 + k, args.adapter)
        t0 = time.perf_counter()
        await engine.add_lora(lora)
        t1 = time.perf_counter()
        loads.append((mode, t0, t1))
        await asyncio.sleep(args.gap_s)
        await engine.remove_lora(lora)
        await asyncio.sleep(args.gap_s)
    stop.set()
    await asyncio.gather(*tasks)
    counts = await engine.lora_load_counts()
    await engine.shutdown()

    tail = args.gap_s / 2  # the step running when add_lora returns ends a little later
    def gaps_in(a: float, b: float) -> list[float]:
        return [g for t, g in stamps if a <= t <= b]

    quiet = [g for t, g in stamps if not any(a <= t <= b + tail for _, a, b in loads)]
    out: dict = {"quiet_gap_ms_p50": pct(quiet, 50) * 1e3, "quiet_gap_ms_p99": pct(quiet, 99) * 1e3,
                 "quiet_gap_ms_max": max(quiet) * 1e3, "engine_lora_loads": counts}
    for mode in ("in_loop", "off_loop"):
        worst = [max(gaps_in(a, b + tail), default=0.0) for m, a, b in loads if m == mode]
        walls = [b - a for m, a, b in loads if m == mode]
        out[mode] = {"loads": len(walls), "worst_gap_ms_p50": pct(worst, 50) * 1e3,
                     "worst_gap_ms_max": max(worst) * 1e3, "load_wall_ms_p50": pct(walls, 50) * 1e3,
                     "worst_gaps_ms": [round(w * 1e3) for w in worst]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="base model folder (default: the demo SmolLM2-135M)")
    ap.add_argument("--adapter", type=Path, default=DEMO_ADAPTER, help="adapter folder (default: the demo adapter)")
    ap.add_argument("--loads", type=int, default=12, help="loads in all, alternating in_loop / off_loop")
    ap.add_argument("--streams", type=int, default=4, help="background streams decoding during the loads")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gap-s", type=float, default=1.0, help="pause after each load and after each unload")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    model_dir, base, tokenizer = open_model(args.model)
    print(f"# lora_load_stall on {machine()}; model {model_dir.name} {args.dtype}; adapter {args.adapter.name}; "
          f"{args.streams} background streams, {args.loads} loads; 1-min load average {os.getloadavg()[0]:.1f}")
    r = asyncio.run(bench(args, model_dir, tokenizer, base.hidden_size, list(base.linear_modules)))
    print(f"quiet token gap p50 / p99 / max: {r['quiet_gap_ms_p50']:.1f} / {r['quiet_gap_ms_p99']:.1f} / "
          f"{r['quiet_gap_ms_max']:.1f} ms; engine LoRA loads {r['engine_lora_loads']}")
    print("\n| load | loads | worst gap during a load, p50 / max (ms) | load wall time p50 (ms) | worst gaps (ms) |")
    print("|---|---|---|---|---|")
    for mode in ("in_loop", "off_loop"):
        m = r[mode]
        print(f"| {mode} | {m['loads']} | {m['worst_gap_ms_p50']:.0f} / {m['worst_gap_ms_max']:.0f} "
              f"| {m['load_wall_ms_p50']:.0f} | {m['worst_gaps_ms']} |")
    print(f"# 1-min load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
