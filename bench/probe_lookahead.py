"""What does a streaming audio layer keep of Whisper's blocks? Linear CTC probes on masked teacher states.

The audio layer's optional blocks (``audio_encoder_layers``) are Whisper's first blocks run *causally*, so that
realtime sessions can prefill while the user speaks. Whisper was trained with every frame seeing the whole clip.
This runs the frozen teacher's blocks with frame i seeing only frames up to i + k (k = 0: causal, as the audio
layer does; ``full``: as Whisper runs), pools them to the student's audio-token rate as the distillation targets
are, and trains the same linear character-CTC probe as ``bench/probe_layers.py`` on each block's states, reporting
held-out CER. The gap between k = 0 and ``full`` is what causality costs a Whisper-initialised block before any
training; a small k that closes it says how much lookahead (k x 20 ms of latency) a realtime layer would need.

``--stride 1,2,4`` also runs the blocks on the mean of 2 or 4 stem frames (the audio layer's ``encoder_stride``,
which keeps two blocks inside the 5% FLOPs budget), at the same lookahead in milliseconds (k // stride block
frames) and the same token rate (the probe pools 4 // stride block frames): what the cheaper rate costs the
teacher's own blocks before any training.

    python -m bench.probe_lookahead --teacher $M/whisper-tiny.en --train-manifest T --heldout-manifest H \
        --clips 500 --lookahead full,0,4,16 --blocks 0,1,3 [--stride 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.probe_layers import train_probe


def lookaheads(spec: str) -> list[int | None]:
    """``full,0,4`` -> [None, 0, 4] (None = every frame sees the whole clip)."""
    return [None if v == "full" else int(v) for v in spec.split(",") if v]


def main() -> None:
    from adapters.audio import load_audio_file
    from adapters.features import FeatureConfig, log_mel
    from adapters.training.data import read_manifest_absolute
    from adapters.training.teacher import encoder_states, load_teacher_encoder, pool_frames

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--train-manifest", type=Path, required=True)
    p.add_argument("--heldout-manifest", type=Path, required=True)
    p.add_argument("--clips", type=int, default=500, help="training clips for the probes (transcribe rows)")
    p.add_argument("--lookahead", default="full,0,4,16", help="stem frames (20 ms each) a frame may see ahead; full = all")
    p.add_argument("--blocks", default="0,1,3", help="teacher blocks to probe (0-based)")
    p.add_argument("--stack-factor", type=int, default=4, help="stem frames per student audio token")
    p.add_argument("--stride", default="1", help="stem frames averaged before the blocks (each a separate run)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    blocks = [int(b) for b in a.blocks.split(",")]
    strides = [int(v) for v in a.stride.split(",") if v]
    if any(a.stack_factor % st for st in strides):
        p.error(f"every stride must divide --stack-factor {a.stack_factor}")
    modes = [(st, None if k is None else k // st) for st in strides for k in lookaheads(a.lookahead)]
    encoder = load_teacher_encoder(a.teacher)
    features = FeatureConfig()

    def rows(path: Path, n: int) -> list:
        return [r for r in read_manifest_absolute(path) if r.task == "transcribe"][:n]

    Key = tuple[int, int | None, int]  # stride, lookahead in block frames, block

    def states(manifest_rows: list) -> dict[Key, list[tuple[torch.Tensor, str]]]:
        out: dict[Key, list[tuple[torch.Tensor, str]]] = {}
        for row in manifest_rows:
            samples = torch.from_numpy(load_audio_file(row.audio).samples.copy())
            feats, frames = log_mel([samples], features)
            valid = (int(frames[0]) + 1) // 2
            for st, k in modes:
                with torch.no_grad():
                    hs = encoder_states(encoder, feats, blocks, lookahead=k, stride=st)
                for b in blocks:
                    pooled = pool_frames(hs[b][0], -(-valid // st), a.stack_factor // st)
                    out.setdefault((st, k, b), []).append((pooled, row.text))
        return out

    t0 = time.time()
    train_rows, held_rows = rows(a.train_manifest, a.clips), rows(a.heldout_manifest, 10_000)
    tr, he = states(train_rows), states(held_rows)
    print(f"teacher states of {len(train_rows)} train / {len(held_rows)} held-out clips, {len(modes)} masks: "
          f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    result: dict[str, dict[str, float]] = {}
    for (st, k, b) in tr:
        name = "full" if k is None else f"lookahead {k}"
        if len(strides) > 1 or st > 1:
            name = f"stride {st} {name}"
        cer = round(train_probe(tr[(st, k, b)], he[(st, k, b)], steps=a.steps, seed=0), 4)
        result.setdefault(name, {})[f"block {b}"] = cer
        print(f"{name:14s} block {b}: held-out CER {cer:.3f}", file=sys.stderr, flush=True)
    print(json.dumps({"teacher": str(a.teacher), "train_clips": len(train_rows), "heldout_clips": len(held_rows),
                      "steps": a.steps, "stack_factor": a.stack_factor, "strides": strides, "cer": result}))


if __name__ == "__main__":
    main()
