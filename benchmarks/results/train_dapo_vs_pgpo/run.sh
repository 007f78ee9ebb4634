#!/usr/bin/env bash
# dapo vs pgpo on the embedded default (tiny Qwen2.5-VL, synthetic count task), same seeds, 300 RL steps each.
# Everything but --algo/--steps/--seed is pgpo-train's default. Runs in the background; results land in runs/bench-*.
set -euo pipefail
STEPS=${STEPS:-300}
SEEDS=${SEEDS:-"0 1"}
for seed in $SEEDS; do
  for algo in dapo pgpo; do
    nohup pgpo-train --algo "$algo" --seed "$seed" --steps "$STEPS" --out-dir "runs/bench-$algo-s$seed" --overwrite \
      --no-progress > "runs/bench-$algo-s$seed.log" 2>&1 &
  done
done
wait
