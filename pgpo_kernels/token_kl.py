"""Per-token KL between two [N, V] logit tensors in one read of each, never building a softmax.

    KL(p || q) = sum_i p_i (log p_i - log q_i),  p = softmax(a / temp), q = softmax(b / temp)

One streaming pass over the vocabulary keeps the running max m and rescaled sum s of exp for a and for b (online
log-sum-exp, as flash-attention's softmax), and t = sum_i exp(a_i - m_a) * ((a_i - m_a) - (b_i - m_b)): the
p-weighted log-ratio kept *relative to the running maxes*, so large logits never cancel in fp32. When a max grows,
old terms are rescaled and shifted:

    t <- exp(m_a - m_a') * (t + s_a * ((m_a - m_a') - (m_b - m_b')))

Each thread keeps these five stats for the [R, VEC] tile rows it loads (16 bytes per input per tile, no cross-thread
work in the loop); the block merges them once at the end with the same rule. Exps run in base 2; differences are
taken in half units (x / 2 - m / 2, never overflows) and t in units of 2^-24 nats, so huge finite logits give the
true KL (online_softmax.py says why these units differ from token_stats'). Bytes per row: V * (2 * itemsize) read,
4 written. docs/design/kernels.md section 1a has the loop's static SASS figures and the non-finite rules (NaN or +inf
in a row -> NaN).

Two launch shapes: one program per row (many rows), or a split over vocab chunks (few rows, online_softmax's
split_chunks: enough chunks for 4 waves of resident CTAs) whose per-chunk stats a tiny kernel combines.

Backward (TokenKLFunction): dKL/da_j = p_j ((log p_j - log q_j) - KL) / T and dKL/db_j = (q_j - p_j) / T. When a
gradient is wanted the forward saves the five fp32 stats per row ([N, 5]); the backward reads each logit once and
writes only the gradients asked for (GRAD_A / GRAD_B constexprs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgpo_kernels.defaults import TEMPERATURE
from pgpo_kernels.online_softmax import LN2
from pgpo_kernels.online_softmax import LN2_C
from pgpo_kernels.online_softmax import LOG2E
from pgpo_kernels.online_softmax import chunk_layout
from pgpo_kernels.online_softmax import split_chunks
from pgpo_kernels.torch_fallback.token_kl import token_kl_backward_torch
from pgpo_kernels.torch_fallback.token_kl import token_kl_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import autotune_enabled
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import next_power_of_2
from pgpo_kernels.utils import resolve_backend

MAX_BLOCK_V = 4096
N_STATS = 5  # per-chunk partial stats: m_a, s_a, m_b, s_b, t
N_STATS_C = tl.constexpr(N_STATS)
# token_kl keeps t in units of 2^-24 nats: t is a sum of up to V terms, each at most the KL, so t / s_a * 2^24 reaches
# fp32's max only where the true KL does, for any V < 2^24 (a KL near 3e38 in base-2 units would overflow early)
T_UNIT = 2.0**-24
_T_UNIT_INV_C = tl.constexpr(2.0**24)
_T_SCALE_C = tl.constexpr(2.0 * LN2 * T_UNIT)  # tscale = scale * this: (2 / T) 2^-24 per half input unit


# %% device helpers ------------------------------------------------------------------------------------------------
@triton.jit
def _safe_max(m):
    # a max of -inf (nothing seen yet, or an all -inf row) is replaced by 0 wherever it offsets an exponent
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _carry_t(t, alpha, s_a, dh, tscale):
    """t carried over to new maxes: alpha (t + s_a dh tscale), dh = the shift of (a - b) in half input units.

    Half units: a difference of two halves of fp32 numbers never overflows, so huge finite logits (+-3e38) give the
    true value. An infinite t stays infinite, or becomes NaN when alpha underflows to 0 (0 * inf); a NaN t or s_a
    stays NaN (0 * NaN = NaN). Callers that read a NaN t as +inf (token_kl) need no select here.
    """
    return alpha * t + (alpha * s_a * tscale) * dh


@triton.jit
def _thread_update(m_a, s_a, m_b, s_b, t, x, y, scale2, tscale):
    """Fold a [R, VEC] tile into per-row-of-the-tile stats [R]; each thread owns whole rows, so no thread talks.

    Maxes are in input units; ea = 2^((x - m_a) scale) is computed from halves, (x / 2 - m_a / 2) scale2, which
    never overflows for finite x. Per element: one max, one FFMA, one FMUL, one EX2 per input; per pair one select
    and one FFMA into t.

    t's infinities: a finite a_i where b_i = -inf has term ea * (+inf), +inf, or NaN when ea underflows to 0; an
    infinite t rescaled by an alpha that underflowed is NaN too. With s_a and s_b finite (no NaN or +inf logit,
    which make them NaN) nothing else makes t NaN, so _kl_from_stats reads a NaN t as the true KL, +inf.
    """
    new_m_a = tl.maximum(m_a, tl.max(x, axis=1))  # max drops a NaN: the NaN reaches s_a through ea instead
    new_m_b = tl.maximum(m_b, tl.max(y, axis=1))
    ha_old = 0.5 * _safe_max(m_a)
    hb_old = 0.5 * _safe_max(m_b)
    ha = 0.5 * _safe_max(new_m_a)
    hb = 0.5 * _safe_max(new_m_b)
    # rescale factors of the old sums (0 when nothing was seen: s and t are 0 then)
    alpha = tl.where(m_a == float("-inf"), 0.0, tl.exp2((ha_old - ha) * scale2))
    gamma = tl.where(m_b == float("-inf"), 0.0, tl.exp2((hb_old - hb) * scale2))
    hdx = x * 0.5 - ha[:, None]  # -inf for x = -inf, NaN for x = +inf or NaN
    hdy = y * 0.5 - hb[:, None]
    ea = tl.exp2(hdx * scale2)
    eb = tl.exp2(hdy * scale2)
    # p_i = 0 (a_i = -inf) contributes nothing: its log-ratio is taken as 0, never 0 * inf. ea scaled first, so
    # ea * tscale * (hdx - hdy) overflows only where the true term does.
    d = tl.where(x == float("-inf"), 0.0, hdx - hdy)
    t = _carry_t(t, alpha, s_a, (ha_old - ha) - (hb_old - hb), tscale) + tl.sum((ea * tscale) * d, axis=1)
    s_a = alpha * s_a + tl.sum(ea, axis=1)
    s_b = gamma * s_b + tl.sum(eb, axis=1)
    return new_m_a, s_a, new_m_b, s_b, t


@triton.jit
def _kl_stream_thread(a_row_ptr, b_row_ptr, col_start, col_end, scale, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Stream columns [col_start, col_end) of one row -> its (m_a, s_a, m_b, s_b, t).

    Tiles are [BLOCK_V / VEC, VEC] with VEC elements = 16 bytes per row of the tile: each thread loads whole tile
    rows with 128-bit loads and keeps its own running stats over them (no barrier, no shuffle in the loop); full
    tiles run unmasked in a pipelined loop, the ragged tail once, masked; the block merges its threads' stats once
    at the end with the chunk-merge rule. col_start must be a multiple of BLOCK_V.
    """
    R: tl.constexpr = BLOCK_V // VEC
    scale2 = 2.0 * scale
    tscale = scale * _T_SCALE_C
    offs = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m_a = tl.full((R,), float("-inf"), tl.float32)
    m_b = tl.full((R,), float("-inf"), tl.float32)
    s_a = tl.zeros((R,), tl.float32)
    s_b = tl.zeros((R,), tl.float32)
    t = tl.zeros((R,), tl.float32)
    full_end = col_start + ((col_end - col_start) // BLOCK_V) * BLOCK_V
    for start in tl.range(col_start, full_end, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(a_row_ptr + start + offs).to(tl.float32)
        y = tl.load(b_row_ptr + start + offs).to(tl.float32)
        m_a, s_a, m_b, s_b, t = _thread_update(m_a, s_a, m_b, s_b, t, x, y, scale2, tscale)
    if full_end < col_end:
        cols = full_end + offs
        in_row = cols < col_end
        # padded lanes are -inf, which contribute nothing
        x = tl.load(a_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m_a, s_a, m_b, s_b, t = _thread_update(m_a, s_a, m_b, s_b, t, x, y, scale2, tscale)
    S_a, S_b, T = _merge_stats(m_a, s_a, m_b, s_b, t, scale, tscale)
    # the raw maxes (-inf for an all -inf range): a chunk's stats are merged again, where 0 would be a wrong max
    return tl.max(m_a, axis=0), S_a, tl.max(m_b, axis=0), S_b, T


@triton.jit
def _kl_raw(s_a, s_b, t):
    """KL in nats from token_kl's stats, unclamped: t is in units of 2^-24 nats (T_SCALE), so t / s_a * 2^24 overflows
    only where the true KL does (t itself is at most V times the KL), and log s_b / s_a is taken in base 2."""
    return (t / s_a) * _T_UNIT_INV_C + LN2_C * (tl.log2(s_b) - tl.log2(s_a))


@triton.jit
def _kl_from_stats(s_a, s_b, t):
    """token_kl's KL in nats from its stats, whose t may be NaN for +inf (_thread_update): NaN only where s_a or
    s_b is NaN (a NaN or +inf logit in the row), 0 for an all -inf row of a, +inf where the true KL is."""
    kl = _kl_raw(s_a, s_b, t)
    kl = tl.where((t != t) | (s_b == 0.0), float("inf"), kl)
    kl = tl.where(s_a == 0.0, 0.0, kl)
    kl = tl.where(kl < 0.0, 0.0, kl)  # clamp tiny negative rounding (a max() would turn NaN into 0)
    return tl.where((s_a != s_a) | (s_b != s_b), float("nan"), kl)


@triton.jit
def _load_chunk_stats(base, ok):
    """The first five per-chunk stats (m_a, s_a, m_b, s_b, t) at base [C]; absent chunks load as empty ones."""
    m_a = tl.load(base + 0, mask=ok, other=float("-inf"))
    s_a = tl.load(base + 1, mask=ok, other=0.0)
    m_b = tl.load(base + 2, mask=ok, other=float("-inf"))
    s_b = tl.load(base + 3, mask=ok, other=0.0)
    t = tl.load(base + 4, mask=ok, other=0.0)
    return m_a, s_a, m_b, s_b, t


@triton.jit
def _merge_stats(m_a, s_a, m_b, s_b, t, scale, tscale):
    """Merge stats [C] (chunks, or a block's threads) with the streaming update's rule -> (S_a, S_b, t_all).

    Sums are in base 2 of the scaled logits (scale = log2(e) / T), t in units of tscale per half input unit; the
    shift of (a - b) is taken in half units (_carry_t), so huge finite maxes never overflow it. An infinite t stays
    infinite where its alpha underflows.
    """
    M_a = _safe_max(tl.max(m_a, axis=0))
    M_b = _safe_max(tl.max(m_b, axis=0))
    alpha = tl.where(m_a == float("-inf"), 0.0, tl.exp2((m_a - M_a) * scale))
    gamma = tl.where(m_b == float("-inf"), 0.0, tl.exp2((m_b - M_b) * scale))
    dh = (0.5 * _safe_max(m_a) - 0.5 * M_a) - (0.5 * _safe_max(m_b) - 0.5 * M_b)
    t_all = tl.sum(tl.where(t == float("inf"), float("inf"), _carry_t(t, alpha, s_a, dh, tscale)), axis=0)
    return tl.sum(alpha * s_a, axis=0), tl.sum(gamma * s_b, axis=0), t_all


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _store_stats(base, m_a, s_a, m_b, s_b, t):
    tl.store(base + 0, m_a)
    tl.store(base + 1, s_a)
    tl.store(base + 2, m_b)
    tl.store(base + 3, s_b)
    tl.store(base + 4, t)


@triton.jit
def _token_kl_fwd_kernel(
    a_ptr,  # [N, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [N, V] logits of the text-only pass
    out_ptr,  # [N] float32 KL
    stats_ptr,  # [N, 5] float32 row stats (m_a, s_a, m_b, s_b, t) for the backward; only with SAVE_STATS
    n_cols,  # V
    stride_a_row,
    stride_b_row,
    scale,  # log2(e) / temperature
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes of the input dtype
    NUM_STAGES: tl.constexpr,
    SAVE_STATS: tl.constexpr,
):
    # widen the row id before multiplying by a stride: N * V can pass 2**31
    row = tl.program_id(0).to(tl.int64)
    m_a, s_a, m_b, s_b, t = _kl_stream_thread(a_ptr + row * stride_a_row, b_ptr + row * stride_b_row, 0, n_cols,
                                              scale, BLOCK_V, VEC, NUM_STAGES)
    tl.store(out_ptr + row, _kl_from_stats(s_a, s_b, t))
    if SAVE_STATS:
        _store_stats(stats_ptr + row * N_STATS_C, m_a, s_a, m_b, s_b, t)


@triton.jit
def _token_kl_partial_kernel(
    a_ptr,  # [N, V]
    b_ptr,  # [N, V]
    part_ptr,  # [N, C, 5] float32 partial stats
    n_cols,
    stride_a_row,
    stride_b_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    n_chunks,  # C
    scale,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    m_a, s_a, m_b, s_b, t = _kl_stream_thread(a_ptr + row * stride_a_row, b_ptr + row * stride_b_row, col_start,
                                              col_end, scale, BLOCK_V, VEC, NUM_STAGES)
    _store_stats(part_ptr + (row * n_chunks + chunk) * N_STATS_C, m_a, s_a, m_b, s_b, t)


@triton.jit
def _token_kl_combine_kernel(
    part_ptr,  # [N, C, 5] float32
    out_ptr,  # [N] float32
    stats_ptr,  # [N, 5] float32 merged row stats; only with SAVE_STATS
    n_chunks,
    scale,  # log2(e) / temperature
    BLOCK_C: tl.constexpr,
    SAVE_STATS: tl.constexpr,
):
    # merge C chunk stats with the same rescale-and-shift rule as the streaming update
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < n_chunks
    base = part_ptr + row * n_chunks * N_STATS_C + offs * N_STATS_C
    m_a, s_a, m_b, s_b, t = _load_chunk_stats(base, ok)
    S_a, S_b, t_all = _merge_stats(m_a, s_a, m_b, s_b, t, scale, scale * _T_SCALE_C)
    tl.store(out_ptr + row, _kl_from_stats(S_a, S_b, t_all))
    if SAVE_STATS:
        _store_stats(stats_ptr + row * N_STATS_C, tl.max(m_a, axis=0), S_a, tl.max(m_b, axis=0), S_b, t_all)


@triton.jit
def _bwd_update(x, y, ha, hb, lsa, lsb, g, c0, c1, scale2, GRAD_A: tl.constexpr, GRAD_B: tl.constexpr):
    """Gradients of one tile from the row's stats: (g * dKL/da, g * dKL/db), each None-free only where asked."""
    hdx = x * 0.5 - ha  # half units, as the forward: never overflows for finite logits
    hdy = y * 0.5 - hb
    p = tl.where(x == float("-inf"), 0.0, tl.exp2(hdx * scale2 - lsa))  # p_j; the select covers -inf - (-inf)
    ga = p
    gb = p
    if GRAD_A:
        # p (ln2 (log2 p - log2 q) - KL) = (p c1) (hdx - hdy) - p c0, never p * (an overflowed log-ratio)
        ga = tl.where(x == float("-inf"), 0.0, g * ((p * c1) * (hdx - hdy) - p * c0))
    if GRAD_B:
        gb = g * (tl.exp2(hdy * scale2 - lsb) - p)
    return ga, gb


@triton.jit
def _token_kl_bwd_kernel(
    a_ptr,  # [N, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [N, V] logits of the text-only pass
    stats_ptr,  # [N, 5] float32 row stats saved by the forward
    grad_out_ptr,  # [N] upstream gradient dL/dKL
    grad_a_ptr,  # [N, V] dL/da, contiguous, the logits' dtype (unused without GRAD_A)
    grad_b_ptr,  # [N, V] dL/db (unused without GRAD_B)
    n_cols,  # V
    stride_a_row,
    stride_b_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    scale,  # log2(e) / temperature
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GRAD_A: tl.constexpr,
    GRAD_B: tl.constexpr,
):
    # With p = softmax(a / T), q = softmax(b / T):
    #     dKL/da_j = p_j ((log p_j - log q_j) - KL) / T,     dKL/db_j = (q_j - p_j) / T
    # The forward saved the row's stats, so each logit is read once here and each asked-for gradient written once.
    row = tl.program_id(0).to(tl.int64)
    col_start = tl.program_id(1) * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    a_row = a_ptr + row * stride_a_row
    b_row = b_ptr + row * stride_b_row
    ga_row = grad_a_ptr + row * n_cols
    gb_row = grad_b_ptr + row * n_cols
    st = stats_ptr + row * N_STATS_C
    m_a, s_a, m_b, s_b, t = tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4)
    kl = _kl_raw(s_a, s_b, t)  # unclamped: the clamp only hides rounding
    scale2 = 2.0 * scale
    ha, hb = 0.5 * _safe_max(m_a), 0.5 * _safe_max(m_b)
    # log2 of the sums, 0 for an empty sum: its p (or q) is 0 everywhere then, never exp2(-inf - (-inf))
    lsa = tl.where(s_a == 0.0, 0.0, tl.log2(s_a))
    lsb = tl.where(s_b == 0.0, 0.0, tl.log2(s_b))
    g = tl.load(grad_out_ptr + row).to(tl.float32) * inv_temp
    # an all -inf row of a has no distribution (KL is the constant 0): zero gradient; infinite KL: no derivative;
    # a NaN row (NaN or +inf logits): NaN
    g = tl.where(s_a == 0.0, 0.0, g)
    g = tl.where((s_a > 0.0) & ((s_b == 0.0) | (kl == float("inf"))), float("nan"), g)
    g = tl.where((s_a != s_a) | (s_b != s_b) | (t != t), float("nan"), g)
    c1 = LN2_C * scale2
    c0 = LN2_C * (lsa - lsb) + kl
    R: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    full_end = col_start + ((col_end - col_start) // BLOCK_V) * BLOCK_V
    for start in tl.range(col_start, full_end, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + offs
        x = tl.load(a_row + cols).to(tl.float32)
        y = tl.load(b_row + cols).to(tl.float32)
        ga, gb = _bwd_update(x, y, ha, hb, lsa, lsb, g, c0, c1, scale2, GRAD_A, GRAD_B)
        if GRAD_A:
            tl.store(ga_row + cols, ga.to(grad_a_ptr.dtype.element_ty))
        if GRAD_B:
            tl.store(gb_row + cols, gb.to(grad_b_ptr.dtype.element_ty))
    if full_end < col_end:
        cols = full_end + offs
        in_row = cols < col_end
        x = tl.load(a_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        ga, gb = _bwd_update(x, y, ha, hb, lsa, lsb, g, c0, c1, scale2, GRAD_A, GRAD_B)
        if GRAD_A:
            tl.store(ga_row + cols, ga.to(grad_a_ptr.dtype.element_ty), mask=in_row)
        if GRAD_B:
            tl.store(gb_row + cols, gb.to(grad_b_ptr.dtype.element_ty), mask=in_row)


# On a GPU the one-row-per-program kernel is autotuned over these (block, warps, stages), keyed by V (the autotuner
# also keys on the input dtype); the heuristic kl_stream_config is one of them and is what the interpreter and the
# split path use. Stages 1 is the unpipelined loop (plain 128-bit LDG, no cp.async, no barrier: 23.4 SASS
# instructions per pair against 25.1 pipelined, static sm_90a bf16), which may hide latency by occupancy alone
# (48 warps/SM); only a GPU can tell. Static figures of each: benchmarks/results/static-sm90-after.md.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv, "NUM_STAGES": st}, num_warps=w)
    for bv, w, st in ((1024, 4, 1), (1024, 4, 2), (2048, 8, 1), (2048, 8, 2), (2048, 8, 3), (4096, 16, 2))
]
_token_kl_fwd_kernel_autotuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["n_cols"])(_token_kl_fwd_kernel)


# %% launchers -----------------------------------------------------------------------------------------------------
def kl_stream_config(n_cols: int, itemsize: int) -> dict:
    """Launch config of the per-thread-stats token_kl kernels: BLOCK_V, VEC, NUM_STAGES and num_warps.

    Each thread loads VEC = 16 bytes of each input per tile row; BLOCK_V covers every thread of the CTA once
    (num_warps * 32 tile rows), so a tile is one 128-bit load per input per thread. Short rows get a smaller block.
    """
    vec = max(1, 16 // itemsize)
    num_warps = 8
    block_v = num_warps * 32 * vec
    while num_warps > 1 and (block_v // 2 >= next_power_of_2(n_cols) or block_v > MAX_BLOCK_V):
        num_warps //= 2
        block_v //= 2
    return {"BLOCK_V": block_v, "VEC": vec, "NUM_STAGES": 2, "num_warps": num_warps}


# Resident CTAs per SM of kl_stream_config's 8-warp launch, by (kernel, compute capability major): static figures
# from `pgpo-bench sass` (registers and warps against the arch's limits; benchmarks/results/static-sm90-after.md):
# forward/partial 40 regs on sm_90 (6 CTAs), 47 on sm_80 (5); backward 32 regs (8 on both). Unknown archs: 4.
# split_chunks turns them into waves: at V = 152064 bf16 on an H100 (132 SMs, 6 CTAs/SM) 4096 rows need no split
# (5.2 waves), 1024 rows get 4 chunks, 16 rows 38 (MIN_TILES_PER_CHUNK caps it).
RESIDENT_CTAS = {("fwd", 9): 6, ("fwd", 8): 5, ("bwd", 9): 8, ("bwd", 8): 8}
MIN_TILES_PER_CHUNK = 2  # a chunk streams at least this many tiles: its block merge and store stay a small share


def resident_ctas(kernel: str, device: torch.device) -> int:
    """Static resident CTAs per SM of a token_kl kernel ("fwd" or "bwd") on this device; 1 off CUDA (interpreter)."""
    if device.type != "cuda":
        return 1
    return RESIDENT_CTAS.get((kernel, torch.cuda.get_device_capability(device)[0]), 4)


def token_kl_forward(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    temperature: float = 1.0,
    n_chunks: int | None = None,
    save_stats: bool = False,
):
    """Launch the token-KL kernels on [..., V] inputs (checked by the caller) -> [...] float32 KL.

    n_chunks: vocab split per row; None picks it from the shape and the device's SM count. save_stats: also return
    the [N, 5] float32 row stats (m_a, s_a, m_b, s_b, t) the backward needs: (kl, stats).
    """
    lead = logits_vis.shape[:-1]
    a, b = as_rows(logits_vis), as_rows(logits_txt)
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    stats = torch.empty((n_rows, N_STATS) if save_stats else (0, N_STATS), dtype=torch.float32, device=a.device)
    if n_rows == 0:
        return (out.reshape(lead), stats) if save_stats else out.reshape(lead)
    scale = LOG2E / float(temperature)
    cfg = kl_stream_config(n_cols, a.element_size())
    block_v = cfg["BLOCK_V"]
    if n_chunks is None:
        n_chunks = split_chunks(n_rows, n_cols, block_v, device_sm_count(a.device), resident_ctas("fwd", a.device),
                                min_tiles=MIN_TILES_PER_CHUNK)
    cols_per_chunk, n_chunks = chunk_layout(n_cols, n_chunks, block_v)
    stats_arg = stats if save_stats else out  # a dummy pointer the kernel never writes
    if n_chunks == 1 and autotune_enabled(a.device) and n_cols >= 1024:
        _token_kl_fwd_kernel_autotuned[(n_rows,)](a, b, out, stats_arg, n_cols, a.stride(0), b.stride(0), scale,
                                                  VEC=cfg["VEC"], SAVE_STATS=save_stats)
    elif n_chunks == 1:
        _token_kl_fwd_kernel[(n_rows,)](a, b, out, stats_arg, n_cols, a.stride(0), b.stride(0), scale,
                                        SAVE_STATS=save_stats, **cfg)
    else:
        part = torch.empty((n_rows, n_chunks, N_STATS), dtype=torch.float32, device=a.device)
        _token_kl_partial_kernel[(n_rows, n_chunks)](a, b, part, n_cols, a.stride(0), b.stride(0), cols_per_chunk,
                                                     n_chunks, scale, **cfg)
        _token_kl_combine_kernel[(n_rows,)](part, out, stats_arg, n_chunks, scale,
                                            BLOCK_C=next_power_of_2(n_chunks), SAVE_STATS=save_stats, num_warps=1)
    return (out.reshape(lead), stats) if save_stats else out.reshape(lead)


def token_kl_backward(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    stats: torch.Tensor,
    grad_out: torch.Tensor,
    temperature: float = 1.0,
    need_grad: tuple[bool, bool] = (True, True),
    n_chunks: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward: [..., V] logits x2, their [N, 5] forward stats and [...] dL/dKL -> (dL/dvis, dL/dtxt).

    One read of each logit, one write of each gradient asked for by need_grad; one not asked for is None, neither
    computed, allocated nor written. n_chunks: vocab split per row (None: from the shape and the SM count).
    """
    a, b = as_rows(logits_vis), as_rows(logits_txt)
    n_rows, n_cols = a.shape
    need_a, need_b = bool(need_grad[0]), bool(need_grad[1])
    grad_a = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device) if need_a else None
    grad_b = torch.empty((n_rows, n_cols), dtype=b.dtype, device=b.device) if need_b else None
    if n_rows > 0 and (need_a or need_b):
        g = grad_out.reshape(-1).contiguous()
        cfg = kl_stream_config(n_cols, a.element_size())
        if n_chunks is None:
            n_chunks = split_chunks(n_rows, n_cols, cfg["BLOCK_V"], device_sm_count(a.device),
                                    resident_ctas("bwd", a.device), min_tiles=MIN_TILES_PER_CHUNK)
        cols_per_chunk, n_chunks = chunk_layout(n_cols, n_chunks, cfg["BLOCK_V"])
        dummy = grad_a if need_a else grad_b  # a pointer the kernel never touches for the gradient not asked for
        _token_kl_bwd_kernel[(n_rows, n_chunks)](
            a, b, stats, g, grad_a if need_a else dummy, grad_b if need_b else dummy, n_cols, a.stride(0),
            b.stride(0), cols_per_chunk, LOG2E / float(temperature), 1.0 / float(temperature),
            GRAD_A=need_a, GRAD_B=need_b, **cfg,
        )
    return (grad_a.reshape(logits_vis.shape) if need_a else None,
            grad_b.reshape(logits_txt.shape) if need_b else None)


# %% autograd ------------------------------------------------------------------------------------------------------
class TokenKLFunction(torch.autograd.Function):
    """token_kl with gradients to both logit tensors (for PAPO-style perception losses).

    Triton backend: forward saves the inputs (references) and, when a gradient is wanted, the five fp32 stats of
    each row ([N, 5], O(N)); backward reads each logit once and writes only the gradients asked for. Torch backend:
    backward recomputes both softmaxes from the inputs; it keeps float64 inputs in float64 (out and grads), so
    torch.autograd.gradcheck can check it; every other dtype gives a float32 KL, as the forward kernels do.
    """

    @staticmethod
    def forward(ctx, logits_vis, logits_txt, temperature: float, backend: str):
        ctx.temperature = float(temperature)
        ctx.backend = backend
        if backend == "torch":
            ctx.save_for_backward(logits_vis, logits_txt)
            lead = logits_vis.shape[:-1]
            return token_kl_torch(as_rows(logits_vis), as_rows(logits_txt), temperature).reshape(lead)
        if not any(ctx.needs_input_grad[:2]):
            return token_kl_forward(logits_vis, logits_txt, temperature)
        out, stats = token_kl_forward(logits_vis, logits_txt, temperature, save_stats=True)
        ctx.save_for_backward(logits_vis, logits_txt, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need = tuple(ctx.needs_input_grad[:2])
        if ctx.backend == "torch":
            a, b = ctx.saved_tensors
            ga, gb = token_kl_backward_torch(as_rows(a), as_rows(b), grad_out.reshape(-1), ctx.temperature)
            ga, gb = ga.reshape(a.shape), gb.reshape(b.shape)
            return (ga if need[0] else None), (gb if need[1] else None), None, None
        a, b, stats = ctx.saved_tensors
        ga, gb = token_kl_backward(a, b, stats, grad_out, ctx.temperature, need_grad=need)
        return ga, gb, None, None


# %% public functional ---------------------------------------------------------------------------------------------
def token_kl(
    logits_vis: torch.Tensor, logits_txt: torch.Tensor, *, temperature: float = TEMPERATURE, backend: str = "auto"
) -> torch.Tensor:
    """Per-token visual dependency S_t = KL(softmax(vis / T) || softmax(txt / T)) (PGPO, arXiv 2604.01840, Eq. S_t).

    Args:
        logits_vis: [..., V] logits of the visual pass (bf16, fp16, fp32 or fp64).
        logits_txt: [..., V] logits of the text-only pass, same shape.
        temperature: softmax temperature T > 0.
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).

    Returns:
        [...] float32 KL in nats, >= 0 (+inf where vis puts mass on a token txt rules out with -inf). Differentiable
        in both inputs: backward recomputes the softmaxes from the logits (fused kernel on the triton backend).
    """
    check_logits_pair(logits_vis, logits_txt)
    check_temperature(temperature)
    backend = resolve_backend(backend, logits_vis, logits_txt)
    # differentiable in both inputs (TokenKLFunction); .float() keeps the float32 contract and passes gradients
    return TokenKLFunction.apply(logits_vis, logits_txt, float(temperature), backend).float()
