#!/usr/bin/env bash
# The open-vocabulary demo adapter on one leased GPU (bench/train_open_gpu.yaml), from a payload
# made by `python -m bench.gpu_payload pack` (see its docstring for why a payload):
#
#   bench/train_demo_gpu.sh PAYLOAD_DIR OUT_DIR DEADLINE_UNIX_S
#   RESUME=DIR_WITH_CKPT EXTRA="--init-from A ..." bench/train_demo_gpu.sh ...   # later sittings / other levers
#   ORACLE=1 bench/train_demo_gpu.sh ...   # the same run with the teacher in the audio layer's place (a control)
#   SETUP_ONLY=1 bench/train_demo_gpu.sh ...   # join, wheels, corpus, models into $WORK, no training (bench/gpu_arms.sh)
#
# Everything lands in OUT_DIR before DEADLINE (the lease's end): the log of every step, the
# training log, the held-out curve and the adapter (tar, split in 15 MiB pieces). The training
# time budget is what is left after setup minus a reserve for the final evaluation and export;
# if the trainer still overruns, it is interrupted (it checkpoints) and the newest checkpoint
# is exported. Needs python3 with torch, transformers, peft; the payload's wheels add the rest.
set -euo pipefail
P=$(realpath "$1"); OUT=$(realpath "$2"); DEADLINE=$3
W=${WORK:-/tmp/aura_gpu}; RESERVE=${RESERVE:-110}; PY=${PYTHON:-python3}
mkdir -p "$W" "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/device.log") 2>&1
# The device's reply shows only the last 12,000 characters: transformers' load report of the
# encoder-only teacher (~10 kB listing the decoder it was not given) and its loading bars would
# push the training log out of it. Errors still print.
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} HF_HUB_DISABLE_PROGRESS_BARS=1
# batch 256 ran out of the H100's 80 GB at its first backward (2026-11-27: 74 GiB held, 10 GiB of it
# reserved but unallocated); expandable segments keep fragmentation from costing a lease
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
say() { echo "[$(date -u +%T)] $*"; }
say "start; $(( DEADLINE - $(date +%s) )) s to the deadline"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || true
"$PY" -m bench.gpu_payload join --payload "$P"   # files larger than one call's carry (the GGUF) came in pieces
if [[ -z "${NO_WHEELS:-}" ]]; then
  # each setup step is skipped when its result is there: bench/gpu_arms.sh sets up once and links it into every arm
  [[ -f "$W/site/.installed" ]] \
    || { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$P"/whl/*.whl \
         && touch "$W/site/.installed"; }
  export PYTHONPATH=$PWD:$W/site
else
  export PYTHONPATH=$PWD
fi
# Fail in seconds, not after the unpacking, when a module the run imports is neither in the device's image nor
# among the payload's wheels (2026-11-27: gguf, which the LLM conversion needs, was missing and cost a call)
"$PY" -c "import gguf, pydantic, soundfile, av, peft, transformers" \
  || { say "a module is missing: add its wheel to the payload (bench/GPU_PLAN.md, step 1)"; exit 3; }
if [[ ! -f "$W/corpus/.unpacked" ]]; then
  say "unpacking the corpus"
  "$PY" -m bench.gpu_payload unpack --payload "$P" --out "$W" && touch "$W/corpus/.unpacked"
fi
if [[ ! -f "$W/models/.converted" ]]; then
say "converting the LLM"
"$PY" - "$P" "$W" <<'PYEOF'
import shutil
import sys
from pathlib import Path
from adapters.provision.gguf_llm import convert_gguf_llm
from bench.gpu_payload import weights_digest
P, W = Path(sys.argv[1]), Path(sys.argv[2])
out = W / "models" / "smollm2-135m-instruct"
if not (out / "config.json").is_file():
    convert_gguf_llm(next(P.glob("*.gguf")), out, progress=False)
# this machine's transformers may name other special tokens (5.17: eos <|im_start|>, no pad): use the payload's
for f in sorted((P / "llm_tokenizer").glob("*")):
    shutil.copy(f, out / f.name)
want, got = (P / "llm_digest.txt").read_text().strip(), weights_digest(out)
print("llm weights digest", got, "== this repo's conversion" if got == want else f"DIFFERS from {want}")
PYEOF
rm -rf "$W/models/whisper-tiny.en" && cp -r "$P/teacher" "$W/models/whisper-tiny.en" && touch "$W/models/.converted"
fi
if [[ -n "${SETUP_ONLY:-}" ]]; then say "set up in $W"; exit 0; fi
budget=$(( DEADLINE - $(date +%s) - RESERVE ))
# A later sitting (RESUME=dir holding the ckpt-*.pt an earlier one packed) continues that run exactly:
# the trainer's time budget counts all sittings together, so this one adds its own to what was spent.
spent=0
if [[ -n "${RESUME:-}" ]]; then
  mkdir -p "$W/run/work"
  ckpt=$(ls "$RESUME"/ckpt-*.pt | sort | tail -1)
  cp "$ckpt" "$W/run/work/"
  spent=$("$PY" -c "import sys, torch; print(int(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['elapsed_s']))" "$ckpt")
  say "resuming $(basename "$ckpt") after ${spent} s of training"
fi
say "training for ${budget} s"
cat > "$W/aura_train.py" <<'PYEOF'
# `aura train` without the server package (its imports need vLLM and FastAPI, absent here)
import argparse, sys
from adapters.cli import add_commands
p = argparse.ArgumentParser(prog="aura")
add_commands(p.add_subparsers(dest="cmd", required=True))
a = p.parse_args(["train", *sys.argv[1:]])
sys.exit(a.func(a))
PYEOF
args=(--config bench/train_open_gpu.yaml --student "$W/models/smollm2-135m-instruct" --teacher "$W/models/whisper-tiny.en"
      --manifest "$W/corpus/${TRAIN_MANIFEST:-train_qa.jsonl}" --eval-manifest "$W/corpus/${HELDOUT_MANIFEST:-heldout_resp.jsonl}"
      --teacher-cache "$W/tcache" --output "$W/run/adapter" --work-dir "$W/run/work" --threads "${THREADS:-8}"
      --time-budget-s "$(( spent + budget ))" ${EXTRA:-})
# ORACLE=1: the control arm (bench/OPEN_VOCAB_LOG.md, stop 24): the same recipe and flags with
# the frozen teacher in the audio layer's place (bench/oracle_readout.py). It exports nothing (the teacher would be
# in inference); its log and checkpoint come back as a run's do.
prog=("$W/aura_train.py")
if [[ -n "${ORACLE:-}" ]]; then prog=(-m bench.oracle_readout); say "oracle arm: the teacher feeds the LLM"; fi
# SIGINT makes the trainer checkpoint and stop; then the newest checkpoint is exported
timeout --signal=INT $(( budget + RESERVE - 15 )) "$PY" "${prog[@]}" "${args[@]}" \
  || { say "training did not finish in time"; [[ -n "${ORACLE:-}" ]] \
       || { say "exporting the newest checkpoint"; timeout 40 "$PY" "$W/aura_train.py" "${args[@]}" --export-only || true; }; }
say "packing results"
cp "$W/run/work/train_log.jsonl" "$OUT/" 2>/dev/null || true
if [[ -f "$W/run/adapter/aura_config.json" ]]; then
  tar -C "$W/run" -cf - adapter | split -b 15M - "$OUT/adapter.tar.part-"
fi
# the newest checkpoint (weights, optimizer, clock) travels back too, so a later lease can RESUME it
last=$(ls "$W"/run/work/ckpt-*.pt 2>/dev/null | sort | tail -1 || true)
if [[ -n "$last" ]]; then
  tar -C "$(dirname "$last")" -cf - "$(basename "$last")" | split -b 15M - "$OUT/ckpt.tar.part-"
fi
# a call gives back at most 64 MiB (8 files): the pieces past that wait in $W/rest for the next call
mkdir -p "$W/rest" && rm -f "$W/rest"/*
total=0; kept=0
for f in "$OUT"/device.log "$OUT"/train_log.jsonl "$OUT"/adapter.tar.part-* "$OUT"/ckpt.tar.part-*; do
  [[ -f "$f" ]] || continue
  size=$(stat -c %s "$f")
  if (( total + size > 62 * 1024 * 1024 || kept >= 8 )); then mv "$f" "$W/rest/"; else total=$(( total + size )); kept=$(( kept + 1 )); fi
done
ls -la "$OUT"
if [[ -n "$(ls "$W/rest")" ]]; then
  say "$(ls "$W/rest" | wc -l) pieces did not fit; within the idle window, call: cp $W/rest/* \$OUT/"
fi
say "done"
