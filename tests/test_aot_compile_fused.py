"""Ahead-of-time compile of the fused-op kernels for sm_80 and sm_90, no GPU needed (ptxas ships with triton).

The interpreter (TRITON_INTERPRET=1, set by conftest) replaces @triton.jit functions with interpreted ones that
cannot be compiled, so the compiles run in one subprocess with the interpreter off: this file doubles as that script
(`python tests/test_aot_compile_fused.py` prints one JSON line per compiled kernel).

Checks per kernel and arch: it compiles to a cubin at the launchers' main block sizes, its static shared memory fits
the arch, and the fused-linear kernel's tl.dot lowers to tensor-core MMA (wgmma on sm_90 for 16-bit inputs) fed by
software-pipelined loads. Arguments get the JIT's divisibility-by-16 hints at Qwen2.5 shapes (without them the
pipeliner gives up, which would make this check describe a kernel no real launch runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = (80, 90)
# max dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ROOT = Path(__file__).resolve().parents[1]


def _cases():
    """(name, kernel, signature, constexprs, options) at the launchers' main configurations."""
    from pgpo_kernels.fused_linear import GPU_BLOCKS
    from pgpo_kernels.fused_linear import GPU_BLOCKS_FP32
    from pgpo_kernels.fused_linear import _fused_linear_stats_partial_kernel
    from pgpo_kernels.token_kl import _token_kl_bwd_kernel
    from pgpo_kernels.token_kl import kl_launch_config
    from pgpo_kernels.token_stats import _token_stats_combine_kernel
    from pgpo_kernels.token_stats import _token_stats_partial_kernel

    block_v, warps = kl_launch_config(152064)  # Qwen2.5 vocab: BLOCK_V 4096, 16 warps
    cases = []
    for dt in ("bf16", "fp32"):
        sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "target_ptr": "*i64", "part_ptr": "*fp32", "n_rows": "i32",
               "n_cols": "i32", "stride_a_row": "i32", "stride_b_row": "i32", "cols_per_chunk": "i32",
               "n_chunks": "i32", "scale": "fp32", "WITH_TARGET": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_V": "constexpr"}
        for with_target in (True, False):
            cases.append((f"token_stats_partial_{dt}_target{int(with_target)}", _token_stats_partial_kernel, sig,
                          {"WITH_TARGET": with_target, "BLOCK_N": 1, "BLOCK_V": block_v}, {"num_warps": warps}))
        sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "grad_out_ptr": "*fp32", "grad_a_ptr": f"*{dt}",
               "grad_b_ptr": f"*{dt}", "n_cols": "i32", "stride_a_row": "i32", "stride_b_row": "i32",
               "scale": "fp32", "inv_temp": "fp32", "BLOCK_V": "constexpr"}
        cases.append((f"token_kl_bwd_{dt}", _token_kl_bwd_kernel, sig, {"BLOCK_V": block_v}, {"num_warps": warps}))
    sig = {"part_ptr": "*fp32", "target_ptr": "*i64", "kl_ptr": "*fp32", "logp_ptr": "*fp32", "logq_ptr": "*fp32",
           "ent_ptr": "*fp32", "n_chunks": "i32", "cols_per_chunk": "i32", "scale": "fp32",
           "WITH_TARGET": "constexpr", "BLOCK_C": "constexpr"}
    for with_target in (True, False):
        cases.append((f"token_stats_combine_target{int(with_target)}", _token_stats_combine_kernel, sig,
                      {"WITH_TARGET": with_target, "BLOCK_C": 256}, {"num_warps": 1}))
    for dt, cfg, dot_fp32 in (("bf16", GPU_BLOCKS, False), ("fp16", GPU_BLOCKS, False),
                              ("fp32", GPU_BLOCKS_FP32, True)):
        sig = {"hv_ptr": f"*{dt}", "ht_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "target_ptr": "*i64",
               "part_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "n_hidden": "i32", "stride_hv_row": "i32",
               "stride_ht_row": "i32", "stride_w_row": "i32", "cols_per_chunk": "i32", "n_chunks": "i32",
               "scale": "fp32", "HAS_BIAS": "constexpr", "WITH_TARGET": "constexpr", "DOT_FP32": "constexpr",
               "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr", "NUM_STAGES": "constexpr",
               "GROUP_N": "constexpr"}
        for has_bias, with_target in ((False, False), (True, True)):
            consts = {"HAS_BIAS": has_bias, "WITH_TARGET": with_target, "DOT_FP32": dot_fp32,
                      "BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"],
                      "NUM_STAGES": cfg["num_stages"], "GROUP_N": cfg["GROUP_N"]}
            cases.append((f"fused_linear_{dt}_bias{int(has_bias)}_target{int(with_target)}",
                          _fused_linear_stats_partial_kernel, sig, consts, {"num_warps": cfg["num_warps"]}))
    return cases


def _div16_attrs(fn, sig: dict) -> dict:
    """The divisibility-by-16 hints the JIT would give at Qwen2.5 shapes (V = 152064, H = 3584, both divisible by
    16; torch allocations 16-byte aligned): every pointer and every size/stride argument except n_rows."""
    names = [n for n, ty in sig.items() if ty.startswith("*") or (ty == "i32" and n not in ("n_rows", "n_chunks"))]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def _compile_all() -> None:
    """Script mode: compile every case for every arch, one JSON line each (errors reported, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, fn, sig, consts, opts in _cases():
        for arch in ARCHS:
            rec = {"name": name, "arch": arch}
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_div16_attrs(fn, sig))
                ck = triton.compile(src,
                                    target=GPUTarget("cuda", arch, 32), options=opts)
                ptx = ck.asm["ptx"]
                rec.update(ok=True, cubin=len(ck.asm.get("cubin", b"")), shared=ck.metadata.shared,
                           num_warps=ck.metadata.num_warps, mma="mma.sync" in ptx, wgmma="wgmma" in ptx,
                           pipelined="cp.async" in ptx)
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails with the message
                rec.update(ok=False, error=f"{type(e).__name__}: {e!s:.3000}")
            print(json.dumps(rec), flush=True)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["name"], r["arch"]): r for r in recs}


def _names() -> list[str]:
    return [c[0] for c in _cases()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", _names())
def test_compiles(compiled, name, arch):
    rec = compiled[(name, arch)]
    assert rec["ok"], rec.get("error")
    assert rec["cubin"] > 0
    assert rec["shared"] <= SMEM_LIMIT[arch], f"{name} needs {rec['shared']} B of shared memory on sm_{arch}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_fused_linear_dot_uses_tensor_cores(compiled, dt, arch):
    rec = compiled[(f"fused_linear_{dt}_bias1_target1", arch)]
    assert rec["ok"], rec.get("error")
    if arch == 90:
        assert rec["wgmma"], "tl.dot should lower to wgmma on sm_90"
    else:
        assert rec["mma"], "tl.dot should lower to mma.sync on sm_80"
    assert rec["pipelined"], "the loads feeding tl.dot should be software-pipelined (cp.async)"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _compile_all()
