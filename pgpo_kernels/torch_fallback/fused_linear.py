"""Torch fallback of fused_linear_token_kl / fused_linear_token_stats: from hidden states [N, H] and the lm_head
[V, H], logits are built for `chunk` rows at a time, so peak extra memory is O(chunk x V), never [N, V].

Unlike the Triton kernels (fp32 accumulators straight from tl.dot), this rounds each logit chunk to the input dtype,
exactly as an unfused `lm_head(hidden)` would.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pgpo_kernels.torch_fallback.token_kl import token_kl_torch
from pgpo_kernels.torch_fallback.token_stats import stats_chunk

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
        for out, val in zip(outs, stats_chunk(la, lb, target[lo:hi], temperature)):
            out[lo:hi] = val
        del la, lb
    return tuple(outs)
