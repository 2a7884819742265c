"""Print a run's learning curve from its ``train_log.jsonl``: loss terms and held-out WER against
steps and wall time (cumulative over resumed sittings), plus the recent steps/s.

Usage: python bench/learning_curve.py RUN_WORK_DIR [RUN_WORK_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(work_dir: Path) -> None:
    log = work_dir / "train_log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
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


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        curve(Path(arg))
