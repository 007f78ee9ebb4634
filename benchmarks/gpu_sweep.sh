#!/usr/bin/env bash
# One-shot GPU run of pgpo-bench: its steps' time limits add up to 595 s (tests 75, kl 80, reshape 55, weights 80,
# stats 80, linear 70, logp 60, model 5, train_dist 90), inside the device tool's 10 minutes per command (not yet
# run on a GPU). Runs the GPU tests, then
# the sweeps (bf16, vocab 152064, every op and backend), and leaves in $OUT:
#   gpu_tests.log, sweep.log, <device>.json (all ops merged), <device>.png (GB/s vs tokens), <device>.md (table),
#   logp.{json,md} (loss head fwd + bwd: peak extra memory, time per token), model.{json,md} (modeled bytes/FLOPs/ms),
#   train_dist/results.{json,md} (pgpo-train rollout/update tokens/s, 1 GPU vs all GPUs).
# Each step has its own time limit, so a hang or an OOM in one op still leaves the others' results.
# `bash benchmarks/gpu_sweep.sh rollout` (its own command: the sweep above already fills 10 minutes) runs only
# pgpo_bench.rollout_engine: pgpo-train's RL step with HF generate vs a colocated vLLM engine, at most 300 s, into
# $OUT/rollout_engine/results.{json,md}; it needs vLLM (a CUDA build) in the device image.
#
# Use (from the repository root, on the device machine):
#   bash benchmarks/gpu_sweep.sh
# Liger-Kernel is not in the device image and nothing can be downloaded there: carry its wheel in .whl/ (see
# benchmarks/README.md, "GPU sweep"); without it the liger rows say "liger-kernel not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_sweep}
rm -rf /tmp/pgpo_sweep; mkdir -p "$OUT" /tmp/pgpo_sweep
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# conftest turns the Triton interpreter on unless told otherwise: here the kernels must compile for the GPU
export TRITON_INTERPRET=0
PY=${PY:-python3}

if [ "${1:-}" = rollout ]; then  # HF generate vs colocated vLLM in pgpo-train's loop, embedded tiny model, cuda
  "$PY" -c "import vllm" >/dev/null 2>&1 || { echo "!! rollout: vLLM is not installed here"; exit 1; }
  timeout 300 "$PY" -m pgpo_bench.rollout_engine --device cuda --steps 6 --prompts-per-step 32 --group-size 8 \
    --max-new-tokens 64 --out "$OUT/rollout_engine" --machine "device machine, $(nvidia-smi -L | head -1)" \
    2>&1 | tail -20 || echo "!! rollout exited with $?"
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -c "import liger_kernel.ops.kl_div; print('liger-kernel importable')" 2>&1 | tail -1
} | tee "$OUT/sweep.log"

# -- 1. GPU tests (pytest -m gpu), at most 75 s ------------------------------------------------------------------
timeout 75 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5

# -- 2. sweeps, one process per op ---------------------------------------------------------------------------------
# overridable for a dry run of the plumbing on a CPU, e.g. DEVICE=cpu VOCAB=512 SWEEP=1,8 LINEAR_TOKENS=8 HIDDEN=32
DEVICE=${DEVICE:-cuda}
SWEEP=${SWEEP:-1,4,16,64,256,1024,2048,4096,8192,16384}
LINEAR_TOKENS=${LINEAR_TOKENS:-1024..16384}
RESHAPE_EXTRA=${RESHAPE_EXTRA:-524288}  # the issue's 256 sequences x 2048 tokens
VOCAB=${VOCAB:-152064}
HIDDEN=${HIDDEN:-3584}
SEQ_LEN=${SEQ_LEN:-2048}
COMMON=(--vocab "$VOCAB" --dtype bf16 --device "$DEVICE" --warmup-ms 10 --rep-ms 50 --check-rows 16)
bench() {  # bench LIMIT_S NAME ARGS...: one op's sweep into /tmp/pgpo_sweep/NAME.json
  local limit=$1 name=$2; shift 2
  echo "== $name: pgpo-bench $*" | tee -a "$OUT/sweep.log"
  timeout "$limit" "$PY" -m pgpo_bench.cli "$@" "${COMMON[@]}" --json "/tmp/pgpo_sweep/$name.json" \
    >>"$OUT/sweep.log" 2>&1 || echo "!! $name exited with $? (timeout 124)" | tee -a "$OUT/sweep.log"
}
bench 80 kl kl --tokens "$SWEEP"
bench 55 reshape reshape --tokens "$SWEEP,$RESHAPE_EXTRA" --seq-len "$SEQ_LEN"
bench 80 weights weights --tokens "$SWEEP" --seq-len "$SEQ_LEN"
bench 80 stats stats --tokens "$SWEEP"
bench 70 linear linear --tokens "$LINEAR_TOKENS" --hidden "$HIDDEN"
# the policy update's loss head (fused_linear_logp): fwd + bwd, peak extra memory (allocator) and time per
# token, one process per provider; its own table (pgpo_bench/logp.py), not merged into the GB/s report; the last
# provider (the backward's previous tiles) checks the static tile choice and is the one a timeout would cut; first
# the backward with its default gradient filter, without it (grad_filter=0) and Liger's scaled CE (the published
# anchor); on these random, unpeaked inputs next to no tile is skipped: the filtered row times the check's cost
LOGP_TOKENS=${LOGP_TOKENS:-8192}
echo "== logp: pgpo-bench logp --tokens $LOGP_TOKENS" | tee -a "$OUT/sweep.log"
timeout 60 "$PY" -m pgpo_bench.cli logp --tokens "$LOGP_TOKENS" --vocab "$VOCAB" --hidden "$HIDDEN" --dtype bfloat16 \
  --device "$DEVICE" --providers ours_triton,ours_triton_exact,liger_scaled,logits,trl_chunked,liger,ours_triton_bwd64 \
  --reps 3 --timeout 30 --json "$OUT/logp.json" \
  --md "$OUT/logp.md" >>"$OUT/sweep.log" 2>&1 || echo "!! logp exited with $? (timeout 124)" | tee -a "$OUT/sweep.log"

# the traffic / FLOP model of every kernel at the same shapes (no GPU work; modeled H100/H200 ms to set beside the
# measured ones), at most 5 s
timeout 5 "$PY" -m pgpo_bench.cli model --tokens 1024,4096,8192,16384 --vocab "$VOCAB" --hidden "$HIDDEN" --liger \
  --json "$OUT/model.json" --md "$OUT/model.md" >/dev/null 2>>"$OUT/sweep.log" || echo "!! model exited with $?" | tee -a "$OUT/sweep.log"

# -- 2b. pgpo-train data parallel (torchrun + FSDP2, nccl): tiny model, 1 GPU vs all GPUs, at most 90 s ----------
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "${NGPU:-0}" -ge 1 ]; then
  echo "== train_dist: 1 and $NGPU GPUs" | tee -a "$OUT/sweep.log"
  NPROC=1; EXTRA=--skip-unshard  # the unshard comparison needs 2 GPUs (2 nccl ranks)
  [ "$NGPU" -gt 1 ] && NPROC="1,$NGPU" && EXTRA=""
  timeout 90 "$PY" -m pgpo_bench.train_dist --device cuda --nproc "$NPROC" --steps 3 --out "$OUT/train_dist" $EXTRA \
    --machine "device machine, $NGPU GPU(s)" >>"$OUT/sweep.log" 2>&1 || echo "!! train_dist exited with $?" | tee -a "$OUT/sweep.log"
fi

# -- 3. one merged report: JSON + plot + markdown table, named by device ------------------------------------------
SLUG=$("$PY" -c "import torch; from pgpo_bench.roofline import device_info, device_slug; \
print(device_slug(device_info(torch.device('$DEVICE'))))")
"$PY" -m pgpo_bench.report /tmp/pgpo_sweep/*.json --merge "$OUT/$SLUG.json" --plot "$OUT/$SLUG.png" \
  --markdown "$OUT/$SLUG.md" >/dev/null 2>>"$OUT/sweep.log"
grep -h "^- target\|^- targets" "$OUT/$SLUG.md"
grep -h "^!!" "$OUT/sweep.log"
ls -la "$OUT"
