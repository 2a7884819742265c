"""What the LoRA costs in the engine: the same prompts with the demo adapter and without LoRA.

    python -m bench.lora_overhead [--modes none vllm segmented] [--concurrency 1 16] [--requests 16]
                                  [--rounds 2] [--max-tokens 32] [--dtype float32] [--max-num-batched-tokens N]

Each mode is the server's own engine (``server/engine/vllm_engine.py``) on the demo model, all
started in this process and measured in interleaved rounds:

- ``none``: LoRA off in the engine (the floor a LoRA is measured against);
- ``vllm``: LoRA on, the demo adapter on every request, vLLM's own CPU punica ops;
- ``segmented``: the same with ``server/engine/cpu_lora.py`` (one GEMM pair per adapter segment);
- ``merged``: the demo adapter's LoRA merged into the base weights (``adapters/merge.py``, what
  ``aura serve --merge-adapter`` runs), LoRA off in the engine.

A kernel may end in ``+compile`` (e.g. ``merged+compile``): that engine runs with
``enforce_eager=False``, so vLLM compiles the model (its default; the server's is eager for a
fast start). vLLM turns compilation off by itself whenever LoRA is on.

Prompts are the server's own (``adapters.prompt.build_prompt`` with the demo adapter's layout)
with 32 audio positions passed as embeddings (embedding rows of a filler sentence, different per
request) instead of the audio front end's output: 68 tokens, greedy. Per mode and concurrency it prints TTFT p50/p90 and output tokens/s,
and each LoRA mode's ratio to ``none`` (TTFT: LoRA / none, throughput: none / LoRA; 1.0 = free).
The server's front end is not in the loop: this isolates the engine.

A mode may also fix the step token budget and KV block size, ``KERNEL[:BUDGET[:BLOCK]]``, to
compare scheduling settings in one interleaved run, e.g.
``--modes segmented:2048:32 segmented:256:32 --concurrency 16`` (ratios are then to the first mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.adapter import DEMO_ADAPTER_DIR
from bench.common import machine, pct

KERNELS = ("none", "vllm", "segmented", "merged")
AUDIO_POSITIONS = 32
FILLER = ("the quick brown fox jumps over the lazy dog while a small bird sings softly in the old "
          "green tree near the quiet river bank on a warm and sunny afternoon in early summer")
DEMO_ADAPTER = DEMO_ADAPTER_DIR


@dataclass
class Prompt:
    token_ids: list[int]
    is_token_ids: list[bool]
    embeds: torch.Tensor  # (audio positions, hidden)


def make_prompts(model_dir: Path, tokenizer, n: int, first: int = 0) -> list[Prompt]:
    """The server's prompt (the demo adapter's layout, one audio part of AUDIO_POSITIONS vectors).

    Prompt i's "audio" is the embedding rows of the filler rotated by i: in-distribution vectors,
    and prompts share the chat-template head (as real requests of one adapter do) and nothing
    after it."""
    from safetensors import safe_open

    from adapters.adapter import read_aura_config
    from adapters.prompt import build_prompt, user_turn

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(key).float()
    words = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    assert len(words) >= AUDIO_POSITIONS
    layout = read_aura_config(DEMO_ADAPTER).prompt
    prompts = []
    for i in range(first, first + n):
        filler = (words[i % len(words):] + words[: i % len(words)])[:AUDIO_POSITIONS]
        p = build_prompt(tokenizer, layout, [user_turn(AUDIO_POSITIONS)], placeholder_id=0)
        prompts.append(Prompt(p.token_ids, p.is_token_ids, table[filler].clone()))
    return prompts


async def one(engine, prompt: Prompt, lora, max_tokens: int) -> tuple[float, int, float]:
    from server.engine.base import GenerationRequest, SamplingOptions

    req = GenerationRequest(request_id=uuid.uuid4().hex, token_ids=prompt.token_ids,
                            is_token_ids=prompt.is_token_ids, audio_embeds=prompt.embeds,
                            sampling=SamplingOptions(max_tokens=max_tokens), lora=lora)
    t0 = time.perf_counter()
    first = None
    n = 0
    async for chunk in engine.generate(req):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        n += len(chunk.token_ids)
    end = time.perf_counter()
    return (first or end) - t0, n, end - t0


@dataclass
class Tally:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        return {"ttft_p50_ms": pct(self.ttft_s, 50) * 1e3, "ttft_p90_ms": pct(self.ttft_s, 90) * 1e3,
                "total_p50_ms": pct(self.total_s, 50) * 1e3, "output_tok_s": self.tokens / self.wall_s,
                "requests": len(self.ttft_s)}


async def run_load(engine, lora, prompts: list[Prompt], concurrency: int, max_tokens: int, tally: Tally) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p: Prompt):
        async with sem:
            return await one(engine, p, lora, max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in prompts))
    tally.wall_s += time.perf_counter() - t0
    tally.ttft_s += [r[0] for r in results]
    tally.total_s += [r[2] for r in results]
    tally.tokens += sum(r[1] for r in results)


def parse_mode(mode: str, args: argparse.Namespace) -> tuple[str, bool, int | None, int | None]:
    """``KERNEL[+compile][:MAX_NUM_BATCHED_TOKENS[:BLOCK_SIZE]]``; missing parts come from the flags."""
    kernel, *rest = mode.split(":")
    kernel, plus, extra = kernel.partition("+")
    if kernel not in KERNELS or (plus and extra != "compile"):
        raise SystemExit(f"unknown mode {mode!r}: the kernel is one of {', '.join(KERNELS)}, optionally +compile")
    budget = int(rest[0]) if len(rest) > 0 and rest[0] else args.max_num_batched_tokens
    block = int(rest[1]) if len(rest) > 1 and rest[1] else args.block_size
    return kernel, bool(plus), budget, block


async def start_engine(mode: str, args: argparse.Namespace, model_dir: Path, tokenizer, hidden: int,
                       linear_modules: list[str]):
    from server.engine.base import LoraHandle
    from server.engine.vllm_engine import VLLMEngine

    kernel, compile_, budget, block = parse_mode(mode, args)
    use_lora = kernel not in ("none", "merged")
    if kernel == "merged":
        from adapters.merge import merged_model_dir

        model_dir = merged_model_dir(model_dir, DEMO_ADAPTER, args.merge_cache)
    engine = VLLMEngine(
        model=str(model_dir), enforce_eager=not compile_, tokenizer=tokenizer, hidden_size=hidden, dtype=args.dtype,
        max_model_len=1024, max_num_seqs=max(args.concurrency), max_lora_rank=16, max_loras=4,
        enable_prefix_caching=not args.no_prefix_caching, enable_lora=use_lora,
        cpu_lora_kernel=kernel if use_lora else "vllm", max_num_batched_tokens=budget,
        block_size=block, lora_target_modules=linear_modules, disable_log_stats=True)
    await engine.start()  # exports the kernel choice before vLLM spawns this engine's processes
    lora = None
    if use_lora:
        lora = LoraHandle("aura-demo", 1, DEMO_ADAPTER)
        await engine.add_lora(lora)
    return engine, lora


async def bench(args: argparse.Namespace, model_dir: Path, tokenizer, hidden: int,
                linear_modules: list[str]) -> dict[tuple[str, int], Tally]:
    """All modes' engines up at once; rounds interleave them (rotating the order), so a noisy
    neighbour on a shared machine hits every mode alike."""
    engines = {}
    try:
        for mode in args.modes:
            engines[mode] = await start_engine(mode, args, model_dir, tokenizer, hidden, linear_modules)
            for c in args.concurrency:  # warm-up at each batch shape
                await run_load(*engines[mode], make_prompts(model_dir, tokenizer, min(c, 4), first=10_000),
                               c, 4, Tally())
        tallies = {(m, c): Tally() for m in args.modes for c in args.concurrency}
        for r in range(args.rounds):
            order = args.modes[r % len(args.modes):] + args.modes[: r % len(args.modes)]
            for c in args.concurrency:
                # The same prompts for every mode in a round; new ones each round (no cache hits
                # across rounds beyond the shared chat-template head).
                prompts = make_prompts(model_dir, tokenizer, max(args.requests, c), first=1000 * r + 100 * c)
                for m in order:
                    t = Tally()
                    await run_load(*engines[m], prompts, c, args.max_tokens, t)
                    for k in ("ttft_s", "total_s"):
                        getattr(tallies[m, c], k).extend(getattr(t, k))
                    tallies[m, c].tokens += t.tokens
                    tallies[m, c].wall_s += t.wall_s
                    print(json.dumps({"round": r, "mode": m, "concurrency": c,
                                      **{k: round(v, 1) for k, v in t.summary().items()}}), flush=True)
        return tallies
    finally:
        for engine, _ in engines.values():
            await engine.shutdown()


def open_model(model: Path | None):
    """(folder, base-model info, tokenizer) of ``model``, or of the demo SmolLM2 (converted once)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from adapters.base_model import read_base_model

    if model is None:
        from adapters.provision.demo import prepare_demo_models

        model = prepare_demo_models(progress=False).llm
    return model, read_base_model(model), AutoTokenizer.from_pretrained(str(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="base model folder (default: the demo SmolLM2-135M)")
    ap.add_argument("--modes", nargs="+", default=list(KERNELS),
                    help="KERNEL[:MAX_NUM_BATCHED_TOKENS[:BLOCK_SIZE]], kernel one of none, vllm, segmented; "
                         "e.g. segmented:256:32 to compare step budgets or block sizes in one run")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per round and concurrency level (at least c)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (all modes each round)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's)")
    ap.add_argument("--merge-cache", type=Path, default=Path(os.environ.get("AURA_HOME", Path.home() / ".cache" / "aura")) / "merged",
                    help="where the merged mode's model folder is made (reused across runs)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="measure every prefill in full (the prompts share the chat-template prefix)")
    args = ap.parse_args()

    model_dir, base, tokenizer = open_model(args.model)
    print(f"# lora_overhead on {machine()}; model {model_dir.name} {args.dtype}; "
          f"max_num_batched_tokens={args.max_num_batched_tokens}; block_size={args.block_size}; prefix caching {not args.no_prefix_caching}")
    tallies = asyncio.run(bench(args, model_dir, tokenizer, base.hidden_size, list(base.linear_modules)))
    results = {m: {c: tallies[m, c].summary() for c in args.concurrency} for m in args.modes}

    print(f"\n| mode | c | TTFT p50 ms | TTFT p90 ms | output tok/s | vs {args.modes[0]}: TTFT p50 | vs {args.modes[0]}: tok/s |")
    print("|---|---|---|---|---|---|---|")
    for m, per_c in results.items():
        for c, r in per_c.items():
            base_r = results.get(args.modes[0], {}).get(c) if m != args.modes[0] else None
            ttft_x = f"{r['ttft_p50_ms'] / base_r['ttft_p50_ms']:.2f}x" if base_r else "-"
            tps_x = f"{base_r['output_tok_s'] / r['output_tok_s']:.2f}x" if base_r else "-"
            print(f"| {m} | {c} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | {r['output_tok_s']:.1f} "
                  f"| {ttft_x} | {tps_x} |")


if __name__ == "__main__":
    main()
