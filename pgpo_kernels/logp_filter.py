"""Which backward tiles fused_linear_logp's gradient filter skips, computed in torch with the kernel's rule.

The Triton backward skips a BLOCK_N x BLOCK_V tile of logits when every |d_ij| < grad_filter x s_i, where
d = dL/dlogits and s_i = (|g_logp_i| + |g_ent_i|) / T (fused_linear_logp's docstring). This module applies the same
rule to logits it builds one row block at a time ([BLOCK_N, V] fp32, never [N, V]), so the skipped fraction of a
real next-token distribution can be measured on any device, at any size, without the kernel; on CUDA the kernel's
own count (logp_backward's skip_counter) says the same. Logits here are fp32 from the input-dtype matmul; the
kernel's differ by accumulation order, so a tile whose largest |d| sits within rounding of the threshold can go
either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pgpo_kernels.fused_logp import resolve_grad_filter


@dataclass
class FilterTiles:
    """Tiles of one backward launch and what the filter does to them."""

    tiles: int  # cdiv(N, block_n) x cdiv(V, block_v)
    skipped: int  # tiles the rule skips
    skipped_mass_max: float  # max over rows of sum_{skipped j} |d_ij| / s_i: the bound's per-row factor
    skipped_mass_mean: float  # its mean over rows with s_i > 0

    @property
    def fraction(self) -> float:
        return self.skipped / self.tiles if self.tiles else 0.0


def tile_rule(x: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, g_lp: torch.Tensor, g_en: torch.Tensor,
              temperature: float, eps: float, block_v: int) -> tuple[int, torch.Tensor]:
    """One row block of logits x [b, V] (already / T) -> (its skipped tiles, per-row skipped |d| / s of valid rows)."""
    n_cols = x.shape[1]
    n_col_blocks = -(-n_cols // block_v)
    logp = x.log_softmax(-1)
    p = logp.exp()
    gl = g_lp.to(x.device, torch.float32)[:, None]
    ge = g_en.to(x.device, torch.float32)[:, None]
    ent = -(p * logp).nan_to_num(0.0).sum(-1, keepdim=True)
    d = -p * (gl + ge * (logp + ent))
    tgt = targets.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    ok = valid.to(x.device)
    d[rows[ok], tgt[ok].long()] += gl[ok, 0]
    d = d / temperature
    scale = (gl.abs() + ge.abs()) / temperature  # [b, 1]
    small = (d.abs() < eps * scale) | (d == 0)
    pad = n_col_blocks * block_v - n_cols  # the kernel's columns past V are 0, hence small
    small = F.pad(small, (0, pad), value=True).view(x.shape[0], n_col_blocks, block_v)
    tile_small = small.all(-1).all(0)  # [n_col_blocks]
    rel = torch.where(scale > 0, d.abs() / scale.clamp_min(1e-30), 0.0)
    rel = F.pad(rel, (0, pad)).view(x.shape[0], n_col_blocks, block_v)
    mass = (rel * tile_small[None, :, None]).sum((1, 2))
    return int(tile_small.sum()), mass[scale[:, 0] > 0].double().cpu()


def filter_tiles(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                 *, grad_logp: torch.Tensor | None = None, grad_entropy: torch.Tensor | None = None,
                 temperature: float = 1.0, grad_filter: float | None = None, block_n: int = 128, block_v: int = 128,
                 ignore_index: int = -100) -> FilterTiles:
    """[N, H] hidden, [V, H] weight, [N] targets (ignore_index: no gradient), optional [N] upstream gradients of
    logp (default: ones) and of the entropy (default: none) -> the tiles the Triton backward's filter skips."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    for name, b in (("block_n", block_n), ("block_v", block_v)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be an int >= 1, got {b!r}")
    eps = resolve_grad_filter(grad_filter, hidden.dtype)
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    g_lp = torch.ones(n_rows) if grad_logp is None else grad_logp.detach().double().cpu()
    g_en = torch.zeros(n_rows) if grad_entropy is None else grad_entropy.detach().double().cpu()
    g_lp = torch.where(valid.cpu(), g_lp.double(), 0.0)
    g_en = torch.where(valid.cpu(), g_en.double(), 0.0)
    n_col_blocks = -(-n_cols // block_v)
    skipped, masses = 0, []
    with torch.no_grad():
        for lo in range(0, n_rows, block_n):
            hi = min(lo + block_n, n_rows)
            x = F.linear(hidden[lo:hi], weight, bias).float() / temperature  # [b, V]
            sk, mass = tile_rule(x, targets[lo:hi], valid[lo:hi], g_lp[lo:hi], g_en[lo:hi], temperature, eps,
                                 block_v)
            skipped += sk
            masses.append(mass)
    mass = torch.cat(masses) if masses else torch.zeros(0)
    return FilterTiles(tiles=-(-n_rows // block_n) * n_col_blocks, skipped=skipped,
                       skipped_mass_max=float(mass.max()) if mass.numel() else 0.0,
                       skipped_mass_mean=float(mass.mean()) if mass.numel() else 0.0)
