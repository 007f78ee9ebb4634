"""AOT compile cases of fused_linear_logp's kernels (forward and backward), for tests/support/aot_worker.py.

Same form as tests/support/aot_cases_fused.py: the 7th field lists the arguments given the JIT's divisibility-by-16 hint at
Qwen2.5 shapes (every pointer and i32 size/stride except n_rows and n_chunks).
"""

from pgpo_kernels.fused_logp import BWD_BLOCKS
from pgpo_kernels.fused_logp import BWD_BLOCKS_FP32
from pgpo_kernels.fused_logp import FWD_BLOCKS
from pgpo_kernels.fused_logp import FWD_BLOCKS_FP32

CASES = []
_NO_HINT = ("n_rows", "n_chunks")


def _add(case_id, name, sig, consts, num_warps):
    hints = [n for n, ty in sig.items() if ty.startswith("*") or (ty == "i32" and n not in _NO_HINT)]
    CASES.append((case_id, "pgpo_kernels.fused_logp", name, sig, consts, num_warps, hints))


for dt, fwd, bwd, dot_fp32 in (("bf16", FWD_BLOCKS, BWD_BLOCKS, False), ("fp16", FWD_BLOCKS, BWD_BLOCKS, False),
                               ("fp32", FWD_BLOCKS_FP32, BWD_BLOCKS_FP32, True)):
    tiles = {"DOT_FP32": dot_fp32}
    sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "target_ptr": "*i64", "part_ptr": "*fp32",
           "n_rows": "i32", "n_cols": "i32", "n_hidden": "i32", "stride_h_row": "i32", "stride_w_row": "i32",
           "cols_per_chunk": "i32", "n_chunks": "i32", "inv_temp": "fp32"}
    for has_bias, with_entropy in ((False, False), (True, True)):
        consts = {"HAS_BIAS": has_bias, "WITH_ENTROPY": with_entropy, **tiles, "BLOCK_N": fwd["BLOCK_N"],
                  "BLOCK_V": fwd["BLOCK_V"], "BLOCK_H": fwd["BLOCK_H"], "NUM_STAGES": fwd["num_stages"],
                  "GROUP_N": fwd["GROUP_N"]}
        _add(f"fused_logp_fwd_{dt}_bias{int(has_bias)}_ent{int(with_entropy)}", "_logp_fwd_kernel", sig, consts,
             fwd["num_warps"])
    sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "target_ptr": "*i64", "stats_ptr": "*fp32",
           "grad_ptr": "*fp32", "grad_h_ptr": "*fp32", "grad_w_ptr": "*fp32", "grad_b_ptr": "*fp32",
           "skip_ptr": "*i32", "n_rows": "i32", "n_cols": "i32", "n_hidden": "i32", "stride_h_row": "i32",
           "stride_w_row": "i32", "inv_temp": "fp32", "filter_eps": "fp32"}
    # the exact kernel (FILTER off: grad_filter=0) in every gradient combination, the filtered one in two
    for has_bias, with_entropy, grads, filt in ((True, True, (True, True, True), False),
                                                (False, False, (True, True, False), False),
                                                (False, True, (True, False, False), False),
                                                (False, False, (False, True, False), False),
                                                (True, True, (True, True, True), True),
                                                (False, False, (True, True, False), True)):
        consts = {"HAS_BIAS": has_bias, "WITH_ENTROPY": with_entropy, "FILTER": filt, "GRAD_H": grads[0],
                  "GRAD_W": grads[1], "GRAD_B": grads[2], **tiles, "BLOCK_N": bwd["BLOCK_N"],
                  "BLOCK_V": bwd["BLOCK_V"], "BLOCK_H": bwd["BLOCK_H"], "NUM_STAGES": bwd["num_stages"],
                  "GROUP_N": bwd["GROUP_N"]}
        flags = "".join(str(int(g)) for g in grads)
        _add(f"fused_logp_bwd_{dt}_bias{int(has_bias)}_ent{int(with_entropy)}_g{flags}{'_filter' * filt}",
             "_logp_bwd_kernel", sig, consts, bwd["num_warps"])
