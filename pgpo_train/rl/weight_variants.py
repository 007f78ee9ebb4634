"""PGPO weight variants, controls and diagnostics (docs/method.md#variants), as torch ops on padded [B, T] tensors,
no host sync.

The paper's formula (docs/method.md#reshape) stays the default and keeps running through the fused `reshape_weights`
kernel; the functions here are used only when an option leaves its default (core_algos.pgpo_weights):

- tau_mode "quantile": the gate threshold of each sequence is the tau-quantile of its I over valid tokens (the
  authors' development code, second-hand) instead of the absolute tau;
- floor X: w_t = max(w_t, X) after the gate, before the renormalization (the same code's 0.1);
- control "inverted": I_t -> 1 - I_t before the gate (the least image-dependent tokens get the boost);
- control "shuffled": each sequence's final weights permuted at random among its valid tokens (same weights, no
  placement signal); the permutation comes from a generator seeded by (run seed, step), so a resumed run draws the
  same permutations.
"""

from __future__ import annotations

import math

import torch

CONTROLS = ("none", "shuffled", "inverted")
TAU_MODES = ("absolute", "quantile")


def is_default(control: str = "none", tau_mode: str = "absolute", floor: float = 0.0) -> bool:
    """True when every variant option is at the paper's default (then the fused kernel's result is used as is)."""
    return control == "none" and tau_mode == "absolute" and floor == 0.0


def check_variant_args(control: str, tau_mode: str, floor: float) -> None:
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {tau_mode!r}")
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite number >= 0 (minimum weight before renormalization), got {floor!r}")


@torch.no_grad()
def normalized_dependency(scores: torch.Tensor, valid: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """I_t of docs/method.md#reshape exactly as the torch reshape computes it, and [B] bool 'degenerate' rows.

    Degenerate (uniform weights 1, our choice, docs/method.md#reshape-edge-cases): no valid token, one valid token,
    or all-equal scores.
    A NaN / < -1 score leaves NaN in its row (log1p), which the weights then carry.

    Returns:
        (I [B, T] float32, 0 on padding; degenerate [B] bool).
    """
    s = torch.log1p(scores.float())  # [B, T]
    inf = torch.tensor(math.inf, device=s.device)
    m = torch.where(valid, s, inf).amin(-1, keepdim=True)  # [B, 1]
    M = torch.where(valid, s, -inf).amax(-1, keepdim=True)
    I = torch.where(M == inf, (s == inf).float(), torch.where(m == -inf, (s != -inf).float(), (s - m) / (M - m + eps)))
    bad = (valid & (torch.isnan(scores.float()) | (scores.float() < -1.0))).any(-1, keepdim=True)
    I = torch.where(bad, torch.full_like(I, math.nan), I)
    degenerate = (valid.sum(-1) <= 1) | (M == m).squeeze(-1)
    return torch.where(valid, I, torch.zeros_like(I)), degenerate


@torch.no_grad()
def row_quantile(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """[B, 1] q-quantile (linear interpolation, torch.quantile's default) of each row's valid entries; 0 for an
    empty row."""
    xs = torch.where(valid, x, torch.full_like(x, math.inf)).sort(-1).values  # valid first, ascending
    n = valid.sum(-1, keepdim=True)  # [B, 1]
    pos = (n - 1).clamp_min(0).to(x.dtype) * q
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0))
    frac = pos - lo.to(x.dtype)
    a, b = xs.gather(-1, lo), xs.gather(-1, hi)
    out = a + (b - a) * frac
    out = torch.where(frac == 0, a, out)  # (inf - inf) * 0 guard where a valid row ends at hi
    return torch.where(n > 0, out, torch.zeros_like(out))


@torch.no_grad()
def variant_weights(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    renormalize: bool = True,
    tau_mode: str = "absolute",
    floor: float = 0.0,
    inverted: bool = False,
) -> torch.Tensor:
    """The reshape with the variants (docs/method.md#variants): [B, T] scores S_t -> [B, T] float32 weights, 0 at pad.

    With every option at its default this is the paper's formula (equal to `reshape_weights` up to float rounding;
    tested). Per sequence, valid tokens only:
        I_t  = min-max normalized log1p(S_t);       inverted: I_t <- 1 - I_t
        t    = tau (absolute) or the tau-quantile of the sequence's I (quantile)
        w_t  = I_t / (t + eps) if I_t < t, else 1 + beta (I_t - t) / (1 - t + eps)
        w_t  = max(w_t, floor)
        w~_t = w_t T_valid / sum(w)   (renormalize)
    Degenerate rows (one token, all-equal scores, zero mass) get uniform weights 1, as in the reshape.
    """
    valid = mask.bool()
    I, degenerate = normalized_dependency(scores, valid, eps)
    if inverted:
        I = torch.where(valid, 1.0 - I, I)
    t = row_quantile(I, valid, tau) if tau_mode == "quantile" else torch.full_like(I[:, :1], tau)  # [B, 1]
    w = torch.where(I < t, I / (t + eps), 1.0 + beta * (I - t) / (1.0 - t + eps))
    if floor > 0:
        w = w.clamp_min(floor)
    w = torch.where(valid, w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)  # [B, 1]
    degenerate = degenerate[:, None] | ~(total > 0) & ~torch.isnan(total)
    if renormalize:
        w = w * valid.sum(-1, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    w = torch.where(degenerate, torch.ones_like(w), w)
    w = torch.where(torch.isnan(I).any(-1, keepdim=True), torch.full_like(w, math.nan), w)  # a bad score: NaN row
    return torch.where(valid, w, torch.zeros_like(w))


def control_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The shuffled control's generator for one RL step: its state is a function of (seed, step) only, so a run
    resumed at a step draws the same permutations as the uninterrupted run."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    return g


@torch.no_grad()
def shuffle_within_rows(weights: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row's valid weights permuted uniformly at random among its valid positions; padding stays 0.

    Keeps every row's multiset of weights (hence its sum), removes where they sit.
    """
    valid = mask.bool()
    B, T = weights.shape
    keys = torch.rand(B, T, generator=generator, device=weights.device)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))  # padding sorts last
    src = keys.argsort(-1)  # [B, T]: a random order of the valid positions, then padding
    # the valid positions in order, then padding (stable sort on "is padding")
    dst = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    out = torch.zeros_like(weights)
    out.scatter_(-1, dst, weights.gather(-1, src))
    return torch.where(valid, out, torch.zeros_like(out))


# %% diagnostics


@torch.no_grad()
def weight_diagnostics(weights: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How concentrated the PGPO weights are (docs/method.md#diagnostics), as 0-d float32 tensors (no host sync).

    Per sequence, then averaged over the sequences with >= 1 valid token:
        pgpo/weight_gini: Gini coefficient of the valid weights (0 = uniform, -> 1 = all mass on one token);
        pgpo/eff_token_ratio: (sum w)^2 / (T sum w^2), T = valid tokens (1 = uniform, 1/T = one token).
    Over the batch's valid tokens (the advantage mass the update sees):
        pgpo/top1_mass, pgpo/top10_mass: share of sum |A_t| carried by the ceil(1%) / ceil(10%) tokens of largest
        |A_t| (A_t = A w~_t).
    """
    valid = mask.bool()
    w = torch.where(valid, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    n = valid.sum(-1).float()  # [B]
    has = n > 0
    rows = has.sum().clamp_min(1)
    # Gini of sorted x_(1..n): 2 sum_i i x_(i) / (n sum x) - (n + 1) / n
    xs = torch.where(valid, w, torch.full_like(w, math.inf)).sort(-1).values
    xs = torch.where(torch.isinf(xs) & (xs > 0), torch.zeros_like(xs), xs)
    i = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=torch.float32)
    sw = w.sum(-1)
    gini = 2 * (xs * i).sum(-1) / (n * sw).clamp_min(1e-30) - (n + 1) / n.clamp_min(1)
    gini = torch.where(has & (sw > 0), gini, torch.zeros_like(gini))
    eff = sw**2 / (n * (w**2).sum(-1)).clamp_min(1e-30)
    eff = torch.where(has & (sw > 0), eff, torch.ones_like(eff))
    a = torch.where(valid, token_adv.float().abs(), torch.zeros_like(w)).reshape(-1)
    total = a.sum()
    cum = a.sort(descending=True).values.cumsum(0)
    n_all = valid.sum()
    out = {"pgpo/weight_gini": (gini * has).sum() / rows, "pgpo/eff_token_ratio": (eff * has).sum() / rows}
    for name, frac in (("pgpo/top1_mass", 0.01), ("pgpo/top10_mass", 0.10)):
        k = torch.ceil(n_all.float() * frac).long().clamp(1, max(a.numel(), 1))
        top = cum[k - 1] if a.numel() else total
        out[name] = torch.where(total > 0, top / total.clamp_min(1e-30), torch.zeros_like(total))
    return out
