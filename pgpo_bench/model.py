"""pgpo-bench model: bytes, FLOPs and a modeled time for every Triton kernel, at any shape, without a GPU.

    python -m pgpo_bench.cli model --tokens 1024,4096,8192,16384 --vocab 152064 --hidden 3584 --md r.md
    python -m pgpo_bench.cli model --liger        # + the loss head at Liger's published shape (8192, 4096, 131072)

Per kernel launch, from the launchers' own tile choices (the GPU configs, 132 SMs):

    read, written, atomic   bytes the kernel issues: every tl.load / tl.store / tl.atomic_add element whose mask is on,
                            times its size (the Triton interpreter counts exactly these: tests/bench/test_model.py
                            checks the formulas against it on small shapes)
    FLOPs                   2 x multiply-adds of the tensor-core dots (useful ones; padded tile lanes not counted)
    HBM                     modeled DRAM bytes: each input tensor once, plus what the grid re-reads that L2 cannot
                            hold (the lm_head once per group of GROUP_N row blocks: the programs in flight share it),
                            outputs once, and the torch ops around the launch (zero-init, final casts)
    ms lo .. hi             max(FLOPs / peak, HBM / bandwidth) with the fp32 atomics absorbed in L2 (lo), and with
                            every atomic byte crossing HBM once on top of HBM (hi, the estimate of the issue that asked
                            for this model); one number where a kernel has no atomics

GPU figures used (dense, no sparsity; NVIDIA's H100 / H200 SXM datasheets): H100 SXM 3.35 TB/s HBM3, 989 TFLOPS bf16;
H200 SXM 4.8 TB/s HBM3e, 989 TFLOPS bf16 (same compute). Every time here is MODELED, none measured: real kernels reach
a fraction of both peaks (tensor-core efficiency, atomic throughput in L2, the tail wave), which only a GPU settles.
The backward of fused_linear_logp is modeled as a function of the filter's skipped tile fraction f (a skipped tile
recomputes its logits and stops: no gradient GEMMs, no atomics).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

from pgpo_bench.report import write_json

GPUS = {
    "H100": {"hbm_Bps": 3.35e12, "flops": 989e12, "sms": 132, "what": "H100 SXM: 3.35 TB/s HBM3, 989 TFLOPS dense bf16"},
    "H200": {"hbm_Bps": 4.8e12, "flops": 989e12, "sms": 132, "what": "H200 SXM: 4.8 TB/s HBM3e, 989 TFLOPS dense bf16"},
}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
# Liger's published loss-head shape and H100 times (LigerFusedLinearScaledCrossEntropy, per-token NLL + entropy)
LIGER_SHAPE = (8192, 4096, 131072)
LIGER_H100_MS = {"fwd": 12.25, "fwd+bwd": 50.2}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Traffic:
    """One kernel launch (or a kernel and the torch ops that belong to it) at one shape."""

    kernel: str
    tokens: int
    read: float
    written: float
    atomic: float
    flops: float
    hbm: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def times_ms(self, gpu: str) -> tuple[float, float]:
        """(lo, hi) modeled ms on this GPU: atomics in L2 / atomics crossing HBM once."""
        g = GPUS[gpu]
        t_flops = self.flops / g["flops"]
        lo = max(t_flops, self.hbm / g["hbm_Bps"])
        hi = max(t_flops, (self.hbm + self.atomic) / g["hbm_Bps"])
        return 1e3 * lo, 1e3 * hi


# %% the kernels -----------------------------------------------------------------------------------------------------
def _logp_configs(dtype: str):
    import torch

    from pgpo_kernels.fused_logp import logp_launch_configs

    return logp_launch_configs(getattr(torch, dtype), torch.device("cuda"))


def logp_forward(n: int, v: int, h: int, dtype: str = "bfloat16", cfg: dict | None = None, n_sm: int = 132,
                 bias: bool = False) -> Traffic:
    """fused_linear_logp forward: grid (row block) x (vocab chunk), each program recomputing its logit tiles."""
    from pgpo_kernels.online_softmax import chunk_layout
    from pgpo_kernels.online_softmax import split_chunks

    cfg = cfg or _logp_configs(dtype)[0]
    e = ITEMSIZE[dtype]
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    nn, nv = cdiv(n, bn), cdiv(v, bv)
    c = max(cdiv(v, cfg["CHUNK_TILES"] * bv), split_chunks(nn, v, bv, n_sm))
    _, c = chunk_layout(v, c, bv)
    tile_rows_cols = n * nv + v * nn  # sum over tiles of (rows + columns): each loads rows x H of h, cols x H of W
    read = h * e * tile_rows_cols + 8 * n * c + (e * v * nn if bias else 0)
    written = 16 * n * c  # [N, C, 4] fp32 partials
    hbm = n * h * e + v * h * e * cdiv(nn, cfg["GROUP_N"]) + 2 * written  # partials written, read by the combine
    return Traffic("fused_logp_fwd", n, read, written, 0.0, 2.0 * n * v * h, hbm,
                   f"{bn}x{bv} tiles, {c} vocab chunks", {"chunks": c})


def logp_backward(n: int, v: int, h: int, dtype: str = "bfloat16", skip: float = 0.0, with_entropy: bool = False,
                  cfg: dict | None = None, bias: bool = False) -> Traffic:
    """fused_linear_logp backward (grad hidden + grad weight), a fraction `skip` of its tiles filtered out.

    Every tile recomputes its logits ((rows + cols) x H loads) and reads per row lse, g_logp, target (+ entropy,
    g_entropy); a kept tile loads W[cols] and h[rows] again for the two gradient GEMMs and adds [rows, H] + [cols, H]
    fp32 atomically (and [cols] for a bias); a skipped tile adds 1 to the int32 skip counter. Around the launch torch
    zero-fills the fp32 gradients and casts them to the input dtype at the end."""
    if not 0.0 <= skip <= 1.0:
        raise ValueError(f"skip must be a fraction in [0, 1], got {skip!r}")
    cfg = cfg or _logp_configs(dtype)[1]
    e = ITEMSIZE[dtype]
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    nn, nv = cdiv(n, bn), cdiv(v, bv)
    tiles = nn * nv
    kept = 1.0 - skip
    rc = n * nv + v * nn
    per_row = 24 if with_entropy else 16
    read = h * e * rc * (1 + kept) + per_row * n * nv + (e * v * nn if bias else 0)
    atomic = kept * (4 * h * rc + (4 * v * nn if bias else 0)) + 4 * skip * tiles
    flops = 2.0 * n * v * h * (1 + 2 * kept)
    grads = (n + v) * h
    # L2 reuse as in the forward (h once, W once per GROUP_N row blocks; the second loads of a kept tile hit L2);
    # the gradients: zero-filled (fp32 write), their final sums written back once, read by the cast, cast written
    hbm = n * h * e + v * h * e * cdiv(nn, cfg["GROUP_N"]) + grads * (4 + 4 + 4 + e)
    return Traffic("fused_logp_bwd", n, read, 0.0, atomic, flops, hbm,
                   f"{bn}x{bv} tiles, skipped fraction {skip:g}", {"tiles": tiles, "skip": skip})


def token_kl_forward(n: int, v: int, dtype: str = "bfloat16", save_stats: bool = False) -> Traffic:
    """token_kl forward: one read of each [N, V] logit tensor, [N] fp32 out (+ [N, 5] row stats for a backward)."""
    e = ITEMSIZE[dtype]
    written = 4 * n + (20 * n if save_stats else 0)
    return Traffic("token_kl_fwd", n, 2 * n * v * e, written, 0.0, 0.0, 2 * n * v * e + written)


def token_kl_backward(n: int, v: int, dtype: str = "bfloat16", grads: int = 2) -> Traffic:
    """token_kl backward: one more read of both logit tensors and the [N, 5] stats; writes the grads in the dtype."""
    e = ITEMSIZE[dtype]
    read = 2 * n * v * e + 24 * n
    written = grads * n * v * e
    return Traffic("token_kl_bwd", n, read, written, 0.0, 0.0, read + written)


def token_stats(n: int, v: int, dtype: str = "bfloat16") -> Traffic:
    """token_stats: one read of each logit tensor, the target ids and the two target logits; logp, entropy, KL out."""
    e = ITEMSIZE[dtype]
    read = 2 * n * v * e + 8 * n + 2 * n * e
    written = 16 * n
    return Traffic("token_stats", n, read, written, 0.0, 0.0, read + written)


def fused_linear(n: int, v: int, h: int, dtype: str = "bfloat16", n_sm: int = 132, cfg: dict | None = None) -> Traffic:
    """fused_linear_token_kl: both hidden states stacked in one [2 BLOCK_N, H] tile (padded to whole blocks) against
    each W tile (2 x 2NVH FLOPs); [N, C, 7] fp32 partials, read back by the combine kernel."""
    import torch

    from pgpo_kernels.fused_linear import fused_linear_launch_config
    from pgpo_kernels.online_softmax import chunk_layout
    from pgpo_kernels.online_softmax import split_chunks

    cfg = cfg or fused_linear_launch_config(getattr(torch, dtype), torch.device("cuda"))
    e = ITEMSIZE[dtype]
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    nn, nv = cdiv(n, bn), cdiv(v, bv)
    c = max(cdiv(v, cfg["CHUNK_TILES"] * bv), split_chunks(nn, v, bv, n_sm))
    _, c = chunk_layout(v, c, bv)
    part = 28 * n * c
    read = h * e * (2 * nn * bn * nv + v * nn) + part
    written = part + 4 * n
    hbm = 2 * n * h * e + v * h * e * cdiv(nn, cfg["GROUP_N"]) + part + written
    return Traffic("fused_linear", n, read, written, 0.0, 4.0 * n * v * h, hbm, f"{bn}x{bv} tiles, {c} chunks")


def reshape(n: int) -> Traffic:
    """reshape_weights: [N] fp32 scores and [N] bool mask in, [N] fp32 weights out. Compulsory bytes only: the kernel
    passes over each row more than once (the re-reads hit L1/L2; not modeled, nor checked against the interpreter)."""
    return Traffic("reshape", n, 5 * n, 4 * n, 0.0, 0.0, 5 * n + 4 * n, "compulsory bytes")


# %% report -----------------------------------------------------------------------------------------------------------
def rows_for(tokens: list[int], v: int, h: int, dtype: str, skips: list[float], liger: bool) -> list[Traffic]:
    rows = []
    for n in tokens:
        rows += [token_kl_forward(n, v, dtype), token_kl_backward(n, v, dtype), token_stats(n, v, dtype),
                 fused_linear(n, v, h, dtype), logp_forward(n, v, h, dtype)]
        rows += [logp_backward(n, v, h, dtype, s) for s in skips]
        rows.append(reshape(n))
    if liger:
        n, hh, vv = LIGER_SHAPE
        rows += [logp_forward(n, vv, hh, dtype)] + [logp_backward(n, vv, hh, dtype, s, with_entropy=True)
                                                     for s in skips]
        for r in rows[-1 - len(skips):]:
            r.note += f"; Liger's shape N={n}, H={hh}, V={vv}"
    return rows


def markdown(rows: list[Traffic], v: int, h: int, dtype: str) -> str:
    out = [f"Modeled (not measured): V = {v}, H = {h}, {dtype}; " + "; ".join(g["what"] for g in GPUS.values())
           + ". Bytes in GB (1e9), FLOPs in TFLOP; ms = max(FLOPs / peak, HBM / bandwidth), lo with the fp32 atomics "
           "absorbed in L2, hi with every atomic byte crossing HBM once.", "",
           "| kernel | N | read GB | written GB | atomic GB | HBM GB | TFLOP | H100 ms | H200 ms | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = []
        for gpu in GPUS:
            lo, hi = r.times_ms(gpu)
            ms.append(f"{lo:.3g}" if math.isclose(lo, hi) else f"{lo:.3g} .. {hi:.3g}")
        out.append(f"| {r.kernel} | {r.tokens} | {r.read / 1e9:.3g} | {r.written / 1e9:.3g} | {r.atomic / 1e9:.3g} | "
                   f"{r.hbm / 1e9:.3g} | {r.flops / 1e12:.3g} | {ms[0]} | {ms[1]} | {r.note} |")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpo-bench model", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1024,4096,8192,16384", help="comma list of N (default: the GPU sweep's)")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(ITEMSIZE))
    p.add_argument("--skip", default="0,0.5,0.9,0.99",
                   help="comma list of skipped tile fractions for fused_linear_logp's backward")
    p.add_argument("--liger", action="store_true", help="add the loss head at Liger's shape (8192, 4096, 131072)")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
        skips = [float(x) for x in args.skip.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--tokens takes integers and --skip fractions, got {args.tokens!r} / {args.skip!r}")
    if not tokens or min(tokens) < 1:
        parser.error(f"--tokens must list integers >= 1, got {args.tokens!r}")
    if not skips or not all(0.0 <= s <= 1.0 for s in skips):
        parser.error(f"--skip must list fractions in [0, 1], got {args.skip!r}")
    for name, val in (("--vocab", args.vocab), ("--hidden", args.hidden)):
        if val < 1:
            parser.error(f"{name} must be >= 1, got {val}")
    rows = rows_for(tokens, args.vocab, args.hidden, args.dtype, skips, args.liger)
    md = markdown(rows, args.vocab, args.hidden, args.dtype)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        recs = [dict(asdict(r), **{f"{g}_ms": r.times_ms(g) for g in GPUS}) for r in rows]
        # report.write_json: atomic (gpu_sweep.sh kills steps at their time limits), non-finite values as strings
        write_json({"tool": "pgpo-bench model", "argv": sys.argv[1:], "gpus": GPUS, "modeled": True,
                    "records": recs}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
