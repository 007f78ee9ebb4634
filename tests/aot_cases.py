"""The AOT compile cases of pgpo_kernels: every kernel at its main block sizes, for sm_80 and sm_90.

Each case: (case id, module, kernel name, signature {arg: triton type}, constexprs, num_warps[, hinted args]). Other
kernel modules add their own `tests/aot_cases_*.py` with a CASES list of the same form (aot_cases_fused.py: the fused
ops); the worker compiles them all.
"""

from pgpo_kernels.reshape import reshape_launch_config
from pgpo_kernels.token_kl import kl_launch_config

CASES = []

for dtype in ("bf16", "fp16", "fp32"):
    for n_cols in (152064, 1000) if dtype == "fp32" else (152064,):
        block_v, warps = kl_launch_config(n_cols)
        CASES.append((
            f"token_kl_fwd-{dtype}-V{n_cols}", "pgpo_kernels.token_kl", "_token_kl_fwd_kernel",
            {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": "*fp32", "n_cols": "i32", "stride_a_row": "i64",
             "stride_b_row": "i64", "scale": "fp32"},
            {"BLOCK_V": block_v}, warps,
        ))

# the largest autotune config (BLOCK_V 8192, 16 warps) must build too
CASES.append((
    "token_kl_fwd-bf16-autotune8192", "pgpo_kernels.token_kl", "_token_kl_fwd_kernel",
    {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32", "n_cols": "i32", "stride_a_row": "i64",
     "stride_b_row": "i64", "scale": "fp32"},
    {"BLOCK_V": 8192}, 16,
))

_block_v, _warps = kl_launch_config(152064)
CASES.append((
    "token_kl_partial-bf16", "pgpo_kernels.token_kl", "_token_kl_partial_kernel",
    {"a_ptr": "*bf16", "b_ptr": "*bf16", "part_ptr": "*fp32", "n_cols": "i32", "stride_a_row": "i64",
     "stride_b_row": "i64", "cols_per_chunk": "i32", "n_chunks": "i32", "scale": "fp32"},
    {"BLOCK_V": _block_v}, _warps,
))
CASES.append((
    "token_kl_combine", "pgpo_kernels.token_kl", "_token_kl_combine_kernel",
    {"part_ptr": "*fp32", "out_ptr": "*fp32", "n_chunks": "i32", "scale": "fp32"}, {"BLOCK_C": 64}, 1,
))

_block_t, _warps_t = reshape_launch_config(2048)
for packed, has_mask in ((False, True), (False, False), (True, False)):
    CASES.append((
        f"reshape-packed{int(packed)}-mask{int(has_mask)}", "pgpo_kernels.reshape", "_reshape_weights_fwd_kernel",
        {"scores_ptr": "*fp32", "mask_ptr": "*u8", "cu_seqlens_ptr": "*i32", "out_ptr": "*fp32", "seq_len": "i32",
         "stride_s_row": "i64", "stride_m_row": "i64", "tau": "fp32", "beta": "fp32", "eps": "fp32"},
        {"PACKED": packed, "HAS_MASK": has_mask, "RENORMALIZE": True, "BLOCK_T": _block_t}, _warps_t,
    ))
