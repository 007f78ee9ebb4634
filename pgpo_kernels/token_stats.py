"""Per-token log pi(target), entropy and KL from the two passes' [N, V] logits, in one read of each.

The old-log-prob phase of an RL step needs log pi_vis(x_t) and the entropy of pi_vis anyway; PGPO's KL to the
text-only pass shares their log-sum-exp, so one streaming pass over the vocabulary yields all three. Per row it keeps,
relative to the running maxes m_a, m_b and in base 2 of the scaled logits (scale = log2(e) / temperature),

    s_a = sum_i 2^xa_i,  s_b = sum_i 2^yb_i,  t = sum_i 2^xa_i (xa_i - yb_i),  u = sum_i 2^xa_i xa_i
    xa_i = (a_i - m_a) scale,  yb_i = (b_i - m_b) scale

plus the target's logits a_x, b_x; when a max grows, t and u are rescaled by alpha = 2^((m_a - m_a') scale) and
shifted (u by s_a (m_a - m_a') scale; t also by -s_a (m_b - m_b') scale). At the end, in nats,

    KL = ln2 (t / s_a - log2 s_a + log2 s_b),   H = ln2 (log2 s_a - u / s_a),
    log pi_vis(x) = ln2 ((a_x - m_a) scale - log2 s_a)          (and the same for pi_txt with b)

Layout: a partial kernel over (row blocks, vocab chunks) writes 8 stats per (row, chunk) and a combine kernel merges
them (the split keeps all SMs busy on few rows, as token_kl's split path). Bytes per row: V * 2 * itemsize read,
8 * 4 * chunks written and re-read, 16 written. The stats helpers here are shared with fused_linear.py, which feeds
them logit tiles computed by tl.dot instead of loaded ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pgpo_kernels.k3 import check_estimator
from pgpo_kernels.k3 import k3_kl
from pgpo_kernels.token_kl import _LN2_C
from pgpo_kernels.token_kl import LOG2E
from pgpo_kernels.token_kl import _kl_finish
from pgpo_kernels.token_kl import _load_chunk_stats
from pgpo_kernels.token_kl import _merge_chunks
from pgpo_kernels.token_kl import _rescale_t
from pgpo_kernels.token_kl import _safe_max
from pgpo_kernels.token_kl import chunk_layout
from pgpo_kernels.token_kl import kl_launch_config
from pgpo_kernels.token_kl import split_chunks
from pgpo_kernels.torch_fused_ops import token_stats_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import next_power_of_2
from pgpo_kernels.utils import resolve_backend

N_PART = 8  # per-(row, chunk) partial stats: m_a, s_a, m_b, s_b, t, u, a_x, b_x


class TokenStats(NamedTuple):
    """Per-token statistics of one RL step's two passes, each [...] float32.

    logp: log pi_vis(target) <= 0 (the old log-prob); entropy: H(pi_vis) in [0, log V] nats; kl: the visual
    dependency S_t (full: KL(pi_vis || pi_txt) >= 0; k3: the sampled-token estimate).
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


# %% shared device helpers -----------------------------------------------------------------------------------------
@triton.jit
def _init_stats(BLOCK_N: tl.constexpr):
    """Running stats of BLOCK_N rows before any column: (m_a, s_a, m_b, s_b, t, u, x_a, x_b), maxes -inf, rest 0."""
    m_a = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_N,), tl.float32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    x_a = tl.zeros((BLOCK_N,), tl.float32)
    x_b = tl.zeros((BLOCK_N,), tl.float32)
    return m_a, s_a, m_b, s_b, t, u, x_a, x_b


@triton.jit
def _load_targets(target_ptr, rows, row_ok, WITH_TARGET: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N] int64 target ids of the rows (0 where out of range, or all 0 without WITH_TARGET)."""
    if WITH_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        tgt = tl.zeros((BLOCK_N,), tl.int64)
    return tgt


@triton.jit
def _fold_tile(m_a, s_a, m_b, s_b, t, u, x_a, x_b, x, y, cols, tgt, scale, WITH_TARGET: tl.constexpr):
    """Fold a tile of logits x, y [R, BLOCK_V] (fp32, -inf on padded lanes) at columns cols [BLOCK_V] into the
    running stats [R] of its rows; with WITH_TARGET also the entropy sum u and the target logits x_a, x_b."""
    m_a, s_a, m_b, s_b, t, u = _stats_update(m_a, s_a, m_b, s_b, t, u, x, y, scale, WITH_TARGET)
    if WITH_TARGET:
        # the target's logit sits in exactly one tile of one chunk; the combine reads that chunk's value
        hit = cols[None, :] == tgt[:, None]
        x_a += tl.sum(tl.where(hit, x, 0.0), axis=1)
        x_b += tl.sum(tl.where(hit, y, 0.0), axis=1)
    return m_a, s_a, m_b, s_b, t, u, x_a, x_b


@triton.jit
def _stats_update(m_a, s_a, m_b, s_b, t, u, x, y, scale, WITH_ENTROPY: tl.constexpr):
    """Online log-sum-exp update of (m_a, s_a, m_b, s_b, t[, u]) [R] by a tile x, y [R, BLOCK_V]."""
    new_m_a = tl.maximum(m_a, tl.max(x, axis=1))
    new_m_b = tl.maximum(m_b, tl.max(y, axis=1))
    ma_old, ma_new = _safe_max(m_a), _safe_max(new_m_a)
    mb_old, mb_new = _safe_max(m_b), _safe_max(new_m_b)
    # rescale factors of the old sums (0 when nothing was seen yet: the sums are 0 then, avoid inf * 0)
    alpha = tl.where(m_a == float("-inf"), 0.0, tl.exp2((m_a - ma_new) * scale))
    gamma = tl.where(m_b == float("-inf"), 0.0, tl.exp2((m_b - mb_new) * scale))
    # subtract the max before scaling: the rounding of a large logit * scale never enters the result
    xa = (x - ma_new[:, None]) * scale
    yb = (y - mb_new[:, None]) * scale
    ea = tl.exp2(xa)  # x = -inf -> 0
    eb = tl.exp2(yb)
    a_in = x != float("-inf")
    # p_i = 0 contributes nothing (never 0 * inf); finite a_i where b_i = -inf gives +inf even if 2^xa underflows
    term_t = tl.where(a_in, tl.where(y == float("-inf"), float("inf"), ea * (xa - yb)), 0.0)
    shift_a = (ma_old - ma_new) * scale
    t = _rescale_t(t, alpha, s_a, shift_a - (mb_old - mb_new) * scale) + tl.sum(term_t, axis=1)
    if WITH_ENTROPY:
        u = alpha * (u + s_a * shift_a) + tl.sum(tl.where(a_in, ea * xa, 0.0), axis=1)
    s_a = alpha * s_a + tl.sum(ea, axis=1)
    s_b = gamma * s_b + tl.sum(eb, axis=1)
    return new_m_a, s_a, new_m_b, s_b, t, u


@triton.jit
def _store_partial(part_ptr, rows, row_ok, chunk, n_chunks, m_a, s_a, m_b, s_b, t, u, x_a, x_b):
    base = part_ptr + (rows * n_chunks + chunk) * 8
    tl.store(base + 0, m_a, mask=row_ok)
    tl.store(base + 1, s_a, mask=row_ok)
    tl.store(base + 2, m_b, mask=row_ok)
    tl.store(base + 3, s_b, mask=row_ok)
    tl.store(base + 4, t, mask=row_ok)
    tl.store(base + 5, u, mask=row_ok)
    tl.store(base + 6, x_a, mask=row_ok)
    tl.store(base + 7, x_b, mask=row_ok)


@triton.jit
def _target_logp(x_t, m, s, scale):
    """log softmax at the target in nats from base-2 stats; no distribution (s = 0) -> -inf (our choice)."""
    lp = _LN2_C * ((x_t - _safe_max(m)) * scale - tl.log2(s))
    lp = tl.where(s == 0.0, float("-inf"), lp)
    return tl.minimum(lp, 0.0)  # clamp tiny positive rounding when p(target) ~ 1


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _token_stats_partial_kernel(
    a_ptr,  # [N, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [N, V] logits of the text-only pass
    target_ptr,  # [N] int32/int64 target ids in [0, V) (unused without WITH_TARGET)
    part_ptr,  # [N, C, 8] float32 partial stats
    n_rows,  # N
    n_cols,  # V
    stride_a_row,
    stride_b_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    n_chunks,  # C
    scale,  # log2(e) / temperature
    WITH_TARGET: tl.constexpr,  # also entropy and the target logits
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,
):
    # widen row ids before multiplying by a stride: N * V can pass 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    chunk = tl.program_id(1)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    tgt = _load_targets(target_ptr, rows, row_ok, WITH_TARGET, BLOCK_N)
    a_rows = a_ptr + rows[:, None] * stride_a_row
    b_rows = b_ptr + rows[:, None] * stride_b_row

    m_a, s_a, m_b, s_b, t, u, x_a, x_b = _init_stats(BLOCK_N)
    offs = tl.arange(0, BLOCK_V)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs
        ok = row_ok[:, None] & (cols < col_end)[None, :]
        # fp32 whatever the input dtype; padded lanes are -inf, which contribute nothing
        x = tl.load(a_rows + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        y = tl.load(b_rows + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_a, s_a, m_b, s_b, t, u, x_a, x_b = _fold_tile(m_a, s_a, m_b, s_b, t, u, x_a, x_b, x, y, cols, tgt, scale,
                                                        WITH_TARGET)
    _store_partial(part_ptr, rows, row_ok, chunk, n_chunks, m_a, s_a, m_b, s_b, t, u, x_a, x_b)


@triton.jit
def _token_stats_combine_kernel(
    part_ptr,  # [N, C, 8] float32 partial stats
    target_ptr,  # [N] int target ids (unused without WITH_TARGET)
    kl_ptr,  # [N] float32 KL
    logp_ptr,  # [N] float32 log pi_vis(target) (unused without WITH_TARGET)
    logq_ptr,  # [N] float32 log pi_txt(target)
    ent_ptr,  # [N] float32 entropy of pi_vis
    n_chunks,  # C
    cols_per_chunk,
    scale,  # log2(e) / temperature
    WITH_TARGET: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # merge C chunk stats with the same rescale-and-shift rule as the streaming update
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < n_chunks
    base = part_ptr + row * n_chunks * 8 + offs * 8
    m_a, s_a, m_b, s_b, t = _load_chunk_stats(base, ok)
    M_a, M_b, S_a, S_b, t_all, alpha, shift_a = _merge_chunks(m_a, s_a, m_b, s_b, t, scale)
    tl.store(kl_ptr + row, _kl_finish(S_a, S_b, t_all))
    if WITH_TARGET:
        u = tl.load(base + 5, mask=ok, other=0.0)
        u_all = tl.sum(tl.where(m_a == float("-inf"), 0.0, alpha * (u + s_a * shift_a)), axis=0)
        ent = _LN2_C * (tl.log2(S_a) - u_all / S_a)
        ent = tl.where(S_a == 0.0, 0.0, ent)
        tl.store(ent_ptr + row, tl.maximum(ent, 0.0))
        # the target's logits come from the chunk that holds the target column
        tgt = tl.load(target_ptr + row).to(tl.int64)
        home = part_ptr + (row * n_chunks + tgt // cols_per_chunk) * 8
        tl.store(logp_ptr + row, _target_logp(tl.load(home + 6), M_a, S_a, scale))
        tl.store(logq_ptr + row, _target_logp(tl.load(home + 7), M_b, S_b, scale))


# %% launchers -----------------------------------------------------------------------------------------------------
def combine_stats(part: torch.Tensor, target: torch.Tensor | None, cols_per_chunk: int, scale: float):
    """Launch the combine on [N, C, 8] partial stats -> (kl, logp, logp_txt, entropy), [N] float32 each (the last
    three None without target)."""
    n_rows, n_chunks, _ = part.shape
    kl = torch.empty(n_rows, dtype=torch.float32, device=part.device)
    with_target = target is not None
    logp, logq, ent = (torch.empty_like(kl) for _ in range(3)) if with_target else (kl, kl, kl)
    _token_stats_combine_kernel[(n_rows,)](
        part, target if with_target else kl, kl, logp, logq, ent, n_chunks, cols_per_chunk, scale,
        WITH_TARGET=with_target, BLOCK_C=next_power_of_2(n_chunks), num_warps=1,
    )
    if not with_target:
        return kl, None, None, None
    return kl, logp, logq, ent


def token_stats_forward(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    n_chunks: int | None = None,
):
    """Launch the stats kernels on [N, V] logits and [N] targets (checked by the caller).

    Returns (logp, logp_txt, entropy, kl), [N] float32 each. n_chunks: vocab split per row, None = from the shape
    and the device's SM count.
    """
    a, b = as_rows(logits_vis), as_rows(logits_txt)
    target = target_ids.reshape(-1).contiguous()
    n_rows, n_cols = a.shape
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=a.device)
        return empty, empty.clone(), empty.clone(), empty.clone()
    scale = LOG2E / float(temperature)
    block_v, num_warps = kl_launch_config(n_cols)
    if n_chunks is None:
        n_chunks = split_chunks(n_rows, n_cols, block_v, device_sm_count(a.device))
    cols_per_chunk, n_chunks = chunk_layout(n_cols, n_chunks, block_v)
    part = torch.empty((n_rows, n_chunks, N_PART), dtype=torch.float32, device=a.device)
    _token_stats_partial_kernel[(n_rows, n_chunks)](
        a, b, target, part, n_rows, n_cols, a.stride(0), b.stride(0), cols_per_chunk, n_chunks, scale,
        WITH_TARGET=True, BLOCK_N=1, BLOCK_V=block_v, num_warps=num_warps,
    )
    kl, logp, logq, ent = combine_stats(part, target, cols_per_chunk, scale)
    return logp, logq, ent, kl


# %% public functional ---------------------------------------------------------------------------------------------
def check_target_ids(target_ids: torch.Tensor, lead_shape: torch.Size, n_cols: int, device: torch.device) -> None:
    """Integer [...] ids in [0, V) with the logits' leading shape. Reads min/max on the host: one small sync."""
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be an integer torch.Tensor of shape {tuple(lead_shape)}, got "
                        f"{type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise TypeError(f"target_ids must be an integer (int32/int64) tensor of shape {tuple(lead_shape)}, got "
                        f"{target_ids.dtype}")
    if target_ids.shape != lead_shape:
        raise ValueError(f"target_ids must have the logits' leading shape {tuple(lead_shape)} (logits are [..., V]), "
                         f"got {tuple(target_ids.shape)}")
    if target_ids.device != device:
        raise ValueError(f"target_ids must be on the logits' device {device}, got {target_ids.device}")
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= n_cols)).any()):  # host sync: a bad id would
        raise ValueError(f"target_ids must lie in [0, V) = [0, {n_cols}); mask ignored positions (e.g. -100) "
                         "to a valid id before the call")  # read out of bounds in the kernel


def finish_stats(logp, logq, ent, kl, estimator: str, lead: torch.Size) -> TokenStats:
    """Pick the estimator for the kl field and restore the leading shape."""
    if estimator == "k3":
        kl = k3_kl(logp, logq)
    return TokenStats(logp.reshape(lead), ent.reshape(lead), kl.reshape(lead))


def token_stats(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    estimator: str = "full",
    backend: str = "auto",
) -> TokenStats:
    """log pi_vis(target), entropy of pi_vis and the visual dependency S_t, in one read of each logit tensor.

    PGPO (arXiv 2604.01840) weights tokens by S_t = KL(pi_vis || pi_txt); the old-log-prob phase of the RL step
    computes log pi_vis(x_t) (and often the entropy) from the same logits, so this op serves both.

    Args:
        logits_vis: [..., V] logits of the visual pass (bf16, fp16, fp32 or fp64).
        logits_txt: [..., V] logits of the text-only pass, same shape.
        target_ids: [...] integer ids of the sampled tokens, in [0, V).
        temperature: softmax temperature T > 0 (applied to both passes).
        estimator: "full" (exact KL over the vocabulary) or "k3" (the paper's appendix estimate from the sampled
            token: r = pi_txt(x) / pi_vis(x), S = r - 1 - log r).
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).

    Returns:
        TokenStats(logp, entropy, kl), each [...] float32. A row whose visual logits are all -inf has no
        distribution: logp -inf, entropy 0, kl 0 (our choice).
    """
    check_logits_pair(logits_vis, logits_txt)
    check_temperature(temperature)
    check_estimator(estimator)
    lead = logits_vis.shape[:-1]
    check_target_ids(target_ids, lead, logits_vis.shape[-1], logits_vis.device)
    backend = resolve_backend(backend, logits_vis, logits_txt, target_ids)
    if backend == "torch":
        logp, logq, ent, kl = token_stats_torch(as_rows(logits_vis), as_rows(logits_txt), target_ids.reshape(-1),
                                                temperature)
    else:
        logp, logq, ent, kl = token_stats_forward(logits_vis, logits_txt, target_ids, temperature)
    return finish_stats(logp, logq, ent, kl, estimator, lead)

