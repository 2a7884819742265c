"""Print a run's learning curve from its ``train_log.jsonl``: loss terms and held-out WER against
steps and wall time (cumulative over resumed sittings), plus the recent steps/s.

Usage: python -m bench.learning_curve RUN_WORK_DIR [RUN_WORK_DIR ...]
       python -m bench.learning_curve --table [--keys eval_char_cer,eval_char_ctc,eval_distill] WORK_DIR ...

``--table`` puts several arms side by side, one row per evaluated step and one column per arm (cells: the keys,
joined by " / "), the way bench/OPEN_VOCAB_LOG.md compares A/B arms (bench/ab_arm.sh).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(work_dir: Path) -> list[dict[str, float]]:
    log = work_dir / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def curve(work_dir: Path) -> None:
    recs = records(work_dir)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if any(k.startswith("eval_") for k in r)]
    print(f"== {work_dir}  ({len(train)} train records, {len(evals)} evaluations)")
    keys = [k for k in ("loss", "ctc", "char_ctc", "distill", "ce") if train and k in train[-1]]
    print("step  elapsed_min  steps/s  " + "  ".join(f"{k:>8}" for k in keys))
    stride = max(1, len(train) // 15)
    for r in train[::stride] + ([train[-1]] if train and (len(train) - 1) % stride else []):
        print(f"{r['step']:>5}  {r.get('elapsed_s', 0) / 60:>10.1f}  {r['steps_per_s']:>7.3f}  "
              + "  ".join(f"{r[k]:>8.4f}" for k in keys))
    if evals:
        ekeys = [k for k in ("eval_loss", "eval_ctc", "eval_distill", "eval_ce", "eval_char_ctc", "eval_char_cer",
                                         "eval_ctc_wer", "eval_wer") if k in evals[-1]]
        print("held-out:\nstep  elapsed_min  " + "  ".join(f"{k:>12}" for k in ekeys))
        for r in evals:
            print(f"{r['step']:>5}  {r.get('elapsed_s', 0) / 60:>10.1f}  " + "  ".join(f"{r.get(k, float('nan')):>12.4f}" for k in ekeys))


def table(work_dirs: list[Path], keys: list[str]) -> None:
    """One row per evaluated step, one column per arm; a resumed run's repeated evaluation keeps the last."""
    arms = []
    for d in work_dirs:
        evals = {int(r["step"]): r for r in records(d) if any(k.startswith("eval_") for k in r)}
        arms.append(evals)
    names = [d.parent.name if d.name == "work" else d.name for d in work_dirs]
    print(f"cells: {' / '.join(keys)}")
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for step in sorted(set().union(*arms)):
        cells = [" / ".join(f"{arm[step][k]:.3f}" if k in arm[step] else "-" for k in keys) if step in arm else "-"
                 for arm in arms]
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dirs", nargs="+", type=Path)
    p.add_argument("--table", action="store_true", help="arms side by side at each evaluated step")
    p.add_argument("--keys", default="eval_char_cer,eval_char_ctc,eval_distill", help="the table's cells")
    a = p.parse_args()
    if a.table:
        table(a.work_dirs, a.keys.split(","))
    else:
        for d in a.work_dirs:
            curve(d)
