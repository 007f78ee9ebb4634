"""The torch fallback: same results as the Triton kernels, memory-frugal, for CPUs and where Triton cannot run.

Token KL works over row chunks, so it never holds a full fp32 copy of an [N, V] input: peak extra memory is a few
[chunk, V] fp32 buffers. The reshape is vectorized over all sequences with segment reductions (scatter_reduce), for
the padded and the packed layout alike.
"""

from __future__ import annotations

import math

import torch

# Rows per chunk are chosen so that one fp32 [chunk, V] buffer stays near this many elements (64 MiB).
_CHUNK_ELEMS = 1 << 24


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(n_cols, 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation whatever the input dtype (SPEC 1), fp64 kept for float64 inputs (gradcheck needs it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_terms(logp: torch.Tensor, logq: torch.Tensor, support: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL per row from log-softmaxes [c, V]; support = a != -inf; b the raw logits of the second pass."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    inf = torch.full((), float("inf"), dtype=logp.dtype, device=logp.device)
    # p_i = 0 (a_i = -inf) contributes nothing; a finite a_i where b_i = -inf gives +inf even if p_i underflows
    kl = torch.where(support, torch.where(logq == float("-inf"), inf, logp.exp() * (logp - logq)), zero).sum(-1)
    has_mass = support.any(-1)
    kl = torch.where(has_mass & (b == float("-inf")).all(-1), inf, kl)  # q has no mass at all
    # our choice (SPEC 1 is silent): an all -inf row of a has no distribution -> KL 0
    return torch.where(has_mass, kl, zero).clamp_min(0.0)


def _kl_rows_exact(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [c, V] logits x2 -> [c] KL in the compute dtype, every -inf case of SPEC 1 masked explicitly."""
    dt = compute_dtype(a.dtype)
    x = a.to(dt) / temperature  # a new tensor even for fp32 inputs
    logp = x.log_softmax(-1)  # [c, V], centred: no cancellation of large logits
    logq = (b.to(dt) / temperature).log_softmax(-1)
    return kl_terms(logp, logq, x != float("-inf"), b)


def _kl_rows(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [c, V] logits x2 -> [c] KL in the compute dtype. Never writes into its inputs.

    The plain sum p * (log p - log q) in two [c, V] buffers. It differs from the masked one only at -inf entries,
    where it gives NaN (0 * inf) or +inf for the whole row; only such rows are recomputed with every mask.
    """
    dt = compute_dtype(a.dtype)
    x, y = a.to(dt), b.to(dt)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    logp = x.log_softmax(-1)  # [c, V] new tensors, centred: no cancellation of large logits
    diff = y.log_softmax(-1).neg_().add_(logp)  # log p - log q
    kl = logp.exp_().mul_(diff).sum(-1)
    special = (~torch.isfinite(kl)).nonzero().squeeze(-1)  # one host sync per chunk (a CPU fallback: cheap)
    if special.numel():
        kl[special] = _kl_rows_exact(a[special], b[special], temperature)
    return kl.clamp_min_(0.0)


def token_kl_torch(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(a / temp) || softmax(b / temp)) per row of [N, V] inputs -> [N] float32 (float64 for float64 in)."""
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=compute_dtype(a.dtype), device=a.device)
    step = _rows_per_chunk(n_cols)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        out[lo:hi] = _kl_rows(a[lo:hi], b[lo:hi], temperature)
    return out


def _segment_ids_packed(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)  # [total]


def reshape_weights_torch(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    tau: float,
    beta: float,
    eps: float,
    renormalize: bool,
) -> torch.Tensor:
    """SPEC section 2 over a padded [B, T] (+ mask) or packed [total] (+ cu_seqlens) batch -> float32, 0 at padding."""
    if cu_seqlens is not None:
        n_seq = cu_seqlens.numel() - 1
        seg = _segment_ids_packed(cu_seqlens, scores.numel())
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        n_seq = scores.shape[0]
        seg = torch.arange(n_seq, device=scores.device).unsqueeze(1).expand_as(scores)
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    shape = scores.shape
    s = torch.log1p(scores.float().reshape(-1))  # log-compression, [N]
    seg, valid = seg.reshape(-1), valid.reshape(-1)
    inf = torch.tensor(math.inf, device=s.device)
    zeros = torch.zeros(n_seq, device=s.device)

    # 1. min, max and count over each sequence's valid tokens; padding never enters.
    m = zeros.scatter_reduce(0, seg, torch.where(valid, s, inf), "amin", include_self=False)  # [B]
    M = zeros.scatter_reduce(0, seg, torch.where(valid, s, -inf), "amax", include_self=False)  # [B]
    n_valid = zeros.scatter_add(0, seg, valid.float())  # [B]
    m_t, M_t = m[seg], M[seg]  # [N]

    # 2. min-max normalize; +inf scores are the sequence maximum (I = 1) and finite ones then sit at I = 0.
    I = torch.where(M_t == inf, (s == inf).float(), (s - m_t) / (M_t - m_t + eps))
    # 3. gate: suppress below tau (ramp 0..1), amplify above (1 .. 1 + beta)
    w = torch.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps))
    w = torch.where(valid, w, torch.zeros_like(w))

    # 4. renormalize to keep the mass: sum of weights = number of valid tokens
    total = zeros.scatter_add(0, seg, w)  # [B]
    # our choice (SPEC 2): all-equal, single token or zero mass -> uniform weights 1, never NaN
    degenerate = (n_valid <= 1) | (M == m) | ~(total > 0)
    scale = n_valid / total if renormalize else torch.ones_like(total)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    out = torch.where(degenerate[seg], torch.ones_like(w), w * scale[seg])
    out = torch.where(valid, out, torch.zeros_like(out))
    return out.reshape(shape)
