"""The AOT compile cases of pgpo_kernels: every kernel at its main block sizes, for sm_80 and sm_90.

Each case: (case id, module, kernel name, signature {arg: triton type}, constexprs, num_warps[, hinted args]). Other
kernel modules add their own `tests/aot_cases_*.py` with a CASES list of the same form (aot_cases_fused.py: the fused
ops); the worker compiles them all.
"""

from pgpo_kernels.reshape import reshape_launch_config
from pgpo_kernels.token_kl import AUTOTUNE_CONFIGS
from pgpo_kernels.token_kl import kl_stream_config

CASES = []


def _hinted(sig):
    # what the JIT gives a launch at Qwen2.5 shapes (V = 152064, torch's 16-byte aligned allocations): the
    # divisibility-by-16 hint on every pointer and every i32 size/stride except the chunk count
    return [n for n, ty in sig.items() if ty.startswith("*") or (ty == "i32" and n != "n_chunks")]


def _kl_sig(dt, *names):
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}"}
    sig.update({n: ("*fp32" if n.endswith("_ptr") else "fp32" if n in ("scale", "inv_temp") else "i32") for n in names})
    return sig


_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_FWD_ARGS = ("out_ptr", "stats_ptr", "n_cols", "stride_a_row", "stride_b_row", "scale")

for dtype in ("bf16", "fp16", "fp32"):
    for n_cols in (152064, 1000) if dtype == "fp32" else (152064,):
        cfg = kl_stream_config(n_cols, _ITEMSIZE[dtype])
        consts = {k: v for k, v in cfg.items() if k != "num_warps"}
        for save in (False, True):
            sig = _kl_sig(dtype, *_FWD_ARGS)
            CASES.append((f"token_kl_fwd-{dtype}-V{n_cols}-save{int(save)}", "pgpo_kernels.token_kl",
                          "_token_kl_fwd_kernel", sig, {**consts, "SAVE_STATS": save}, cfg["num_warps"],
                          _hinted(sig)))

# every autotune config must build too
for i, conf in enumerate(AUTOTUNE_CONFIGS):
    sig = _kl_sig("bf16", *_FWD_ARGS)
    CASES.append((f"token_kl_fwd-bf16-autotune{i}", "pgpo_kernels.token_kl", "_token_kl_fwd_kernel", sig,
                  {**conf.kwargs, "VEC": 8, "SAVE_STATS": False}, conf.num_warps, _hinted(sig)))

_cfg = kl_stream_config(152064, 2)
_consts = {k: v for k, v in _cfg.items() if k != "num_warps"}
_sig = _kl_sig("bf16", "part_ptr", "n_cols", "stride_a_row", "stride_b_row", "cols_per_chunk", "n_chunks", "scale")
CASES.append(("token_kl_partial-bf16", "pgpo_kernels.token_kl", "_token_kl_partial_kernel", _sig, _consts,
              _cfg["num_warps"], _hinted(_sig)))
for save in (False, True):
    CASES.append((
        f"token_kl_combine-save{int(save)}", "pgpo_kernels.token_kl", "_token_kl_combine_kernel",
        {"part_ptr": "*fp32", "out_ptr": "*fp32", "stats_ptr": "*fp32", "n_chunks": "i32", "scale": "fp32"},
        {"BLOCK_C": 64, "SAVE_STATS": save}, 1,
    ))

# the one-read backward, with each combination of gradients asked for
for dt in ("bf16", "fp32"):
    cfg = kl_stream_config(152064, _ITEMSIZE[dt])
    consts = {k: v for k, v in cfg.items() if k != "num_warps"}
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "stats_ptr": "*fp32", "grad_out_ptr": "*fp32",
           "grad_a_ptr": f"*{dt}", "grad_b_ptr": f"*{dt}", "n_cols": "i32", "stride_a_row": "i32",
           "stride_b_row": "i32", "cols_per_chunk": "i32", "scale": "fp32", "inv_temp": "fp32"}
    for grad_a, grad_b in ((True, True), (True, False), (False, True)):
        CASES.append((f"token_kl_bwd-{dt}-a{int(grad_a)}b{int(grad_b)}", "pgpo_kernels.token_kl",
                      "_token_kl_bwd_kernel", sig, {**consts, "GRAD_A": grad_a, "GRAD_B": grad_b},
                      cfg["num_warps"], _hinted(sig)))

_block_t, _warps_t = reshape_launch_config(2048)
for packed, has_mask in ((False, True), (False, False), (True, False)):
    CASES.append((
        f"reshape-packed{int(packed)}-mask{int(has_mask)}", "pgpo_kernels.reshape", "_reshape_weights_fwd_kernel",
        {"scores_ptr": "*fp32", "mask_ptr": "*u8", "cu_seqlens_ptr": "*i32", "out_ptr": "*fp32", "seq_len": "i32",
         "stride_s_row": "i64", "stride_m_row": "i64", "tau": "fp32", "beta": "fp32", "eps": "fp32"},
        {"PACKED": packed, "HAS_MASK": has_mask, "RENORMALIZE": True, "BLOCK_T": _block_t}, _warps_t,
    ))
