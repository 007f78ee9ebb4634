"""Torch fallback of token_stats: log pi(target), entropy and KL from two [N, V] logit tensors, a few [chunk, V]
buffers at a time (the compiled or eager fast path per chunk, then its special rows exactly in float64: common.py).
"""

from __future__ import annotations

import math

import torch

from pgpo_kernels.torch_fallback.common import centred_logp
from pgpo_kernels.torch_fallback.common import compute_dtype
from pgpo_kernels.torch_fallback.common import eager_slices
from pgpo_kernels.torch_fallback.common import rows_per_chunk
from pgpo_kernels.torch_fallback.compile import run_compiled


def stats_block(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float, dt: torch.dtype):
    """[c, V] logits x2 + [c] targets -> (logp, logp_txt, entropy, kl) in dtype dt, every rule explicit (compilable).

    As kl_block: exact in float64 for any fp32/bf16/fp16 logits; in float32 a row that needs care comes out
    non-finite (entropy or KL) and is recomputed in float64 by the caller.
    """
    logp, xs_a, lse_a, m_a = centred_logp(a, dt, temperature)  # [c, V], [c, V], [c, 1], [c, 1]
    logq, xs_b, lse_b, m_b = centred_logp(b, dt, temperature)
    p = logp.exp()
    zero = torch.zeros((), dtype=dt, device=a.device)
    support = a != -math.inf  # a_i = -inf contributes nothing (p_i = 0, never 0 * inf)
    ent = -torch.where(support, p * logp, zero).sum(-1)
    kl = torch.where(support, p * (logp - logq), zero).sum(-1)
    if dt == torch.float64:  # the exact pass: a finite a_i where b_i = -inf gives +inf even if p_i underflows
        kl = torch.where((support & (b == -math.inf)).any(-1), math.inf, kl)
    idx = target.long().unsqueeze(-1)
    lp_t = (xs_a.gather(-1, idx) - lse_a).squeeze(-1)  # [c], log_softmax's own formula at the target
    lq_t = (xs_b.gather(-1, idx) - lse_b).squeeze(-1)
    m_a, m_b = m_a.squeeze(-1), m_b.squeeze(-1)
    no_a, no_b = m_a == -math.inf, m_b == -math.inf  # all -inf rows: no distribution
    kl = torch.where(no_b, math.inf, kl)
    # our choice: an all -inf row of a has no distribution -> entropy 0, KL 0, log-prob -inf
    ent = torch.where(no_a, zero, ent).clamp_min(0.0)
    kl = torch.where(no_a, zero, kl).clamp_min(0.0)
    lp_t = torch.where(no_a, -math.inf, lp_t).clamp_max(0.0)
    lq_t = torch.where(no_b, -math.inf, lq_t).clamp_max(0.0)
    # NaN or +inf anywhere in either row (max NaN or +inf): every output of the row is NaN
    bad = ~(m_a < math.inf) | ~(m_b < math.inf)
    return tuple(torch.where(bad, math.nan, v) for v in (lp_t, lq_t, ent, kl))


def _stats_plain(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float):
    """The plain formulas in three [c, V] buffers, in place; every row that needs a rule comes out non-finite in
    its entropy or KL (an -inf entry: 0 * inf; NaN or +inf logits: NaN; overflowing differences: inf or NaN)."""
    dt = compute_dtype(a.dtype)
    x, y = a.to(dt), b.to(dt)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    logp = x.log_softmax(-1)  # [c, V] new tensors: the inputs are never written
    logq = y.log_softmax(-1)
    idx = target.long().unsqueeze(-1)
    lp_t = logp.gather(-1, idx).squeeze(-1).clamp_max_(0.0)
    lq_t = logq.gather(-1, idx).squeeze(-1).clamp_max_(0.0)
    p = logp.exp()
    # x is ours to overwrite unless it is the fp32 input itself (T = 1): then one more [c, V] buffer
    tmp = x if x is not a else torch.empty_like(p)
    ent = torch.mul(p, logp, out=tmp).sum(-1).neg_().clamp_min_(0.0)  # sum, not a dot: pairwise, accurate
    kl = logq.neg_().add_(logp).mul_(p).sum(-1).clamp_min_(0.0)  # sum p (log p - log q)
    return lp_t, lq_t, ent, kl


def stats_chunk(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float):
    """One chunk through the compiled or the eager fast path, then its special rows exactly (float64)."""
    outs = run_compiled(stats_block, a.numel(), a, b, target, temperature, compute_dtype(a.dtype))
    if outs is None:
        parts = [_stats_plain(a[lo:hi], b[lo:hi], target[lo:hi], temperature) for lo, hi in eager_slices(*a.shape)]
        outs = tuple(torch.cat(col) for col in zip(*parts))
    lp_t, lq_t, ent, kl = outs
    special = ~torch.isfinite(kl) | ~torch.isfinite(ent) | torch.isnan(lp_t) | torch.isnan(lq_t)
    rows = special.nonzero().squeeze(-1)  # one host sync per chunk (a CPU fallback: cheap)
    if rows.numel():
        for out, val in zip(outs, stats_block(a[rows], b[rows], target[rows], temperature, torch.float64)):
            out[rows] = val.to(out.dtype)
    return outs


@torch.no_grad()  # statistics, never a loss: no autograd graph whatever the inputs' requires_grad
def token_stats_torch(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float = 1.0):
    """[N, V] x2 + [N] int targets -> (logp, logp_txt, entropy, kl), each [N] float32, row chunks of ~64 MiB."""
    n_rows, n_cols = a.shape
    outs = [torch.empty(n_rows, dtype=torch.float32, device=a.device) for _ in range(4)]
    step = rows_per_chunk(n_cols)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        for out, val in zip(outs, stats_chunk(a[lo:hi], b[lo:hi], target[lo:hi], temperature)):
            out[lo:hi] = val
    return tuple(outs)
