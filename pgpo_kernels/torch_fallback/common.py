"""What every torch fallback shares: the compute dtype, row chunking, the centred log-softmax, the exact redo of
special rows.

The fallbacks work over row chunks, so they never hold a full fp32 copy of an [N, V] input: peak extra memory is a
few [chunk, V] fp32 buffers. Each chunk runs one of two fast paths, then fixes the rows they cannot do exactly:

- compiled (torch.compile of the op's `*_block` function, see compile.py), for large inputs where inductor works;
- eager, the plain formula with in-place ops (no more [chunk, V] passes than a hand-written eager version).

Both fast paths give a non-finite value for every row that needs care (an -inf, NaN or +inf logit, or a huge finite
one whose fp32 differences overflow), and only those rows are recomputed by the `*_block` function in float64 with
every rule spelled out (README "Kernels API"): -inf contributes nothing, NaN/+inf in a row -> NaN for that row, huge
finite logits -> the true value (finite, or +inf where it overflows fp32).
"""

from __future__ import annotations

import torch

# Rows per chunk are chosen so that one fp32 [chunk, V] buffer stays near this many elements (64 MiB).
CHUNK_ELEMS = 1 << 24
# The eager path works on smaller slices: its ~10 passes over a slice then hit the CPU's cache, not DRAM (measured
# 3-4x faster than one 64 MiB chunk at V = 32768, benchmarks/results/cpu-fallback-2026-11-30.md).
EAGER_ELEMS = 1 << 17


def rows_per_chunk(n_cols: int) -> int:
    """Rows of one [chunk, V] fp32 buffer of about CHUNK_ELEMS elements (at least one row)."""
    return max(1, CHUNK_ELEMS // max(n_cols, 1))


def eager_slices(n_rows: int, n_cols: int):
    """(lo, hi) row slices of about EAGER_ELEMS elements (at least one row) covering n_rows."""
    step = max(1, min(EAGER_ELEMS, CHUNK_ELEMS) // max(n_cols, 1))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation whatever the input dtype, fp64 kept for float64 inputs (gradcheck needs it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centred_logp(t: torch.Tensor, dt: torch.dtype, temperature: float):
    """log_softmax(t / T) as (x - max) - log(sum(exp(x - max))), written out so that inductor fuses it into the
    reductions that use it instead of writing a [c, V] buffer -> (logp [c, V], x - max [c, V], log-sum [c, 1],
    max [c, 1]). The max also says what kind of row it is: NaN or +inf (a bad row), -inf (no mass), else finite."""
    x = t.to(dt) / temperature
    m = x.amax(-1, keepdim=True)  # propagates NaN
    xs = x - m  # centred: no cancellation of large logits
    lse = xs.exp().sum(-1, keepdim=True).log()
    return xs - lse, xs, lse, m


def fix_rows(out: torch.Tensor, special: torch.Tensor, exact) -> None:
    """Recompute the rows flagged by `special` ([c] bool) with exact(row_index) -> values; one host sync per chunk."""
    rows = special.nonzero().squeeze(-1)
    if rows.numel():
        out[rows] = exact(rows).to(out.dtype)
