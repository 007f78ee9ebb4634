"""Torch fallbacks of the fused ops: same results as the Triton kernels, chunked over rows, for CPUs and tests.

- token stats (log pi(target), entropy, KL) from two [N, V] logit tensors, a few [chunk, V] buffers at a time;
- fused-linear KL / stats from hidden states [N, H] and the lm_head [V, H]: logits are built for `chunk` rows at a
  time, so peak extra memory is O(chunk x V), never [N, V];
- the token-KL gradient (recomputes both softmaxes from the logits, nothing [N, V] saved).

Unlike the Triton kernels (fp32 accumulators straight from tl.dot), the fused-linear fallback rounds each logit
chunk to the input dtype, exactly as an unfused `lm_head(hidden)` would.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from pgpo_kernels.torch_compile import run_compiled
from pgpo_kernels.torch_ops import _rows_per_chunk
from pgpo_kernels.torch_ops import centred_logp
from pgpo_kernels.torch_ops import compute_dtype
from pgpo_kernels.torch_ops import eager_slices
from pgpo_kernels.torch_ops import token_kl_torch

# our choice: a fallback chunk may use up to this share of the free memory, and never more than this many rows
FREE_MEMORY_SHARE = 0.25
MAX_CHUNK_ROWS = 8192


def free_memory_bytes(device: torch.device) -> int:
    """Free bytes where the tensors live: CUDA's mem_get_info, else the host's available memory (Linux sysconf)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux hosts
        return 1 << 30


def default_chunk_rows(n_cols: int, itemsize: int, device: torch.device) -> int:
    """Rows per fused-linear fallback chunk, from free memory.

    One chunk row costs about two logit rows in the input dtype (both passes) plus four fp32 rows (two
    log-softmaxes, the product and a temporary): V * (2 * itemsize + 16) bytes.
    """
    per_row = max(n_cols, 1) * (2 * itemsize + 16)
    rows = int(free_memory_bytes(device) * FREE_MEMORY_SHARE) // per_row
    return max(1, min(MAX_CHUNK_ROWS, rows))


# %% token stats from logits ---------------------------------------------------------------------------------------
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


def _stats_chunk(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float):
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
    step = _rows_per_chunk(n_cols)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        for out, val in zip(outs, _stats_chunk(a[lo:hi], b[lo:hi], target[lo:hi], temperature)):
            out[lo:hi] = val
    return tuple(outs)


# %% fused linear (hidden states -> KL / stats) -------------------------------------------------------------------
def fused_linear_token_kl_torch(
    hidden_vis: torch.Tensor,
    hidden_txt: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    chunk_rows: int,
) -> torch.Tensor:
    """KL per row from [N, H] hidden states x2 and the lm_head [V, H]; logits built chunk_rows at a time -> [N] fp32."""
    n_rows = hidden_vis.shape[0]
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden_vis.device)
    for lo in range(0, n_rows, chunk_rows):
        hi = min(lo + chunk_rows, n_rows)
        la = F.linear(hidden_vis[lo:hi], weight, bias)  # [c, V], the only V-sized buffers alive
        lb = F.linear(hidden_txt[lo:hi], weight, bias)
        out[lo:hi] = token_kl_torch(la, lb, temperature)  # [c] (fp64 stays exact here, cast on store)
        del la, lb
    return out


def fused_linear_token_stats_torch(
    hidden_vis: torch.Tensor,
    hidden_txt: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    chunk_rows: int,
):
    """(logp, logp_txt, entropy, kl), each [N] float32, from hidden states; logits built chunk_rows at a time."""
    n_rows = hidden_vis.shape[0]
    outs = [torch.empty(n_rows, dtype=torch.float32, device=hidden_vis.device) for _ in range(4)]
    for lo in range(0, n_rows, chunk_rows):
        hi = min(lo + chunk_rows, n_rows)
        la = F.linear(hidden_vis[lo:hi], weight, bias)  # [c, V]
        lb = F.linear(hidden_txt[lo:hi], weight, bias)
        for out, val in zip(outs, _stats_chunk(la, lb, target[lo:hi], temperature)):
            out[lo:hi] = val
        del la, lb
    return tuple(outs)


# %% token KL gradient ----------------------------------------------------------------------------------------------
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
