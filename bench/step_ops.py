"""What one training step dispatches: operator calls and host syncs, per batch and per example.

A GPU lease showed ~0.47 s per step at batch 64 for a 135M-parameter student, where the
arithmetic is a few tens of milliseconds on an H100: the step is bound by what the host
dispatches (eager PyTorch pays ~10-20 us per operator call) and by host syncs (each ``.item()`` /
``int(tensor)`` on a CUDA tensor waits for the whole queue). Both are counted here on this CPU,
where the counts are the same as on a GPU (the CUDA optimizer's foreach kernels aside, so the
optimizer is left out): forward + losses + backward of one real training step, profiled at two
batch sizes, split into a per-step constant and a per-example slope, and extrapolated to the
batch sizes a GPU run uses.

    python -m bench.step_ops --config bench/train_open_gpu.yaml --student S --teacher T \\
        --manifest C/train_qa.jsonl [--text-kd-weight 0.5] [--batches 4 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from adapters.training.config import load_train_config
from adapters.training.data import read_manifest_absolute, write_manifest
from adapters.training.trainer import Trainer


def count_ops(trainer: Trainer, idx: list[int]) -> dict[str, int]:
    """Top-level operator calls (each is >= 1 kernel launch on a GPU) and host syncs of one
    forward + backward on ``idx`` (after a warm-up pass on the same batch)."""
    trainer.student.zero_grad(set_to_none=True)
    trainer._losses(idx, trainer.examples, trainer.targets, step=0)["loss"].backward()  # warm: teacher targets, caches
    trainer.student.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer._losses(idx, trainer.examples, trainer.targets, step=0)["loss"].backward()
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    syncs = sum(1 for e in events if e.name in ("aten::item", "aten::_local_scalar_dense")
                and (e.cpu_parent is None or e.cpu_parent.name != "aten::item"))
    return {"ops": len(top), "syncs": syncs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True, help="training manifest (its first rows are used)")
    p.add_argument("--text-kd-weight", type=float)
    p.add_argument("--batches", type=int, nargs=2, default=[4, 8], metavar=("SMALL", "LARGE"))
    p.add_argument("--extrapolate", type=int, nargs="+", default=[64, 256])
    p.add_argument("--teacher-cache", type=Path, help="default: a temporary folder")
    a = p.parse_args()
    small, large = sorted(a.batches)
    with tempfile.TemporaryDirectory() as tmp:
        rows = read_manifest_absolute(a.manifest)[:large]
        manifest = Path(tmp) / "rows.jsonl"
        write_manifest(manifest, rows)
        config = load_train_config(a.config, dict(
            student=a.student, teacher=a.teacher, manifest=manifest, eval_manifest=manifest, output=Path(tmp) / "adapter",
            work_dir=Path(tmp) / "work", teacher_cache=a.teacher_cache or Path(tmp) / "tcache", batch_size=large,
            precision="fp32", device="cpu", text_kd_weight=a.text_kd_weight, progress=False, resume=False, prefetch=False))
        trainer = Trainer(config)
        counts = {b: count_ops(trainer, list(range(b))) for b in (small, large)}
    per_example = {k: (counts[large][k] - counts[small][k]) / (large - small) for k in ("ops", "syncs")}
    base = {k: counts[small][k] - per_example[k] * small for k in ("ops", "syncs")}
    out = {"measured": {str(b): c for b, c in counts.items()},
           "per_step": {k: round(v) for k, v in base.items()},
           "per_example": {k: round(v, 1) for k, v in per_example.items()},
           "extrapolated": {str(b): {k: round(base[k] + per_example[k] * b) for k in base} for b in a.extrapolate},
           "text_kd": config.text_kd_weight}
    print(json.dumps(out))
    print(f"per step {out['per_step']}, per example {out['per_example']}", file=sys.stderr)


if __name__ == "__main__":
    main()
