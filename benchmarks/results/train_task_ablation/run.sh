#!/usr/bin/env bash
# The ablation sweep: for each (task, seed) one SFT warm-up, then RL from it with every variant
# (python -m pgpo_bench.paired_runs).
# Two workers in the background (the machine has 2 cores shared with other jobs), one thread each; each (task, seed)
# logs to $OUT/<task>-s<seed>.log. Finished runs are skipped, so rerunning continues where it stopped.
#   bash benchmarks/results/train_task_ablation/run.sh                  # 8 seeds x 2 tasks, 40 RL steps
#   SEEDS="8 9" TASKS=count-copy bash benchmarks/results/train_task_ablation/run.sh
set -euo pipefail
OUT=${OUT:-runs/ablation}
SEEDS=${SEEDS:-"0 1 2 3 4 5 6 7"}
TASKS=${TASKS:-"grid-count count-copy"}
RL_STEPS=${RL_STEPS:-40}
VARIANTS=${VARIANTS:-grpo,dapo,pgpo,pgpo-k3,pgpo-beta0,pgpo-tau0}
HERE=$(dirname "$0")
# this checkout's pgpo_train, not whichever copy is installed
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
jobs=()
for task in $TASKS; do for seed in $SEEDS; do jobs+=("$task $seed"); done; done
worker() {  # worker i takes every second job: the first task's seeds first, two at a time
  local i=$1
  for ((j = i; j < ${#jobs[@]}; j += 2)); do
    read -r task seed <<< "${jobs[$j]}"
    OMP_NUM_THREADS=1 python -m pgpo_bench.paired_runs --task "$task" --seed "$seed" --out "$OUT" \
      --rl-steps "$RL_STEPS" --eval-every 10 --eval-size 256 --variants "$VARIANTS" >> "$OUT/$task-s$seed.log" 2>&1 || echo "failed: $task s$seed" >> "$OUT/failed.txt"
  done
}
worker 0 &
worker 1 &
wait
