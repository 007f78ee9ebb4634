"""Torch fallback of token_kl (forward and backward): same results as the Triton kernels, row-chunked.

The forward runs each chunk through the compiled or the eager fast path and recomputes in float64, by `kl_block`, the
rows those give a non-finite KL (common.py). The backward recomputes both softmaxes from the logits, nothing [N, V]
saved.
"""

from __future__ import annotations

import math

import torch

from pgpo_kernels.torch_fallback.common import centred_logp
from pgpo_kernels.torch_fallback.common import compute_dtype
from pgpo_kernels.torch_fallback.common import eager_slices
from pgpo_kernels.torch_fallback.common import fix_rows
from pgpo_kernels.torch_fallback.common import rows_per_chunk
from pgpo_kernels.torch_fallback.compile import run_compiled


def kl_block(a: torch.Tensor, b: torch.Tensor, temperature: float, dt: torch.dtype) -> torch.Tensor:
    """[c, V] logits x2 -> [c] KL in dtype dt with every rule explicit; no data-dependent control flow (compilable).

    In float64 it is exact for any fp32/bf16/fp16 logits, huge ones included (their differences fit). In float32 a
    row that needs care (differences that overflow, a logit that overflows on / T, p_i underflowing where b_i = -inf)
    comes out non-finite, and the caller recomputes it in float64.
    """
    logp, _, _, m_a = centred_logp(a, dt, temperature)  # [c, V], [c, 1]
    logq, _, _, m_b = centred_logp(b, dt, temperature)
    zero = torch.zeros((), dtype=dt, device=a.device)
    # a_i = -inf contributes nothing (p_i = 0, never 0 * inf); any other 0 * inf is a NaN for the float64 redo
    kl = torch.where(a != -math.inf, logp.exp() * (logp - logq), zero).sum(-1)
    if dt == torch.float64:  # the exact pass: a finite a_i where b_i = -inf gives +inf even if p_i underflows
        kl = torch.where(((a != -math.inf) & (b == -math.inf)).any(-1), math.inf, kl)
    m_a, m_b = m_a.squeeze(-1), m_b.squeeze(-1)
    # an all -inf row of b (with mass in a) has no q: +inf
    kl = torch.where(m_b == -math.inf, math.inf, kl)
    # our choice (docs/method.md#nonfinite: the paper is silent): an all -inf row of a has no distribution -> KL 0
    kl = torch.where(m_a == -math.inf, zero, kl).clamp_min(0.0)
    # NaN or +inf anywhere in either row (max NaN or +inf): the row's KL is NaN, never 0 or finite garbage
    return torch.where(~(m_a < math.inf) | ~(m_b < math.inf), math.nan, kl)


def _kl_plain(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain sum p * (log p - log q) in two [c, V] buffers, in place: finite exactly where no rule is needed.

    An -inf entry gives NaN (0 * inf) or +inf, a NaN or +inf logit NaN, an overflowing difference of huge logits
    -inf in log p (then 0 * inf = NaN) or in log q (+inf): every row that needs care comes out non-finite.
    """
    dt = compute_dtype(a.dtype)
    x, y = a.to(dt), b.to(dt)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    logp = x.log_softmax(-1)  # [c, V] new tensors: the inputs are never written
    diff = y.log_softmax(-1).neg_().add_(logp)  # log p - log q
    return logp.exp_().mul_(diff).sum(-1)


def _kl_rows(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [c, V] logits x2 -> [c] KL in the compute dtype. Never writes into its inputs."""
    kl = run_compiled(kl_block, a.numel(), a, b, temperature, compute_dtype(a.dtype))
    if kl is None:
        kl = torch.cat([_kl_plain(a[lo:hi], b[lo:hi], temperature) for lo, hi in eager_slices(*a.shape)])
    fix_rows(kl, ~torch.isfinite(kl), lambda r: kl_block(a[r], b[r], temperature, torch.float64))
    return kl.clamp_min_(0.0)


def token_kl_torch(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(a / temp) || softmax(b / temp)) per row of [N, V] inputs -> [N] float32 (float64 for float64 in).

    No autograd graph (TokenKLFunction gives the gradient).
    """
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=compute_dtype(a.dtype), device=a.device)
    step = rows_per_chunk(n_cols)
    with torch.no_grad():
        for lo in range(0, n_rows, step):
            hi = min(lo + step, n_rows)
            out[lo:hi] = _kl_rows(a[lo:hi], b[lo:hi], temperature)
    return out


# %% backward ---------------------------------------------------------------------------------------------------------
def kl_grad_block(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, temperature: float, dt: torch.dtype):
    """[c, V] x2 and grad_out [c] -> (dKL/da, dKL/db) [c, V] x2 in dtype dt plus the rows' KL [c], every rule explicit.

    A row with no distribution (all -inf in a) gets 0; a row whose KL is +inf, or with a NaN or +inf logit, gets NaN
    (no derivative). In float32 a row with overflowing differences gets a non-finite KL: recompute it in float64.
    """
    inv_t = 1.0 / temperature
    x, y = a.to(dt) * inv_t, b.to(dt) * inv_t
    logp = x.log_softmax(-1)  # [c, V]
    logq = y.log_softmax(-1)
    p = logp.exp()
    zero = torch.zeros((), dtype=dt, device=a.device)
    diff = torch.where(p > 0, logp - logq, zero)  # p_i = 0 contributes nothing, never 0 * inf
    kl = (p * diff).sum(-1, keepdim=True)  # [c, 1]
    gs = g.to(dt).unsqueeze(-1) * inv_t  # [c, 1]
    ga = gs * p * (diff - kl)
    gb = gs * (logq.exp() - p)
    support = a != -math.inf
    has_mass = support.any(-1, keepdim=True)  # [c, 1]
    # no distribution: KL is the constant 0; infinite KL (a finite where b = -inf) or bad logits: no derivative
    kl = torch.where((support & (b == -math.inf)).any(-1, keepdim=True), math.inf, kl)
    # NaN or +inf anywhere in a row (max NaN or +inf; in fp32 also an overflow of a / T, redone in float64)
    nonfinite = ~(x.amax(-1, keepdim=True) < math.inf) | ~(y.amax(-1, keepdim=True) < math.inf)
    bad = has_mass & ~torch.isfinite(kl) | nonfinite
    nan = torch.full((), math.nan, dtype=dt, device=a.device)
    ga = torch.where(bad, nan, torch.where(has_mass, ga, zero))
    gb = torch.where(bad, nan, torch.where(has_mass, gb, zero))
    return ga, gb, torch.where(has_mass, kl, zero).squeeze(-1)


def token_kl_backward_torch(
    a: torch.Tensor, b: torch.Tensor, grad_out: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of KL(softmax(a/T) || softmax(b/T)) per row, scaled by grad_out [N]; [N, V] x2 -> grads [N, V] x2.

        dKL/da_j = p_j ((log p_j - log q_j) - KL) / T,    dKL/db_j = (q_j - p_j) / T

    Rows whose KL is +inf (a finite where b = -inf) or that hold a NaN or +inf logit get NaN gradients: the
    derivative does not exist there. Rows whose fp32 KL overflows (huge finite logits) are recomputed in float64.
    """
    n_rows, n_cols = a.shape
    grad_a = torch.empty_like(a)
    grad_b = torch.empty_like(b)
    dt = compute_dtype(a.dtype)
    for lo, hi in eager_slices(n_rows, n_cols):
        ca, cb, cg = a[lo:hi], b[lo:hi], grad_out[lo:hi]
        ga, gb, kl = kl_grad_block(ca, cb, cg, temperature, dt)
        # a non-finite KL in fp32 is either a rule's case (same verdict in float64) or an overflow: redo in float64
        rows = (~torch.isfinite(kl)).nonzero().squeeze(-1)  # one host sync per chunk
        if rows.numel() and dt != torch.float64:
            ga64, gb64, _ = kl_grad_block(ca[rows], cb[rows], cg[rows], temperature, torch.float64)
            ga[rows], gb[rows] = ga64.to(dt), gb64.to(dt)
        grad_a[lo:hi] = ga.to(a.dtype)
        grad_b[lo:hi] = gb.to(b.dtype)
    return grad_a, grad_b
