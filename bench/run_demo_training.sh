#!/usr/bin/env bash
# The demo adapter end to end, as it was run for adapters/demo_adapter (2 shared CPU cores).
# HISTORICAL: it used the templated corpus of adapters/training/demo_data.py (closed vocabulary,
# held-out split sharing templates), removed after commit 4b05534; `aura data demo` now builds the
# open-vocabulary corpus. The successor of this script is bench/train_demo.sh.
# Usage: AURA_HOME=/path bench/run_demo_training.sh   (each stage is cached/resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
AURA=(${AURA_BIN:-.venv/bin/aura})   # the `aura` console script (server/cli.py + adapters/cli.py)
export AURA_HOME=${AURA_HOME:-$HOME/.cache/aura}
M=$AURA_HOME/models D=$AURA_HOME/demo_data R=$AURA_HOME/runs
STEPS=${STEPS:-600}

"${AURA[@]}" models demo                                   # SmolLM2-135M-Instruct + Whisper tiny.en
"${AURA[@]}" data demo --out "$D" --train 1600 --heldout 80  # espeak-ng clips + base-LLM responses (vLLM)
head -1200 "$D/train.jsonl" > "$D/train_1200.jsonl"        # what fits the CPU time budget
# balanced held-out eval set: the first 20 transcribe + 20 qa rows (unseen sentences, unseen voices)
"${PYTHON:-.venv/bin/python}" - "$D" <<'PY'
import json, sys
d = sys.argv[1]
rows = [json.loads(l) for l in open(f"{d}/heldout.jsonl")]
tr = [r for r in rows if r["task"] == "transcribe"][:20]; qa = [r for r in rows if r["task"] == "qa"][:20]
open(f"{d}/heldout_eval.jsonl", "w").write("".join(json.dumps(r) + "\n" for pair in zip(tr, qa) for r in pair))
PY
common=(--student "$M/smollm2-135m-instruct" --teacher "$M/whisper-tiny.en" --manifest "$D/train_1200.jsonl"
        --eval-manifest "$D/heldout_eval.jsonl" --teacher-cache "$AURA_HOME/teacher_cache" --steps "$STEPS")
# AuRA (distillation) and the ablation (next-token loss only) side by side, one thread each
"${AURA[@]}" train --config bench/train_demo.yaml "${common[@]}" --output "$R/demo/adapter" --work-dir "$R/demo/work" \
    > "$R/demo.out" 2> "$R/demo.err" &
"${AURA[@]}" train --config bench/train_demo_ablation.yaml "${common[@]}" --output "$R/ablation/adapter" --work-dir "$R/ablation/work" \
    > "$R/ablation.out" 2> "$R/ablation.err" &
wait
# held-out split: unseen sentences/questions and unseen voices; AuRA vs cascade on the same clips
"${AURA[@]}" eval --manifest "$D/heldout_eval.jsonl" --adapter "$R/demo/adapter" --threads 1 --details "$R/eval_demo.jsonl"
"${AURA[@]}" eval --manifest "$D/heldout_eval.jsonl" --adapter "$R/ablation/adapter" --no-cascade --threads 1 --details "$R/eval_ablation.jsonl"
