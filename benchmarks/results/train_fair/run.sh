#!/usr/bin/env bash
# The fair comparison (issue 28), a job queue over pgpo_bench.paired_runs: workers in the background, niced, one
# thread each; a job is one warm-up (seed, no runs) or one (seed, variant@lr) RL run, which waits for its seed's warm-up.
# Finished runs are skipped (rerun to continue).
#   STAGE=select bash benchmarks/results/train_fair/run.sh   # the lr grid on the validation split
#   STAGE=test bash benchmarks/results/train_fair/run.sh     # the seeds at the rates select chose (summarize --choose)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$(cd "$HERE/../../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
OUT=${OUT:-runs/fair}
STAGE=${STAGE:-test}
WORKERS=${WORKERS:-4}
FILLER=${FILLER:-24}
TEXT_PROB=${TEXT_PROB:-0.3}
VARIANTS=${VARIANTS:-dapo pgpo pgpo-shuffled pgpo-dev}
RL_STEPS=${RL_STEPS:-60}; EVAL_SIZE=${EVAL_SIZE:-256}; SFT_STEPS=${SFT_STEPS:-}  # smaller only for smoke tests
if [ "$STAGE" = select ]; then
  SEEDS=${SEEDS:-"100 101"}; LRS=${LRS:-"3e-5 1e-4 3e-4"}; SPLIT=validation
  RUNS=$(for lr in $LRS; do for v in $VARIANTS; do printf '%s@%s ' "$v" "$lr"; done; done)
else
  SEEDS=${SEEDS:-"0 1 2 3 4 5 6 7"}; SPLIT=test
  RUNS=${RUNS:-$(python "$HERE/summarize.py" "$OUT" --choose 2>/dev/null | tr ',' ' ')}
  # the clip-off references at the chosen rates of dapo and pgpo
  for r in $RUNS; do case $r in dapo@*|pgpo@*) RUNS="$RUNS ${r%@*}-noclip@${r#*@}";; esac; done
fi
mkdir -p "$OUT/queue-$STAGE"
JOBS="$OUT/queue-$STAGE/jobs.txt"
: > "$JOBS"
for s in $SEEDS; do echo "$s|" >> "$JOBS"; done
for r in $RUNS; do for s in $SEEDS; do echo "$s|$r" >> "$JOBS"; done; done  # variant-major: paired seeds first
worker() {
  while true; do
    local picked="" n=0
    while IFS='|' read -r seed runs; do
      n=$((n + 1))
      [ -d "$OUT/queue-$STAGE/claim-$n" ] && continue
      if [ -n "$runs" ] && [ ! -f "$OUT/grid-reason-f$FILLER-p$TEXT_PROB-s$seed/roles.json" ]; then continue; fi
      if mkdir "$OUT/queue-$STAGE/claim-$n" 2>/dev/null; then picked="$seed|$runs"; break; fi
    done < "$JOBS"
    if [ -z "$picked" ]; then
      [ "$(ls -d "$OUT/queue-$STAGE"/claim-* 2>/dev/null | wc -l)" -ge "$(wc -l < "$JOBS")" ] && return 0
      sleep 30; continue
    fi
    IFS='|' read -r seed runs <<< "$picked"
    nice -n 10 python -m pgpo_bench.paired_runs --task grid-reason --filler "$FILLER" --text-prob "$TEXT_PROB" \
      --seed "$seed" --eval-split "$SPLIT" --variants "$runs" --rl-steps "$RL_STEPS" --eval-every "$RL_STEPS" \
      --eval-size "$EVAL_SIZE" ${SFT_STEPS:+--sft-steps "$SFT_STEPS"} --roles 32 --out "$OUT" >> "$OUT/unit-s$seed.log" 2>&1 \
      || echo "failed: s$seed $runs" >> "$OUT/failed.txt"
  done
}
for ((w = 0; w < WORKERS; w++)); do worker & done
wait
