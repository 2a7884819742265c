#!/usr/bin/env bash
# One arm of the CPU stage-1 A/B in bench/OPEN_VOCAB_LOG.md (`fm`, `fm_enc2_la8`, ...): the character-CTC recipe
# (bench/train_char_ctc_cpu.yaml: from scratch, transcription, SmolLM2 blocks 0..9, distillation + LM-head CTC +
# character CTC at block 2), on the corpus's hearable transcription clips, measured on its held-out transcription clips.
# Arms differ only in the trainer flags after NAME; rows, batch order and seed are the same, so curves compare step by
# step. Rerun the same line to resume (the trainer resumes from RUN/work's last checkpoint).
#
# It used to live in an ignored run folder (run_la.sh, run_enc.sh, run_rank.sh), which a new checkout lost twice.
#
#   AURA_HOME=$PWD/.aura CORPUS=$PWD/.aura/corpus_v6 bench/ab_arm.sh fm
#   AURA_HOME=$PWD/.aura CORPUS=$PWD/.aura/corpus_v6 bench/ab_arm.sh fm_enc2_la8 --audio-encoder-layers 2 --audio-encoder-lookahead 8
#   python -m bench.learning_curve --table $AURA_HOME/runs/ab/fm/work $AURA_HOME/runs/ab/fm_enc2_la8/work
#
# STEPS (default 1500) and THREADS (default 1) as environment variables; NICE=1 runs it under `nice`.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: bench/ab_arm.sh NAME [trainer flags...]" >&2; exit 2; }
NAME=$1; shift
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
export AURA_HOME=${AURA_HOME:-$HOME/.cache/aura}
M=$AURA_HOME/models C=${CORPUS:-$AURA_HOME/corpus} AB=${AB:-$AURA_HOME/runs/ab}
RUN=$AB/$NAME
mkdir -p "$RUN"
ROWS=$AB/train_hearable_transcribe.jsonl
if [[ ! -f "$ROWS" || "$C/train.jsonl" -nt "$ROWS" ]]; then
  # the clips the teacher hears (not espeak-ng), transcription rows only: `fm`'s rows of the log
  # (written beside the corpus's manifest, where the rows' relative audio paths hold, then here with absolute ones)
  "$PY" -m bench.qa_rows --manifest "$C/train.jsonl" --out "$C/.ab_rows.jsonl" --wiki 0 --hearable >/dev/null
  "$PY" - "$C/.ab_rows.jsonl" "$ROWS" <<'EOF'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
base = os.path.dirname(os.path.abspath(src))
rows = [json.loads(line) for line in open(src) if line.strip()]
rows = [{**r, "audio": os.path.join(base, r["audio"])} for r in rows if r["task"] == "transcribe"]
with open(dst + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
os.replace(dst + ".tmp", dst)
print(f"{dst}: {len(rows)} hearable transcription rows")
EOF
  rm -f "$C/.ab_rows.jsonl"
fi
HELD=$C/heldout_resp.jsonl; [[ -f "$HELD" ]] || HELD=$C/heldout.jsonl
"$PY" -m server.cli models demo --quiet
run=("$PY" -m server.cli train --config bench/train_char_ctc_cpu.yaml --student "$M/smollm2-135m-instruct"
     --teacher "$M/whisper-tiny.en" --manifest "$ROWS" --eval-manifest "$HELD" --teacher-cache "$AURA_HOME/teacher_cache"
     --steps "${STEPS:-1500}" --threads "${THREADS:-1}" --output "$RUN/adapter" --work-dir "$RUN/work" "$@")
[[ -n "${NICE:-}" ]] && run=(nice "${run[@]}")
printf '%q ' "${run[@]}" > "$RUN/command.txt"; echo >> "$RUN/command.txt"
exec "${run[@]}"
