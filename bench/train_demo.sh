#!/usr/bin/env bash
# The open-vocabulary demo adapter end to end (successor of bench/run_demo_training.sh).
#
#   corpus -> responses -> stage 1 (blocks 0..9 only, transcription, distillation + CTC)
#          -> stage 2 (full student from stage 1, transcription + QA) -> held-out eval
#
# "corpus responses" alone build, from nothing, the corpus a GPU lease trains on (bench/GPU_PLAN.md):
# train.jsonl / heldout.jsonl (the clips), train_qa.jsonl (+ answer rows, bench/qa_rows.py, with the base
# LLM's answers), heldout_resp.jsonl (held-out with answers) and train_qa_hearable.jsonl (the rows whose
# voice the teacher hears). ~2 h on this 2-core CPU, most of it vLLM writing lines and answers.
#
# Every stage is cached or resumable: rerun the same command after an interruption and it
# continues (texts_raw.jsonl / audio_meta.jsonl for the corpus, answers already written are reused,
# checkpoints every save_every steps; teacher targets are cached per clip on first use).
#
# Usage (CPU, 1 torch thread, as run for this repo):
#   AURA_HOME=/work/main/.aura bench/train_demo.sh
# Stages can be picked: STAGES="corpus responses stage1 stage2 eval" (default: all).
# GPU (device auto -> cuda): the same script, with bf16 autocast and a larger batch:
#   AURA_HOME=... PRECISION=bf16 BATCH=32 ACCUM=1 THREADS=4 STAGES="stage1 stage2" bench/train_demo.sh
# (the corpus and responses need vLLM, which the GPU machine lacks: build them on a CPU box and
# copy $AURA_HOME/corpus over). Multi-GPU: TORCHRUN="torchrun --nproc_per_node 8" (see adapters/training/ddp.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
export AURA_HOME=${AURA_HOME:-$HOME/.cache/aura}
M=$AURA_HOME/models C=${CORPUS:-$AURA_HOME/corpus} R=${RUN:-$AURA_HOME/runs/open_vocab}
STAGES=${STAGES:-"corpus responses stage1 stage2 eval"}
TRAIN_LINES=${TRAIN_LINES:-10000} HELDOUT=${HELDOUT:-90} LLM_PROMPTS=${LLM_PROMPTS:-10240} QA_WIKI=${QA_WIKI:-500}
STAGE1_STEPS=${STAGE1_STEPS:-4000} STAGE2_STEPS=${STAGE2_STEPS:-4000}
PRECISION=${PRECISION:-fp32} BATCH=${BATCH:-8} ACCUM=${ACCUM:-1} THREADS=${THREADS:-1}
mkdir -p "$R"
has() { [[ " $STAGES " == *" $1 "* ]]; }
train() { if [[ -n "${TORCHRUN:-}" ]]; then $TORCHRUN -m adapters.training.ddp "$@"; else "$PY" -m server.cli train "$@"; fi; }

"$PY" -m server.cli models demo --quiet                 # SmolLM2-135M-Instruct + Whisper tiny.en (one-time)
if has corpus; then
  # LLM-written everyday lines (vLLM) + encyclopedia trigram lines, espeak-ng accents x variants, Piper and
  # flite/Festival voices (the ones the teacher hears), augmentation; held-out in voices of held-out-only speakers
  # HELDOUT_FROM=<an earlier build's heldout.jsonl> keeps its held-out lines and clips, so a bigger corpus is measured
  # on the same clips as the one before it (corpus v7 = v6's held-out, 30,000 training lines; bench/GPU_PLAN.md)
  held=(--heldout "$HELDOUT"); [[ -n "${HELDOUT_FROM:-}" ]] && held=(--heldout-from "$HELDOUT_FROM")
  "$PY" -m server.cli data demo --out "$C" --train "$TRAIN_LINES" "${held[@]}" --llm-prompts "$LLM_PROMPTS" \
    --neural-share "${NEURAL_SHARE:-0.4}" --system-share "${SYSTEM_SHARE:-0.5}" --heldout-voices "${HELDOUT_VOICES:-system}" \
    --workers "${WORKERS:-2}" --no-responses
fi
if has responses; then
  # an answer row for every everyday line and QA_WIKI encyclopedia lines, then the base LLM's own answers.
  # Rows are rebuilt whenever the corpus stage rewrote train.jsonl (new voices change the rows' clips and
  # voice names); answers already written are kept (--answers-from), so vLLM runs only for new questions,
  # and the old manifest is replaced only by a complete one.
  if [[ ! -f "$C/train_qa.jsonl" || "$C/train.jsonl" -nt "$C/train_qa.jsonl" ]]; then
    "$PY" -m bench.qa_rows --manifest "$C/train.jsonl" --out "$C/train_qa.next.jsonl" --wiki "$QA_WIKI"
    reuse=(); [[ -f "$C/train_qa.jsonl" ]] && reuse=(--answers-from "$C/train_qa.jsonl")
    "$PY" -m server.cli data responses --manifest "$C/train_qa.next.jsonl" "${reuse[@]}" --max-tokens 64
    mv "$C/train_qa.next.jsonl" "$C/train_qa.jsonl"
  fi
  reuse=(); [[ -f "$C/heldout_resp.jsonl" ]] && reuse=(--answers-from "$C/heldout_resp.jsonl")
  "$PY" -m server.cli data responses --manifest "$C/heldout.jsonl" --out "$C/heldout_resp.jsonl" "${reuse[@]}" --max-tokens 64
  "$PY" -m bench.qa_rows --manifest "$C/train_qa.jsonl" --out "$C/train_qa_hearable.jsonl" --wiki 0 --hearable
fi
common=(--student "$M/smollm2-135m-instruct" --teacher "$M/whisper-tiny.en" --eval-manifest "$C/heldout_resp.jsonl"
        --teacher-cache "$AURA_HOME/teacher_cache" --precision "$PRECISION" --batch-size "$BATCH" --grad-accum "$ACCUM"
        --threads "$THREADS")
if has stage1; then
  train --config bench/train_open_stage1.yaml "${common[@]}" --manifest "$C/train.jsonl" --steps "$STAGE1_STEPS" \
      --output "$R/stage1/adapter" --work-dir "$R/stage1/work"
fi
if has stage2; then
  [[ -f "$R/stage1/adapter/aura_config.json" ]] || "$PY" -m server.cli train --config bench/train_open_stage1.yaml "${common[@]}" \
      --manifest "$C/train.jsonl" --steps "$STAGE1_STEPS" --output "$R/stage1/adapter" --work-dir "$R/stage1/work" --export-only
  train --config bench/train_open_stage2.yaml "${common[@]}" --manifest "$C/train_qa.jsonl" --steps "$STAGE2_STEPS" \
      --init-from "$R/stage1/adapter" --output "$R/stage2/adapter" --work-dir "$R/stage2/work"
fi
if has eval; then
  # held-out: no 4-gram shared with training, voice variants never used in training, a third noisy
  "$PY" -m server.cli eval --manifest "$C/heldout_resp.jsonl" --adapter "$R/stage2/adapter" --threads "$THREADS" \
      --details "$R/eval_stage2.jsonl" | tee "$R/eval_stage2.json"
  "$PY" -m server.cli eval --manifest "$C/heldout_resp.jsonl" --adapter adapters/demo_adapter --no-cascade --threads "$THREADS" \
      --details "$R/eval_old_demo.jsonl" | tee "$R/eval_old_demo.json"
fi
