"""Seconds per training step of a recipe on this machine, and the operators that take them.

The CPU A/B arms of ``bench/OPEN_VOCAB_LOG.md`` are bound by step time (~5 s per batch-8 step of the
stage-1 recipe on this 2-core box), so what a step spends its time on decides how many examples a sitting
buys. This runs real steps of any ``aura train`` configuration (the same flags; nothing is written but a
temporary work folder), times them after warm-up, then profiles a few more and prints the operators with
the most self time, by input shape: that is how the two stage-1 savings of stop 34 were found (the blocks
ran on the transcript after the audio; the LM-head CTC built 49k-wide log-probabilities).

    python -m bench.step_time --config bench/train_char_ctc_cpu.yaml --student $M/smollm2-135m-instruct \\
        --teacher $M/whisper-tiny.en --manifest $AB/train_hearable_transcribe.jsonl --teacher-cache $AURA_HOME/teacher_cache \\
        --audio-encoder-layers 2 --audio-encoder-stride 2 --stack-factor 2 --audio-encoder-lookahead 4

Run it alone: a second job on the same cores makes the seconds meaningless.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from adapters.training.config import add_config_flags, config_from_flags
from adapters.training.trainer import ConfigError, Trainer
from bench.common import machine


def time_steps(trainer: Trainer, first: int, count: int) -> float:
    """Mean wall seconds of ``count`` training steps from step ``first``."""
    start = time.perf_counter()
    for step in range(first, first + count):
        trainer.train_step(step)
    return (time.perf_counter() - start) / count


def top_operators(trainer: Trainer, first: int, count: int, top: int) -> list[dict[str, object]]:
    """The ``top`` (operator, input shapes) pairs by self CPU time over ``count`` profiled steps, per step."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        time_steps(trainer, first, count)
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"op": e.key, "shapes": str(e.input_shapes), "calls_per_step": e.count / count,
             "self_s_per_step": round(e.self_cpu_time_total / 1e6 / count, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in rows[:top]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every `aura train` flag works here too (the same TrainConfig).")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (teacher targets, allocator)")
    p.add_argument("--timed", type=int, default=6, help="timed steps")
    p.add_argument("--profiled", type=int, default=2, help="profiled steps after the timed ones (0: none)")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    add_config_flags(p)
    args = p.parse_args(argv)
    for name, low in {"warmup": 0, "timed": 1, "profiled": 0, "top": 1}.items():
        if not low <= getattr(args, name) <= 1000:
            p.error(f"--{name} must be between {low} and 1000")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = Trainer(config_from_flags(args, {
                "output": Path(tmp) / "adapter", "work_dir": Path(tmp) / "work", "eval_manifest": None,
                "progress": False, "resume": False}))
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"step_time: {e}", file=sys.stderr)
            return 2
        c = trainer.config
        time_steps(trainer, 0, args.warmup)
        seconds = time_steps(trainer, args.warmup, args.timed)
        ops = top_operators(trainer, args.warmup + args.timed, args.profiled, args.top) if args.profiled else []
    out = {"s_per_step": round(seconds, 3), "examples_per_s": round(c.batch_size / seconds, 2), "batch_size": c.batch_size,
           "threads": c.threads, "max_layer": c.max_layer, "machine": machine(), "torch": torch.__version__, "top_ops": ops}
    print(json.dumps(out))
    print(f"{seconds:.2f} s/step at batch {c.batch_size}, {c.threads} thread(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
