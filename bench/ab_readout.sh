#!/usr/bin/env bash
# End to end through an A/B arm's CTC head: the arm's newest checkpoint spells its held-out clips and a text-trained
# reader (bench/text_readout.py --save-reader, same unit: characters, or pieces with the run's --char-ctc-merges)
# transcribes the spellings (bench/char_readout.py; README finding 7). The arm's own trainer flags come from the
# command.txt that bench/ab_arm.sh wrote, so its checkpoint loads with the fingerprint it was saved under.
#
#   AURA_HOME=$PWD/.aura bench/ab_readout.sh enc1_ad1_pieces $AURA_HOME/runs/readers/pieces1024 --modes collapsed hard
#
# Extra flags go to bench/char_readout.py (--checkpoint, --modes, --limit, --json). THREADS (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { echo "usage: bench/ab_readout.sh NAME READER [char_readout flags...]" >&2; exit 2; }
NAME=$1 READER=$2; shift 2
export PYTHONPATH=${PYTHONPATH:-$PWD}
export AURA_HOME=${AURA_HOME:-$HOME/.cache/aura}
RUN=${AB:-$AURA_HOME/runs/ab}/$NAME
[[ -f "$RUN/command.txt" ]] || { echo "ab_readout: no $RUN/command.txt (bench/ab_arm.sh writes it)" >&2; exit 2; }
eval "run=($(cat "$RUN/command.txt"))"
# drop `nice` and everything up to `server.cli train`: keep the interpreter and the trainer's flags
while [[ ${#run[@]} -gt 0 && "${run[0]}" != *python* ]]; do run=("${run[@]:1}"); done
[[ ${#run[@]} -ge 4 && "${run[*]:1:3}" == "-m server.cli train" ]] || { echo "ab_readout: $RUN/command.txt is not an aura train line" >&2; exit 2; }
py=${run[0]} flags=("${run[@]:4}")
flags+=(--threads "${THREADS:-1}")
exec "$py" -m bench.char_readout --reader "$READER" "${flags[@]}" "$@"
