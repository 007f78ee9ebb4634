"""Torch fallback of reshape_weights: vectorized over all sequences with segment reductions (scatter_reduce), for the
padded and the packed layout alike, under no_grad (the weights carry no gradient), with no host sync.
"""

from __future__ import annotations

import math

import torch


def _segment_ids_packed(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)  # [total]


@torch.no_grad()  # the weights carry no gradient (docs/method.md#reshape), whatever the scores' requires_grad
def reshape_weights_torch(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    tau: float,
    beta: float,
    eps: float,
    renormalize: bool,
) -> torch.Tensor:
    """The reshape (docs/method.md#reshape) over a padded [B, T] (+ mask) or packed [total] (+ cu_seqlens) batch
    -> float32, 0 at padding.

    A NaN, -inf or < -1 score (log1p undefined) in a valid position makes its sequence's weights NaN; +inf scores
    are the sequence maximum (I = 1), a score of exactly -1 (log1p = -inf) its minimum (I = 0). No host sync.
    """
    if cu_seqlens is not None:
        n_seq = cu_seqlens.numel() - 1
        seg = _segment_ids_packed(cu_seqlens, scores.numel())
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        n_seq = scores.shape[0]
        seg = torch.arange(n_seq, device=scores.device).unsqueeze(1).expand_as(scores)
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    shape = scores.shape
    raw = scores.float().reshape(-1)
    s = torch.log1p(raw)  # log-compression, [N]
    seg, valid = seg.reshape(-1), valid.reshape(-1)
    inf = torch.tensor(math.inf, device=s.device)
    zeros = torch.zeros(n_seq, device=s.device)

    # 0. a score log1p cannot take (NaN, -inf, < -1) in a valid position poisons its sequence (NaN weights)
    bad_tok = valid & (torch.isnan(raw) | (raw < -1.0))
    bad = zeros.scatter_add(0, seg, bad_tok.float()) > 0  # [B]

    # 1. min, max and count over each sequence's valid tokens; padding never enters.
    m = zeros.scatter_reduce(0, seg, torch.where(valid, s, inf), "amin", include_self=False)  # [B]
    M = zeros.scatter_reduce(0, seg, torch.where(valid, s, -inf), "amax", include_self=False)  # [B]
    n_valid = zeros.scatter_add(0, seg, valid.float())  # [B]
    m_t, M_t = m[seg], M[seg]  # [N]

    # 2. min-max normalize; a +inf score is the sequence maximum (I = 1) and finite ones then sit at I = 0; failing
    # that, a -inf s (score -1) is the minimum (I = 0) and finite ones sit at I = 1 (both: the limits of the formula)
    I = torch.where(M_t == inf, (s == inf).float(),
                    torch.where(m_t == -inf, (s != -inf).float(), (s - m_t) / (M_t - m_t + eps)))
    # 3. gate: suppress below tau (ramp 0..1), amplify above (1 .. 1 + beta)
    w = torch.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps))
    w = torch.where(valid, w, torch.zeros_like(w))

    # 4. renormalize to keep the mass: sum of weights = number of valid tokens
    total = zeros.scatter_add(0, seg, w)  # [B]
    # our choice (docs/method.md#reshape-edge-cases): all-equal, single token or zero mass -> uniform weights 1, never NaN
    degenerate = (n_valid <= 1) | (M == m) | ~(total > 0)
    scale = n_valid / total if renormalize else torch.ones_like(total)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    out = torch.where(degenerate[seg], torch.ones_like(w), w * scale[seg])
    out = torch.where(bad[seg], torch.full_like(out, math.nan), out)
    out = torch.where(valid, out, torch.zeros_like(out))
    return out.reshape(shape)
