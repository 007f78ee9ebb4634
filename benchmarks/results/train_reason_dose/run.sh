#!/usr/bin/env bash
# The grid-reason dose-response sweep: for each (filler, seed) one SFT warm-up, then the checkpoint measurements
# (grad_at_checkpoint.py) and RL from it with every variant (python -m pgpo_bench.paired_runs). Two workers in the
# background (the machine has 2 cores shared with other jobs), one thread each, niced; each (filler, seed) logs to
# $OUT/f<filler>-s<seed>.log.
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
    base="$OUT/grid-reason-f$f-s$seed"
    {
      OMP_NUM_THREADS=1 nice -n 10 python -m pgpo_bench.paired_runs --task grid-reason --filler "$f" --seed "$seed" \
        --out "$OUT" --rl-steps "$RL_STEPS" --eval-every 5 --eval-size "$EVAL_SIZE" --lr 1e-4 --variants "$v" \
      && { [ -f "$base/at_checkpoint.json" ] || OMP_NUM_THREADS=1 nice -n 10 python "$HERE/grad_at_checkpoint.py" \
             "$base/sft-model" --filler "$f" --seed "$seed" > "$base/at_checkpoint.json"; }
    } >> "$OUT/f$f-s$seed.log" 2>&1 || echo "failed: f$f s$seed" >> "$OUT/failed.txt"
  done
}
worker 0 &
worker 1 &
wait
