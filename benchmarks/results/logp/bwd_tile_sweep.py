"""Static sweep of fused_linear_logp's backward tiles (bf16, V = 152064, N = 4096, H = 3584): what each tile shape
costs in registers, spills, shared memory, residency and hot-loop instructions, and how much fp32 atomic traffic
its grid implies. Compiled code only (pgpo-bench sass's measurements); nothing here ran on a GPU.

    PYTHONPATH=$PWD python benchmarks/results/logp/bwd_tile_sweep.py --out benchmarks/results/logp/bwd_tile_sweep

Atomic adds per backward: grad_h gets one [BLOCK_N, H] partial per vocab tile, grad_W one [BLOCK_V, H] partial per
row block: N H V (1 / BLOCK_V + 1 / BLOCK_N) fp32 values (4 B each, reduced in L2). The logit tile is recomputed
once either way (2 N V H flops) and the two gradient dots are 4 N V H flops, for every tile shape.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys

N, V, H = 4096, 152064, 3584


def sweep_configs():
    for bn, bv, bh, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (2, 3)):
        if bn * bv > 128 * 128:  # not tried: at 128 x 256 one fp32 tile is 128 KiB, half an SM's registers, and x and d both live
            continue
        yield {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "num_warps": warps, "num_stages": stages, "GROUP_N": 16}


def compile_one(cfg: dict, arch: str) -> dict:
    import pgpo_kernels.fused_logp as fl
    from pgpo_bench import sass

    fl.BWD_BLOCKS = dict(cfg)  # read at launch-config time by logp_launch_configs
    buf = io.StringIO()
    out = f"/tmp/bwd_sweep_{os.getpid()}.json"
    with contextlib.redirect_stdout(buf):
        sass.main(["--kernels", "fused_logp_bwd", "--arch", arch, "--tokens", str(N), "--vocab", str(V),
                   "--hidden", str(H), "--json", out, "--quiet"])
    with open(out) as f:
        rec = json.load(f)["kernels"][0]
    hot = (rec.get("sass") or {}).get("hot_loop") or {}
    atomics = N * H * V * (1 / cfg["BLOCK_V"] + 1 / cfg["BLOCK_N"])
    return {
        **cfg, "arch": arch, "regs": rec.get("regs"),
        "error": "no CTA fits (shared memory over the SM's limit)" if rec.get("ctas_per_sm") == 0 else rec.get("error"),
        "spill_bytes": (rec.get("spill_store_bytes") or 0) + (rec.get("spill_load_bytes") or 0),
        "smem": rec.get("shared"), "ctas_per_sm": rec.get("ctas_per_sm"), "warps_per_sm": rec.get("warps_per_sm"),
        "limited_by": rec.get("limited_by"), "hot_loop_instr": hot.get("instructions"), "bar": hot.get("bar"),
        "mma": (rec.get("sass") or {}).get("hgmma_total") or (rec.get("sass") or {}).get("hmma_total"),
        # hot-loop SASS instructions per thread per (row x col x hidden) element of one iteration's two dots
        "instr_per_kelem": (hot.get("instructions") or 0) * cfg["num_warps"] * 32
        / (cfg["BLOCK_N"] * cfg["BLOCK_V"] * cfg["BLOCK_H"]) * 1000,
        "atomic_gb": atomics * 4 / 1e9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="90a,80")
    p.add_argument("--out", required=True, help="path stem: writes .json and .md")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    rows = []
    from tqdm import tqdm

    cfgs = list(sweep_configs())
    for arch in args.arch.split(","):
        for cfg in tqdm(cfgs, desc=f"sm_{arch}"):
            try:
                rows.append(compile_one(cfg, arch))
            except Exception as e:  # a config the compiler rejects is a row too
                rows.append({**cfg, "arch": arch, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    with open(args.out + ".json", "w") as f:
        json.dump({"argv": sys.argv, "N": N, "V": V, "H": H, "dtype": "bfloat16", "rows": rows}, f, indent=1)
    cols = ["arch", "BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages", "regs", "spill_bytes", "smem",
            "ctas_per_sm", "warps_per_sm", "hot_loop_instr", "bar", "instr_per_kelem", "atomic_gb", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append(f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(vals) + " |")
    with open(args.out + ".md", "w") as f:
        f.write(__doc__.split("\n\n")[0] + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
