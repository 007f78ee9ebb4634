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


def token_kl_torch(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(a / temp) || softmax(b / temp)) per row of [N, V] inputs -> [N] float32."""
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    step = _rows_per_chunk(n_cols)
    inv_t = 1.0 / temperature
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        # fp32 accumulation whatever the input dtype (SPEC 1)
        # out of place: .float() of an fp32 input is the input itself, which must never be scaled in place
        logp = a[lo:hi].float() * inv_t  # [c, V]
        support = logp != float("-inf")
        logp = logp.log_softmax(-1)  # in fp32, centred: no cancellation of large logits
        logq = b[lo:hi].float() * inv_t  # [c, V]
        b_support = (logq != float("-inf")).any(-1)  # [c]
        logq = logq.log_softmax(-1)
        # p * (log p - log q), with p_i = 0 contributing nothing (never 0 * inf)
        logq.neg_().add_(logp)  # log p - log q; +inf where b = -inf and a finite
        term = logp.exp_().mul_(logq)
        term = torch.where(support, term, torch.zeros((), dtype=term.dtype, device=term.device))
        kl = term.sum(-1)
        # a row of a that is all -inf has no distribution: KL 0 (our choice, SPEC 1 is silent)
        # b with no support at all (log_softmax gives nan there) while a has some: +inf, as SPEC 1 says
        kl = torch.where(b_support, kl, torch.full_like(kl, float("inf")))
        kl = torch.where(support.any(-1), kl, torch.zeros_like(kl))
        out[lo:hi] = kl.clamp_min_(0.0)
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
