#!/usr/bin/env bash
# The grid-reason dose-response sweep: for each (filler, seed) one SFT warm-up, then the checkpoint
# measurements and RL from it with every variant (run_seed.py). Two workers in the background (the machine has 2
# cores shared with other jobs), one thread each, niced; each (filler, seed) logs to $OUT/f<filler>-s<seed>.log.
# Jobs run seed-major (seed 0 of every filler, then seed 1, ...), so a sweep cut short still has paired seeds at
# every filler. Finished runs are skipped: rerunning continues where it stopped.
#   bash benchmarks/results/train_reason_dose/run.sh
#   SEEDS="8 9" FILLERS=24 bash benchmarks/results/train_reason_dose/run.sh
set -euo pipefail
OUT=${OUT:-runs/reason}
SEEDS=${SEEDS:-"0 1 2 3 4 5 6 7"}
FILLERS=${FILLERS:-"0 24 64"}
RL_STEPS=${RL_STEPS:-20}
EVAL_SIZE=${EVAL_SIZE:-128}
VARIANTS=${VARIANTS:-dapo,pgpo,pgpo-shuffled,pgpo-inverted}
GRPO_FILLER=${GRPO_FILLER:-24}  # GRPO runs once, at this filler only
HERE=$(dirname "$0")
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
jobs=()
for seed in $SEEDS; do for f in $FILLERS; do jobs+=("$f $seed"); done; done
worker() {
  local i=$1
  for ((j = i; j < ${#jobs[@]}; j += 2)); do
    read -r f seed <<< "${jobs[$j]}"
    v=$VARIANTS
    [ "$f" = "$GRPO_FILLER" ] && v="$v,grpo"
    OMP_NUM_THREADS=1 nice -n 10 python "$HERE/run_seed.py" --filler "$f" --seed "$seed" --out "$OUT" \
      --rl-steps "$RL_STEPS" --eval-size "$EVAL_SIZE" --variants "$v" >> "$OUT/f$f-s$seed.log" 2>&1 \
      || echo "failed: f$f s$seed" >> "$OUT/failed.txt"
  done
}
worker 0 &
worker 1 &
wait
