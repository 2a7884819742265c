"""How much does an adapter use the audio? Next-token loss with each clip's own audio vs another's.

An adapter that transcribes nothing either memorised its training lines (its training loss is
low, the held-out one high) or never learned to read the audio at all (both high). Which one it
is decides what the next run needs: more distinct lines, or more steps. This reports, per split
(held-out and a seeded sample of training rows) and per task, the next-token loss of the
adapter (the trainer's own loss, row by row) twice: with each row's own clip, and with the clips
rotated among the rows of that task (same transcripts and answers, someone else's audio). The
paired difference, with its standard error over rows, is how many nats per token the audio is
worth to the adapter: 0 when it ignores the
audio; for transcription, roughly the language model's prior (~4 nats on everyday lines) when it
reads every word.

    python -m bench.audio_use --adapter A --config bench/train_open_gpu.yaml \\
        --student S --teacher T --train-manifest C/train_qa.jsonl --heldout-manifest C/heldout_resp.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from adapters.training.data import ManifestRow, read_manifest_absolute, write_manifest


def rotated(rows: list[ManifestRow], shift: int = 7) -> list[ManifestRow]:
    """Each row with the audio of the row ``shift`` places on among the rows of its task."""
    out = list(rows)
    for task in {r.task for r in rows}:
        idx = [i for i, r in enumerate(rows) if r.task == task]
        for k, i in enumerate(idx):
            out[i] = rows[i].model_copy(update={"audio": rows[idx[(k + shift) % len(idx)]].audio})
    return out


def row_losses(args: argparse.Namespace, manifest: Path, n: int) -> list[tuple[str, float]]:
    """(task, next-token loss) of each of the first ``n`` rows, one row at a time (so rows can be
    paired across conditions), through the trainer's own loss."""
    import torch

    from adapters.training.config import load_train_config
    from adapters.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as work:
        cfg = load_train_config(args.config, dict(
            student=args.student, teacher=args.teacher, manifest=manifest, eval_manifest=manifest,
            output=Path(work) / "adapter", init_from=args.adapter, distill_loss="none", distill_weight=0.0,
            ctc_weight=0.0, char_ctc_weight=0.0, audio_distill_weight=0.0, text_kd_weight=0.0,
            # every row is measured: a recipe's validation hold-back (val_sentences) would drop rows or refuse a
            # held-out set with fewer sentences than it holds back (bench/train_open_gpu.yaml holds back 200)
            val_sentences=0, precision=args.precision, device=args.device, eval_examples=n,
            batch_size=1, grad_accum=1, threads=args.threads, progress=False))
        t = Trainer(cfg)
        t.student.eval()
        with torch.no_grad():
            return [(e.task, float(t._losses([i], t.eval_examples, t.eval_targets)["ce"])) for i, e in enumerate(t.eval_examples)]


def summarize(own: list[tuple[str, float]], rot: list[tuple[str, float]]) -> dict[str, dict[str, float]]:
    """Per task (and "all"): mean loss with own and rotated audio, their paired difference (what the
    audio is worth) and its standard error over rows."""
    out: dict[str, dict[str, float]] = {}
    for task in ["all", *sorted({t for t, _ in own})]:
        pairs = [(a, b) for (ta, a), (_, b) in zip(own, rot) if task in ("all", ta)]
        d = [b - a for a, b in pairs]
        n = len(d)
        mean = sum(d) / n
        se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n ** 0.5 if n > 1 else float("nan")
        out[task] = {"rows": n, "own": round(sum(a for a, _ in pairs) / n, 4), "rotated": round(sum(b for _, b in pairs) / n, 4),
                     "audio_nats_per_token": round(mean, 4), "se": round(se, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True, help="the recipe the adapter was trained with (its LoRA shape)")
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--train-manifest", type=Path, required=True)
    p.add_argument("--heldout-manifest", type=Path, required=True)
    p.add_argument("--rows", type=int, default=90, help="rows per split (training rows: a seeded sample, half per task)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast, as the server's --dtype bfloat16 runs the same weights: does it change held-out quality?")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    train = read_manifest_absolute(args.train_manifest)
    tasks = sorted({r.task for r in train})
    sample = [r for t in tasks for r in rng.sample([r for r in train if r.task == t],
                                                  min(args.rows // len(tasks), sum(r.task == t for r in train)))]
    splits = {"heldout": read_manifest_absolute(args.heldout_manifest)[: args.rows], "train": sample}
    report: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, rows in splits.items():
            losses = {}
            for audio, these in (("own", rows), ("rotated", rotated(rows))):
                t0 = time.time()
                path = Path(tmp) / f"{split}-{audio}.jsonl"
                write_manifest(path, these)
                losses[audio] = row_losses(args, path, len(these))
                print(f"{split} {audio} audio: {len(these)} rows ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            report[split] = summarize(losses["own"], losses["rotated"])
            print(f"{split}: {report[split]}", file=sys.stderr, flush=True)
    print(json.dumps({"adapter": str(args.adapter), "rows": args.rows, "precision": args.precision, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
