"""PGPO reshape of per-token visual-dependency scores into advantage weights, one launch for the whole batch.

Per sequence, over its valid tokens only (docs/method.md#reshape):

    s = log1p(S);  I = (s - m) / (M - m + eps);  w = I / (tau + eps)                     if I <  tau
                                                     1 + beta (I - tau) / (1 - tau + eps)  if I >= tau
    w~ = w * n_valid / sum(w)

One program per sequence loops over its tokens in chunks (so a 32k-token sequence needs no huge block): pass 1 finds
min, max and the count, pass 2 sums the gated weights, pass 3 writes the renormalized weights. The scores are read
three times, but a sequence's scores (4 bytes a token) sit in L2 after the first pass; this op costs a few microseconds
next to the KL over [tokens, vocab] that produced them. Padded [B, T] + mask and packed [total] + cu_seqlens layouts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgpo_kernels.defaults import BETA
from pgpo_kernels.defaults import EPS
from pgpo_kernels.defaults import RENORMALIZE
from pgpo_kernels.defaults import TAU
from pgpo_kernels.torch_fallback.reshape import reshape_weights_torch
from pgpo_kernels.utils import check_cu_seqlens
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_mask
from pgpo_kernels.utils import check_reshape_params
from pgpo_kernels.utils import next_power_of_2
from pgpo_kernels.utils import resolve_backend

MAX_BLOCK_T = 1024


# %% kernel --------------------------------------------------------------------------------------------------------
@triton.jit
def _log1p(x):
    # log1p without libdevice (portable to the interpreter), accurate for tiny x: log(u) * x / (u - 1), u = 1 + x
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    y = tl.where(u == 1.0, x, tl.log(u) * (x / d))
    return tl.where(x == float("inf"), float("inf"), y)


@triton.jit
def _load_chunk(s_ptr, m_ptr, idx, n, HAS_MASK: tl.constexpr):
    """(in_seq, valid, bad, s = log1p(S)) of one chunk of token indices; padding loads nothing.

    bad: a valid score log1p cannot take (NaN, -inf, < -1), which makes the sequence's weights NaN."""
    in_seq = idx < n
    valid = in_seq
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + idx, mask=in_seq, other=0) != 0)
    raw = tl.load(s_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    bad = valid & ((raw != raw) | (raw < -1.0))  # noqa: PLR0124 - raw != raw is the NaN test
    return in_seq, valid, bad, _log1p(raw)


@triton.jit
def _normalized(s, m, denom, big_inf, small_inf):
    # min-max normalize; when the maximum is +inf, +inf scores sit at I = 1 and finite ones at I = 0; failing that,
    # when the minimum is -inf (a score of -1), -inf sits at I = 0 and finite ones at I = 1 (the formula's limits)
    I = tl.where(small_inf, tl.where(s == float("-inf"), 0.0, 1.0), (s - m) / denom)
    return tl.where(big_inf, tl.where(s == float("inf"), 1.0, 0.0), I)


@triton.jit
def _gate(I, tau, beta, eps):
    return tl.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps))


@triton.jit
def _reshape_weights_fwd_kernel(
    scores_ptr,  # padded [B, T] (row stride stride_s_row) or packed [total] scores, any float dtype
    mask_ptr,  # padded: [B, T] uint8 valid mask (row stride stride_m_row); unused when packed or no mask
    cu_seqlens_ptr,  # packed: [B + 1] int32/int64 offsets; unused when padded
    out_ptr,  # same layout as the scores, contiguous, float32
    seq_len,  # padded: T
    stride_s_row,
    stride_m_row,
    tau,
    beta,
    eps,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # -- map the program to its sequence: [start, start + n) in the scores, out offset out_start ------------------
    seq = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        n = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - start
        s_ptr = scores_ptr + start
        o_ptr = out_ptr + start
    else:
        n = seq_len
        s_ptr = scores_ptr + seq * stride_s_row
        o_ptr = out_ptr + seq * seq_len
    m_ptr = mask_ptr + seq * stride_m_row
    offs = tl.arange(0, BLOCK_T)

    # -- 1. min, max and count of s = log1p(S) over valid tokens ------------------------------------------------
    lo = tl.full((BLOCK_T,), float("inf"), tl.float32)
    hi = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    cnt = tl.zeros((BLOCK_T,), tl.float32)
    n_bad = tl.zeros((BLOCK_T,), tl.float32)
    for off in range(0, n, BLOCK_T):
        _, valid, bad, s = _load_chunk(s_ptr, m_ptr, off + offs, n, HAS_MASK)
        ok = valid & ~bad  # bad scores are NaN/garbage after log1p: kept out of min and max
        lo = tl.minimum(lo, tl.where(ok, s, float("inf")))
        hi = tl.maximum(hi, tl.where(ok, s, float("-inf")))
        cnt += valid.to(tl.float32)
        n_bad += bad.to(tl.float32)
    m = tl.min(lo, axis=0)
    M = tl.max(hi, axis=0)
    n_valid = tl.sum(cnt, axis=0)
    poisoned = tl.sum(n_bad, axis=0) > 0.0
    big_inf = M == float("inf")
    small_inf = m == float("-inf")
    denom = tl.where(big_inf | small_inf, 1.0, M - m + eps)

    # -- 2. gated weights and their mass -----------------------------------------------------------------------
    acc = tl.zeros((BLOCK_T,), tl.float32)
    for off in range(0, n, BLOCK_T):
        _, valid, _, s = _load_chunk(s_ptr, m_ptr, off + offs, n, HAS_MASK)
        acc += tl.where(valid, _gate(_normalized(s, m, denom, big_inf, small_inf), tau, beta, eps), 0.0)
    total = tl.sum(acc, axis=0)
    # our choice (docs/method.md#reshape-edge-cases): all-equal, one token or zero mass -> weights 1
    degenerate = (n_valid <= 1.0) | (M == m) | (total <= 0.0)
    if RENORMALIZE:
        scale = n_valid / tl.where(total > 0.0, total, 1.0)
    else:
        scale = 1.0

    # -- 3. write renormalized weights; 0 at padding, NaN at every valid token of a poisoned sequence -----------
    for off in range(0, n, BLOCK_T):
        idx = off + offs
        in_seq, valid, _, s = _load_chunk(s_ptr, m_ptr, idx, n, HAS_MASK)
        w = tl.where(degenerate, 1.0, _gate(_normalized(s, m, denom, big_inf, small_inf), tau, beta, eps) * scale)
        w = tl.where(poisoned, float("nan"), w)
        tl.store(o_ptr + idx, tl.where(valid, w, 0.0), mask=in_seq)


# %% launcher ------------------------------------------------------------------------------------------------------
def reshape_launch_config(max_len: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): one chunk covers a typical response, longer ones loop."""
    block_t = min(MAX_BLOCK_T, max(16, next_power_of_2(max_len)))
    return block_t, 4 if block_t >= 512 else 2


def reshape_weights_forward(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    tau: float,
    beta: float,
    eps: float,
    renormalize: bool,
    block_t: int | None = None,
) -> torch.Tensor:
    """Launch the reshape kernel (arguments checked by the caller) -> float32 weights in the scores' layout."""
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    if cu_seqlens is not None:
        n_seq, seq_len = cu_seqlens.numel() - 1, 0
        scores = scores.contiguous()
        typical = scores.numel() // max(n_seq, 1)
        stride_s = 0
    else:
        n_seq, seq_len = scores.shape
        if scores.shape[1] > 0 and scores.stride(1) != 1:
            scores = scores.contiguous()
        typical, stride_s = seq_len, scores.stride(0)
    if n_seq == 0 or out.numel() == 0:
        return out.zero_()
    has_mask = mask is not None
    if has_mask:
        mask = mask.to(torch.uint8) if mask.dtype == torch.bool else (mask != 0).to(torch.uint8)
        mask = mask.contiguous()
    mask_arg = mask if has_mask else out  # a dummy pointer the kernel never reads
    cu_arg = cu_seqlens if cu_seqlens is not None else out
    default_block, num_warps = reshape_launch_config(typical)
    _reshape_weights_fwd_kernel[(n_seq,)](
        scores, mask_arg, cu_arg, out, seq_len, stride_s, mask.stride(0) if has_mask else 0,
        float(tau), float(beta), float(eps),
        PACKED=cu_seqlens is not None, HAS_MASK=has_mask, RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t or default_block, num_warps=num_warps,
    )
    return out


# %% public functional ---------------------------------------------------------------------------------------------
def check_reshape_args(scores, mask, cu_seqlens, tau, beta, eps, renormalize=True,
                       device: torch.device | None = None) -> None:
    """All argument checks of reshape_weights, before any launch (device: where the scores will live)."""
    check_float("scores", scores)
    device = scores.device if device is None else device
    check_reshape_params(tau, beta, eps, renormalize)
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("pass either mask (padded [B, T] layout) or cu_seqlens (packed [total] layout), not both")
        if scores.dim() != 1:
            raise ValueError(f"packed scores must have shape [total] when cu_seqlens is given, got "
                             f"{tuple(scores.shape)}")
        check_cu_seqlens(cu_seqlens, scores.shape[0])
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens must be on the scores' device {device}, got {cu_seqlens.device}")
    else:
        if scores.dim() != 2:
            raise ValueError(f"padded scores must have shape [B, T], got {tuple(scores.shape)} "
                             "(pass cu_seqlens for a packed [total] layout)")
        check_mask(mask, scores.shape)
        if mask is not None and mask.device != device:
            raise ValueError(f"mask must be on the scores' device {device}, got {mask.device}")


def reshape_weights(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    tau: float = TAU,
    beta: float = BETA,
    eps: float = EPS,
    renormalize: bool = RENORMALIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """Reshape visual-dependency scores into PGPO token weights (arXiv 2604.01840, Sec. 3: log-compression, min-max
    normalization, threshold gate, mass-conserving renormalization).

    Args:
        scores: padded [B, T] or packed [total] per-token scores S_t >= 0 (e.g. from token_kl).
        mask: padded layout only, bool [B, T], True = valid response token; None = all valid.
        cu_seqlens: packed layout only, int32 [B + 1] sequence offsets (0, ..., total).
        tau: gate threshold in [0, 1]; beta: amplification >= 0; eps: small constant > 0.
        renormalize: rescale so each sequence's weights sum to its valid-token count.
        backend: "triton", "torch" or "auto".

    Returns:
        float32 weights in the scores' layout, 0 at padding; sequences with no spread in their scores get 1. A NaN,
        -inf or < -1 score at a valid position makes its sequence's weights NaN (the others are unaffected); +inf is
        the sequence maximum. Never carries a gradient.
    """
    check_reshape_args(scores, mask, cu_seqlens, tau, beta, eps, renormalize)
    return reshape_weights_checked(scores, mask, cu_seqlens, tau, beta, eps, renormalize, backend)


def reshape_weights_checked(scores, mask, cu_seqlens, tau, beta, eps, renormalize, backend) -> torch.Tensor:
    """reshape_weights after check_reshape_args has passed (pgpo_token_weights checks before its KL launch, and
    checking again would read cu_seqlens on the host a second time)."""
    backend = resolve_backend(backend, scores)
    if backend == "torch":
        return reshape_weights_torch(scores, mask, cu_seqlens, tau, beta, eps, renormalize)
    return reshape_weights_forward(scores, mask, cu_seqlens, tau, beta, eps, renormalize)
