"""pgpo-bench sass: the SASS counting on known code, the occupancy rules, and one run of the tool.

Parsing and occupancy run in-process on text and numbers. Compiling runs in a subprocess with TRITON_INTERPRET=0
(the suite's interpreter replaces @triton.jit), for sm_90 only, on the tiny copy kernel of tests/support/sass_copy_kernel.py
and on one launch of the package (the split token-KL path) through the CLI.
"""

import json
import os
import subprocess
import sys

import pytest

from pgpo_bench.sass import analyze_sass
from pgpo_bench.sass import global_load_bytes
from pgpo_bench.sass import occupancy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a hand-written nvdisasm listing: a loop .L_x_1 .. BRA .L_x_1 of 8 instructions (two 128-bit loads of bf16 pairs,
# one barrier, two shuffles), a forward branch, and the trailing self-branch trap that is no loop
SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/              @!P1 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R12.64] ;
        /*0040*/                   FADD R1, R4, R8 ;
        /*0050*/                   SHFL.BFLY PT, R5, R1, 0x10, 0x1f ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   SHFL.BFLY PT, R6, R5, 0x8, 0x1f ;
        /*0080*/                   ISETP.GE.AND P2, PT, R0, UR6, PT ;
        /*0090*/              @!P2 BRA `(.L_x_1) ;
.L_x_0:
        /*00a0*/                   STG.E desc[UR4][R2.64], R6 ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""


def test_counts_a_known_listing():
    out = analyze_sass(SASS, itemsize=2)
    assert out["instructions"] == 13
    assert out["loops"] == 1 and out["loops_loading_global"] == 1
    hot = out["hot_loop"]
    assert hot["instructions"] == 8
    assert hot["global_load_bytes_per_thread"] == 32  # 2 x 16 B
    assert hot["pairs_per_iteration"] == 8  # 32 B of bf16 = 16 elements = 8 (a, b) pairs
    assert hot["instr_per_pair"] == 1.0
    assert (hot["bar"], hot["shfl"], hot["ldg_128"]) == (1, 2, True)


def test_load_widths():
    assert [global_load_bytes(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "LDGSTS.E.BYPASS.128",
                                             "LDS.128", "STG.E.128")] == [16, 8, 4, 2, 16, 0, 0]


@pytest.mark.parametrize("regs, shared, warps, arch, ctas, limit", [
    (51, 1024, 16, 90, 2, "registers"),  # 51 regs -> 1792 per warp -> 36 warps -> two CTAs of 16 warps
    (40, 0, 8, 90, 6, "registers"),  # 1280 per warp -> 51 warps -> 6 CTAs of 8 = 48 warps
    (32, 0, 4, 90, 16, "registers"),  # 64 warps: registers and the warp limit agree
    (255, 98304, 8, 90, 1, "registers"),
    (40, 100 * 1024, 4, 80, 1, "shared"),  # A100: 164 KiB per SM holds one CTA of 100 KiB (+1 KiB reserved)
    (16, 0, 1, 90, 32, "ctas"),
])
def test_occupancy(regs, shared, warps, arch, ctas, limit):
    occ = occupancy(regs, shared, warps, arch)
    assert occ["ctas_per_sm"] == ctas and occ["warps_per_sm"] == ctas * warps
    assert occ["limited_by"] == limit


def _env():
    return dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


_COPY = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "support"))
import torch
from pgpo_bench.sass import kernel_report
from sass_copy_kernel import copy_loop_kernel
x = torch.empty(1 << 20, device="meta")
print("REC " + json.dumps(kernel_report(copy_loop_kernel, (x, x, 1 << 20), {"BLOCK": 1024, "num_warps": 4}, 90, 4)))
"""


def test_compiled_copy_loop_has_the_known_structure():
    proc = subprocess.run([sys.executable, "-c", _COPY, ROOT], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("REC "))[4:])
    assert rec["divisible_by_16"] == ["x_ptr", "y_ptr", "n"]  # as the JIT specializes a 2**20 launch
    assert rec["spill_store_bytes"] == 0 and rec["regs"] > 0
    sass = rec["sass"]
    assert sass["loops"] == 1 and sass["bar_total"] == 0 and sass["shfl_total"] == 0
    hot = sass["hot_loop"]
    # 8 floats per thread per copy (two LDG.E.128); ptxas may unroll the loop, always by whole copies
    assert hot["ldg_128"] and hot["global_load_bytes_per_thread"] % 32 == 0
    assert hot["instructions"] / (hot["global_load_bytes_per_thread"] / 4) < 4  # a few instructions per float


def test_cli_reports_the_split_token_kl_kernels(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "pgpo_bench.cli", "sass", "--vocab", "152064", "--arch", "90a",
                           "--kernels", "token_kl_split", "--json", str(out), "--md", str(tmp_path / "r.md"),
                           "--quiet"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["kernel"]: r for r in json.loads(out.read_text())["kernels"]}
    assert "_token_kl_combine_kernel" in recs
    part = recs["_token_kl_partial_kernel"]
    assert part["arch"] == 90 and part["regs"] > 0 and part["warps_per_sm"] > 0
    assert part["sass"]["loops_loading_global"] == 1 and part["sass"]["hot_loop"]["instr_per_pair"] > 0
    assert "_token_kl_partial_kernel" in (tmp_path / "r.md").read_text()


def test_cli_reports_the_fused_logp_kernels_without_spills(tmp_path):
    """fused_linear_logp's forward and backward at Qwen shapes: 0 spill bytes and HGMMA (wgmma) in the sm_90a SASS."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "pgpo_bench.cli", "sass", "--vocab", "152064", "--tokens", "4096",
                           "--hidden", "3584", "--arch", "90a", "--kernels", "fused_logp", "--json", str(out),
                           "--quiet"], check=False, capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["kernel"]: r for r in json.loads(out.read_text())["kernels"]}
    for name in ("_logp_fwd_kernel", "_logp_bwd_kernel"):
        rec = recs[name]
        assert "error" not in rec, rec.get("error")
        assert rec["spill_store_bytes"] == 0 and rec["spill_load_bytes"] == 0, name
        assert rec["sass"]["hgmma_total"] > 0, f"{name}: no HGMMA in the sm_90a SASS"
