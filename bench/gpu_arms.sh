#!/usr/bin/env bash
# Several arms of the lease side by side on one GPU, from one payload set up once:
#
#   bench/gpu_arms.sh PAYLOAD_DIR OUT_DIR DEADLINE_UNIX_S "NAME|ENV|EXTRA" ...
#   e.g. "oracle|ORACLE=1|--char-ctc-weight 1.0 --ctc-weight 0"  "enc1|-|--audio-encoder-layers 1 ..."
#
# Why: a training step of this recipe is bound by dispatch, not arithmetic (bench/step_ops.py: batch 128
# costs 1.6x the operator calls of batch 64), so one run leaves much of a GPU idle, and a lease is 15
# minutes: on 2026-11-28 three arms at batch 128 ran 2.6 steps/s together on one H200 (85.8 GB), where one
# arm alone had run 2.03 on an H100 (bench/OPEN_VOCAB_LOG.md, stop 35). Each arm is bench/train_demo_gpu.sh with its own work folder (checkpoints, teacher
# cache, adapter) linked to the shared corpus, models and wheels, the same deadline and
# THREADS (default: the cores shared out). TRAIN_MANIFEST and the other variables pass through.
#
# OUT_DIR gets what a call can bring back (8 files, 62 MiB): logs.tar (every arm's device.log and
# train_log.jsonl), then each arm's adapter pieces as NAME.adapter.tar.part-*, in the arms' order;
# the rest (more adapter pieces, then the checkpoints as NAME.ckpt.tar.part-*) waits in
# $WORK/rest for the next calls, at most four 15 MiB pieces a call: `mv /tmp/aura_gpu/rest/*adapter* $OUT/`,
# then `mv $(ls -d /tmp/aura_gpu/rest/NAME.ckpt* | head -4) $OUT/` (bench/GPU_PLAN.md, step 2).
set -euo pipefail
P=$(realpath "$1"); OUT=$(realpath "$2"); DEADLINE=$3; shift 3
B=${WORK:-/tmp/aura_gpu}
mkdir -p "$B" "$OUT"
here=$(cd "$(dirname "$0")" && pwd)
say() { echo "[$(date -u +%T)] $*"; }
WORK=$B SETUP_ONLY=1 "$here/train_demo_gpu.sh" "$P" "$B/setup_out" "$DEADLINE"
n=$#; threads=${THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
names=(); pids=()
for arm in "$@"; do
  IFS='|' read -r name env extra <<<"$arm"
  w="$B/arms/$name"; rm -rf "$w"; mkdir -p "$w"
  for d in corpus models site; do if [[ -e "$B/$d" ]]; then ln -s "$B/$d" "$w/$d"; fi; done
  envs=(); [[ "$env" != "-" && -n "$env" ]] && read -ra envs <<<"$env"
  say "arm $name: ${envs[*]:-} $extra"
  env "${envs[@]}" WORK="$w" THREADS="$threads" EXTRA="$extra" \
    "$here/train_demo_gpu.sh" "$P" "$w/out" "$DEADLINE" > "$B/arms/$name.log" 2>&1 &
  names+=("$name"); pids+=($!)
done
for k in "${!pids[@]}"; do
  if wait "${pids[$k]}"; then say "arm ${names[$k]} done"; else say "arm ${names[$k]} exited $?"; fi
done
# what comes back: the logs first, then the adapters, then the checkpoints (for RESUME)
mkdir -p "$B/rest" && rm -rf "$B/rest"/*
logs=(); for name in "${names[@]}"; do
  for f in device.log train_log.jsonl; do [[ -f "$B/arms/$name/out/$f" ]] && logs+=("arms/$name/out/$f"); done
  logs+=("arms/$name.log")
done
tar -C "$B" -cf "$OUT/logs.tar" "${logs[@]}"
queue=()
for kind in adapter ckpt; do
  for name in "${names[@]}"; do
    for f in "$B/arms/$name/out/$kind".tar.part-* "$B/arms/$name/rest/$kind".tar.part-*; do
      [[ -f "$f" ]] && { cp "$f" "$B/rest/$name.$(basename "$f")"; queue+=("$B/rest/$name.$(basename "$f")"); }
    done
  done
done
total=$(stat -c %s "$OUT/logs.tar"); kept=1
for f in "${queue[@]}"; do
  size=$(stat -c %s "$f")
  (( total + size > 62 * 1024 * 1024 || kept >= 8 )) && break
  mv "$f" "$OUT/"; total=$(( total + size )); kept=$(( kept + 1 ))
done
for name in "${names[@]}"; do echo "== $name"; tail -n 4 "$B/arms/$name.log"; done
ls -la "$OUT"
[[ -n "$(ls "$B/rest")" ]] && say "$(ls "$B/rest" | wc -l) pieces wait in $B/rest (adapters first): ls $B/rest"
say "done"
