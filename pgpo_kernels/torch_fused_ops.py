"""Torch fallbacks of the fused ops: same results as the Triton kernels, chunked over rows, for CPUs and tests.

- token stats (log pi(target), entropy, KL) from two [N, V] logit tensors, a few [chunk, V] buffers at a time;
- fused-linear KL / stats from hidden states [N, H] and the lm_head [V, H]: logits are built for `chunk` rows at a
  time, so peak extra memory is O(chunk x V), never [N, V];
- the token-KL gradient (recomputes both softmaxes from the logits, nothing [N, V] saved).

Unlike the Triton kernels (fp32 accumulators straight from tl.dot), the fused-linear fallback rounds each logit
chunk to the input dtype, exactly as an unfused `lm_head(hidden)` would.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pgpo_kernels.torch_ops import _rows_per_chunk
from pgpo_kernels.torch_ops import compute_dtype
from pgpo_kernels.torch_ops import kl_terms
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
def _stats_rows(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float):
    """One chunk: [c, V] logits x2 + [c] targets -> (logp, logp_txt, entropy, kl), each [c] in the compute dtype."""
    dt = compute_dtype(a.dtype)
    x = a.to(dt) / temperature  # [c, V]
    support = x != float("-inf")
    logp = x.log_softmax(-1)  # [c, V]
    logq = (b.to(dt) / temperature).log_softmax(-1)  # [c, V]
    idx = target.long().unsqueeze(-1)
    lp_t = logp.gather(-1, idx).squeeze(-1)  # [c]
    lq_t = logq.gather(-1, idx).squeeze(-1)
    zero = torch.zeros((), dtype=dt, device=a.device)
    ent = -torch.where(support, logp.exp() * logp, zero).sum(-1)
    kl = kl_terms(logp, logq, support, b)
    has_mass = support.any(-1)
    # our choice: an all -inf row has no distribution -> entropy 0, log-prob -inf
    ent = torch.where(has_mass, ent, zero).clamp_min(0.0)
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=a.device)
    lp_t = torch.where(has_mass, lp_t, neg_inf).clamp_max(0.0)
    lq_t = torch.where((b != float("-inf")).any(-1), lq_t, neg_inf).clamp_max(0.0)
    return lp_t, lq_t, ent, kl


def token_stats_torch(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float = 1.0):
    """[N, V] x2 + [N] int targets -> (logp, logp_txt, entropy, kl), each [N] float32, row chunks of ~64 MiB."""
    n_rows, n_cols = a.shape
    outs = [torch.empty(n_rows, dtype=torch.float32, device=a.device) for _ in range(4)]
    step = _rows_per_chunk(n_cols)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        for out, val in zip(outs, _stats_rows(a[lo:hi], b[lo:hi], target[lo:hi], temperature)):
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
        for out, val in zip(outs, _stats_rows(la, lb, target[lo:hi], temperature)):
            out[lo:hi] = val
        del la, lb
    return tuple(outs)


# %% token KL gradient ----------------------------------------------------------------------------------------------
def token_kl_backward_torch(
    a: torch.Tensor, b: torch.Tensor, grad_out: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of KL(softmax(a/T) || softmax(b/T)) per row, scaled by grad_out [N]; [N, V] x2 -> grads [N, V] x2.

        dKL/da_j = p_j ((log p_j - log q_j) - KL) / T,    dKL/db_j = (q_j - p_j) / T

    Rows whose KL is +inf (a finite where b = -inf) get NaN gradients: the derivative does not exist there.
    """
    n_rows, n_cols = a.shape
    grad_a = torch.empty_like(a)
    grad_b = torch.empty_like(b)
    dt = compute_dtype(a.dtype)
    step = _rows_per_chunk(n_cols)
    inv_t = 1.0 / temperature
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        x = a[lo:hi].to(dt) * inv_t  # [c, V]
        support = x != float("-inf")
        has_mass = support.any(-1, keepdim=True)  # [c, 1]
        logp = x.log_softmax(-1)
        logq = (b[lo:hi].to(dt) * inv_t).log_softmax(-1)
        p = logp.exp()
        zero = torch.zeros((), dtype=dt, device=a.device)
        diff = torch.where(support, logp - logq, zero)  # [c, V]
        kl = (p * diff).sum(-1, keepdim=True)  # [c, 1]
        g = grad_out[lo:hi].to(dt).unsqueeze(-1) * inv_t  # [c, 1]
        ga = torch.where(support, g * p * (diff - kl), zero)
        gb = g * (logq.exp() - p)
        # no distribution (all -inf row of a): KL is the constant 0; infinite KL: no derivative
        ga = torch.where(has_mass, ga, zero)
        gb = torch.where(has_mass, gb, zero)
        # +inf, or NaN where p_i underflows to 0 against q_i = 0 (the KL is +inf there too); a row without mass is 0
        bad = has_mass & ~torch.isfinite(kl)
        nan = torch.full((), float("nan"), dtype=dt, device=a.device)
        grad_a[lo:hi] = torch.where(bad, nan, ga).to(a.dtype)
        grad_b[lo:hi] = torch.where(bad, nan, gb).to(b.dtype)
    return grad_a, grad_b
