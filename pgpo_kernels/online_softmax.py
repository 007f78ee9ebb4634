"""Online-softmax statistics shared by the kernels: their units, the running-stats fold and merge, the vocab split.

A kernel that streams logits over the vocabulary keeps, per row, a running max m and the sum s of exponentials
relative to it (online log-sum-exp, as flash-attention's softmax), plus p-weighted sums where it needs them, and
rescales them when the max grows. Two groups of stats (two tiles, two threads, two vocab chunks) merge by the same
rule, so a row can be split into vocab chunks whose stats a small kernel combines (split_chunks, chunk_layout).

Units, one convention:

- exponentials in base 2: e^((x - m) / T) = 2^((x - m) scale) with scale = LOG2E / T; logs of sums in base 2, times
  LN2 at the finish (ex2 / lg2 are the GPU's native instructions);
- maxes in input (logit) units; logit differences in UNITs of 2^-21: d = x UNIT - m UNIT, which cannot overflow
  for finite x and m, so 2^(d scale_u) with scale_u = scale / UNIT. token_stats' p-weighted sums (t, u) are sums of
  such d: with V < 2^20 they stay finite wherever the KL and the entropy do.

Where a kernel departs from it, and why:

- token_kl (its own stats: m_a, s_a, m_b, s_b, t) takes differences in half units (x / 2 - m / 2) and keeps t in
  units of 2^-24 nats, 1/T folded into t's per-element factor, so its sums need no 2^-21 headroom. Differences in
  UNITs there compile to the same SASS and give the same bits (power-of-2 rescalings), but scale / UNIT overflows
  fp32 for T below ~1e-32 (token_stats returns NaN there), where half units hold to T ~ 1e-38; t in UNITs would
  re-round every term (not bit-identical).
- fused_linear_logp keeps x = logits / T in natural units (t in nats): its chunk partials are combined by torch ops
  and its backward reads the log-sum-exp in nats; its hot loops are GEMMs, and base-2 units there would re-round
  every logit (not bit-identical).

Non-finite inputs (fold / merge): a NaN or +inf anywhere in a row makes every sum of the row NaN (the max propagates
NaN); -inf entries contribute nothing (their d clamps to -FLT_MAX, 2^(d scale_u) is 0 and 0 * d stays 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FLT_MAX = 3.4028234663852886e38
# the unit of logit differences: d = (x - m) 2^-21 cannot overflow for finite x, m, and sums of up to 2^20
# p-weighted differences stay below FLT_MAX (V = 152064 < 2^18), so t overflows only when the KL itself does
UNIT = 2.0 ** -21
N_PART = 7  # per-(row, chunk) partial stats of fold / merge, in this order: m_a, s_a, m_b, s_b, t, u, hit
# globals read inside @triton.jit must be constexpr
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
NEG_MAX_C = tl.constexpr(-FLT_MAX)
UNIT_C = tl.constexpr(UNIT)
N_PART_C = tl.constexpr(N_PART)
NAN_ALL_C = tl.constexpr(tl.PropagateNan.ALL)


# %% device helpers ------------------------------------------------------------------------------------------------
@triton.jit
def max_nan(x, y):
    return tl.maximum(x, y, propagate_nan=NAN_ALL_C)


@triton.jit
def is_nan(x):
    return x != x  # noqa: PLR0124 - the NaN test


@triton.jit
def diff_u(x, m_u):
    """(x - m) * UNIT from m_u = m * UNIT, which cannot overflow for finite x, m; -inf (masked logits) clamps to
    -FLT_MAX, where 2^(. scale_u) is 0 and 0 * . stays 0 (never 0 * inf). NaN stays NaN."""
    return max_nan(x * UNIT_C - m_u, NEG_MAX_C)


@triton.jit
def times(alpha, v):
    """alpha * v for a rescale factor alpha in [0, 1]: a group whose alpha underflowed to 0 adds nothing, even if its
    sum overflowed to +inf (never 0 * inf; a NaN input reaches alpha through the NaN-propagating max)."""
    return tl.where(alpha == 0.0, 0.0, alpha * v)


@triton.jit
def init_stats(R: tl.constexpr):
    """Running stats of R groups before any column: (m_a, s_a, m_b, s_b, t, u, hit).

    The maxes start at -FLT_MAX, not -inf, so no rescale ever computes -inf - (-inf)."""
    m_a = tl.full((R,), NEG_MAX_C, tl.float32)
    m_b = tl.full((R,), NEG_MAX_C, tl.float32)
    zero = tl.zeros((R,), tl.float32)
    hit = tl.full((R,), float("-inf"), tl.float32)
    return m_a, zero, m_b, zero, zero, zero, hit


@triton.jit
def fold(m_a, s_a, m_b, s_b, t, u, hit, x, y, scale_u, WITH_ENTROPY: tl.constexpr):
    """Fold tiles x, y [R, K] (fp32, -inf on padded lanes) into the running stats [R] along axis 1.

    Relative to the maxes m_a, m_b, with d = (x - m) UNIT and scale_u = log2(e) / (T UNIT):

        s_a = sum_i 2^(da_i scale_u),  s_b = sum_i 2^(db_i scale_u),
        t = sum_i 2^(da_i scale_u) (da_i - db_i),  u = sum_i 2^(da_i scale_u) da_i   (u only WITH_ENTROPY)

    plus hit = the largest a_i where b_i = -inf (> -inf means KL = +inf). When a max grows the old sums rescale by
    alpha = 2^(sh scale_u), sh = (m - m') UNIT, and shift (u by s_a sh_a, t by s_a (sh_a - sh_b)). token_stats calls
    it with R = threads and K = the columns each thread loaded (no cross-thread work); fused_linear with R = rows of
    a tile."""
    new_m_a = max_nan(m_a, tl.reduce(x, 1, max_nan))
    new_m_b = max_nan(m_b, tl.reduce(y, 1, max_nan))
    mu_a = new_m_a * UNIT_C
    mu_b = new_m_b * UNIT_C
    sh_a = diff_u(m_a, mu_a)  # <= 0: the old sums' shift
    sh_b = diff_u(m_b, mu_b)
    alpha = tl.exp2(sh_a * scale_u)
    w = alpha * s_a  # old a-mass at the new max
    da = diff_u(x, mu_a[:, None])
    db = diff_u(y, mu_b[:, None])
    ea = tl.exp2(da * scale_u)
    t = times(alpha, t) + w * (sh_a - sh_b) + tl.sum(ea * (da - db), axis=1)
    if WITH_ENTROPY:
        u = alpha * u + w * sh_a + tl.sum(ea * da, axis=1)
    s_a = w + tl.sum(ea, axis=1)
    s_b = tl.exp2(sh_b * scale_u) * s_b + tl.sum(tl.exp2(db * scale_u), axis=1)
    # a finite a_i where b_i = -inf makes the KL +inf: remember the largest such a_i
    hit = tl.maximum(hit, tl.max(tl.where(y == float("-inf"), x, float("-inf")), axis=1))
    return new_m_a, s_a, new_m_b, s_b, t, u, hit


@triton.jit
def merge(m_a, s_a, m_b, s_b, t, u, hit, scale_u, WITH_ENTROPY: tl.constexpr):
    """Merge groups of stats [G] (threads of a program, or chunks of a row) into scalars, by fold's rule."""
    M_a = tl.reduce(m_a, 0, max_nan)
    M_b = tl.reduce(m_b, 0, max_nan)
    sh_a = diff_u(m_a, M_a * UNIT_C)
    sh_b = diff_u(m_b, M_b * UNIT_C)
    alpha = tl.exp2(sh_a * scale_u)
    w = alpha * s_a
    T = tl.sum(times(alpha, t) + w * (sh_a - sh_b), axis=0)
    U = 0.0
    if WITH_ENTROPY:
        U = tl.sum(alpha * u + w * sh_a, axis=0)
    S_b = tl.sum(tl.exp2(sh_b * scale_u) * s_b, axis=0)
    return M_a, tl.sum(w, axis=0), M_b, S_b, T, U, tl.max(hit, axis=0)


# %% the vocab split -----------------------------------------------------------------------------------------------
def split_chunks(n_rows: int, n_cols: int, block_v: int, n_sm: int, ctas_per_sm: int = 1, waves: int = 4,
                 min_tiles: int = 1) -> int:
    """Vocab chunks per row so the grid, n_rows x chunks CTAs, fills >= `waves` waves of resident CTAs (1 = no split).

    One wave is n_sm * ctas_per_sm CTAs (a kernel's static occupancy; 1 where none is tabled); a chunk keeps at least
    min_tiles tiles of block_v columns. The kernels that tile rows (fused_linear, fused_linear_logp) pass row blocks
    as n_rows.
    """
    target = waves * n_sm * ctas_per_sm
    if n_rows >= target:
        return 1
    max_chunks = max(1, triton.cdiv(n_cols, min_tiles * block_v))
    return max(1, min(max_chunks, triton.cdiv(target, max(n_rows, 1))))


def chunk_layout(n_cols: int, n_chunks: int, block_v: int) -> tuple[int, int]:
    """(cols_per_chunk, n_chunks): the vocab split into about n_chunks chunks of whole BLOCK_V tiles, none empty."""
    n_chunks = max(1, min(int(n_chunks), triton.cdiv(n_cols, block_v)))
    cols_per_chunk = triton.cdiv(triton.cdiv(n_cols, n_chunks), block_v) * block_v
    return cols_per_chunk, triton.cdiv(n_cols, cols_per_chunk)  # no empty chunk after rounding up
