"""AOT compile cases of the fused ops (token_stats, fused_linear), for tests/support/aot_worker.py.

Same form as tests/support/aot_cases.py, plus a 7th field: the arguments that get the JIT's divisibility-by-16 hint. At
Qwen2.5 shapes (V = 152064, H = 3584, both divisible by 16; torch allocations 16-byte aligned) the JIT gives it to
every pointer and every i32 size/stride argument except n_rows, n_chunks and n_inner; without the hints the pipeliner
gives up, which would make the tensor-core checks describe a kernel no real launch runs.
"""

from pgpo_kernels.fused_linear import GPU_BLOCKS
from pgpo_kernels.fused_linear import GPU_BLOCKS_FP32
from pgpo_kernels.token_stats import AUTOTUNE_CONFIGS
from pgpo_kernels.token_stats import stats_launch_config

CASES = []
_NO_HINT = ("n_rows", "n_chunks", "n_inner")


def _add(case_id, module, name, sig, consts, num_warps):
    hints = [n for n, ty in sig.items() if ty.startswith("*") or (ty == "i32" and n not in _NO_HINT)]
    CASES.append((case_id, module, name, sig, consts, num_warps, hints))


for dt, itemsize in (("bf16", 2), ("fp32", 4)):
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "target_ptr": "*i64", "part_ptr": "*fp32", "kl_ptr": "*fp32",
           "logp_ptr": "*fp32", "logq_ptr": "*fp32", "ent_ptr": "*fp32", "n_cols": "i32", "n_inner": "i32",
           "stride_a_outer": "i32", "stride_a_inner": "i32", "stride_b_outer": "i32", "stride_b_inner": "i32",
           "cols_per_chunk": "i32", "n_chunks": "i32", "scale_u": "fp32"}
    cfg = stats_launch_config(152064, itemsize)  # the heuristic config (interpreter, split path)
    for with_target in (True, False):
        for split in (True, False):
            _add(f"token_stats_{dt}_target{int(with_target)}_split{int(split)}", "pgpo_kernels.token_stats",
                 "_token_stats_kernel", sig,
                 {"WITH_TARGET": with_target, "SPLIT": split, "BLOCK_V": cfg["BLOCK_V"], "EPT": cfg["EPT"],
                  "NUM_STAGES": cfg["NUM_STAGES"]}, cfg["num_warps"])
    if dt == "bf16":  # every config the GPU autotuner may pick, at the launch the old-log-prob phase makes
        for c in AUTOTUNE_CONFIGS:
            kw = c.kwargs
            _add(f"token_stats_bf16_autotune_v{kw['BLOCK_V']}_e{kw['EPT']}_w{c.num_warps}_s{kw['NUM_STAGES']}",
                 "pgpo_kernels.token_stats", "_token_stats_kernel", sig,
                 {"WITH_TARGET": True, "SPLIT": False, **kw}, c.num_warps)
    # the token-KL backward's cases live in tests/support/aot_cases.py (its one-read kernel and gradient flags)

for dt in ("bf16", "fp32"):
    _sig = {"part_ptr": "*fp32", "target_ptr": "*i64", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "kl_ptr": "*fp32",
            "logp_ptr": "*fp32", "logq_ptr": "*fp32", "ent_ptr": "*fp32", "n_chunks": "i32", "n_inner": "i32",
            "stride_a_outer": "i32", "stride_a_inner": "i32", "stride_b_outer": "i32", "stride_b_inner": "i32",
            "scale_u": "fp32"}
    for with_target, given in ((True, False), (False, False), (True, True)):
        if dt == "fp32" or not given:
            _add(f"token_stats_combine_{dt}_target{int(with_target)}_given{int(given)}", "pgpo_kernels.token_stats",
                 "_token_stats_combine_kernel", _sig,
                 {"WITH_TARGET": with_target, "TARGET_LOGITS": given, "BLOCK_C": 256}, 1)

for dt, cfg, dot_fp32 in (("bf16", GPU_BLOCKS, False), ("fp16", GPU_BLOCKS, False), ("fp32", GPU_BLOCKS_FP32, True)):
    _sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "part_ptr": "*fp32", "n_rows": "i32",
            "n_cols": "i32", "n_hidden": "i32", "stride_w_row": "i32", "cols_per_chunk": "i32", "n_chunks": "i32",
            "scale_u": "fp32"}
    for has_bias, with_target in ((False, False), (True, True)):
        consts = {"HAS_BIAS": has_bias, "WITH_TARGET": with_target, "DOT_FP32": dot_fp32, "BLOCK_N": cfg["BLOCK_N"],
                  "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"], "NUM_STAGES": cfg["num_stages"],
                  "GROUP_N": cfg["GROUP_N"]}
        _add(f"fused_linear_{dt}_bias{int(has_bias)}_target{int(with_target)}", "pgpo_kernels.fused_linear",
             "_fused_linear_stats_partial_kernel", _sig, consts, cfg["num_warps"])
    _sig = {"hv_ptr": f"*{dt}", "ht_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "target_ptr": "*i64",
            "out_ptr": "*fp32", "n_rows": "i32", "n_hidden": "i32", "stride_hv_row": "i32", "stride_ht_row": "i32",
            "stride_w_row": "i32"}
    _add(f"fused_linear_target_logits_{dt}", "pgpo_kernels.fused_linear", "_target_logits_kernel", _sig,
         {"HAS_BIAS": True, "BLOCK_N": 16, "BLOCK_H": 256}, 4)
