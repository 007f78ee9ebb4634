"""Visual-dependency scores and PGPO token weights from whatever a trainer has at hand.

Trainers hold different things after their two passes: TRL can give logits (the exact KL, "full"), verl's and
EasyR1's workers give the sampled tokens' log-probs (the paper's appendix estimator, "k3"), and a custom worker may
already have per-token scores. All three end in the same `pgpo_kernels.reshape_weights` (SPEC section 2).
"""

from __future__ import annotations

import torch

from pgpo_kernels import k3_kl
from pgpo_kernels import pgpo_token_weights
from pgpo_kernels import reshape_weights
from pgpo_kernels.k3 import ESTIMATORS
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_mask
from pgpo_kernels.utils import check_reshape_params


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} ('full' = exact KL from logits, 'k3' = the paper's "
                         f"sampled-token estimate from log-probs), got {estimator!r}")


def k3_scores(logp_vis: torch.Tensor, logp_txt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's appendix estimator of KL(vis || txt) from the sampled token only (SPEC section 1).

    r = pi_txt(x_t) / pi_vis(x_t),  S_t = (r - 1) - log r  (>= 0), via `pgpo_kernels.k3_kl` (float64, no clamp:
    +inf where pi_txt(x_t) = 0, which the reshape treats as the sequence maximum), plus checks and padding zeroed.

    Args:
        logp_vis: [B, T] log pi_vis(x_t) of the sampled tokens (visual pass).
        logp_txt: [B, T] log pi_txt(x_t) of the same tokens (text-only pass).
        mask: bool [B, T], True = valid response token; padding gets score 0 (None = all valid).

    Returns:
        [B, T] float32 scores, 0 at padding.
    """
    check_float("logp_vis", logp_vis)
    check_float("logp_txt", logp_txt)
    if logp_vis.shape != logp_txt.shape:
        raise ValueError(f"logp_txt must have the shape of logp_vis [B, T] = {tuple(logp_vis.shape)}, "
                         f"got {tuple(logp_txt.shape)}")
    check_mask(mask, logp_vis.shape)
    scores = k3_kl(logp_vis, logp_txt)  # [B, T] float32
    if mask is not None:
        scores = torch.where(mask.bool(), scores, torch.zeros_like(scores))  # padding may hold garbage log-probs
    return scores


def pgpo_weights_from_passes(
    mask: torch.Tensor,
    *,
    logits_vis: torch.Tensor | None = None,
    logits_txt: torch.Tensor | None = None,
    logp_vis: torch.Tensor | None = None,
    logp_txt: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    temperature: float = 1.0,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    renormalize: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGPO token weights [B, T] from exactly one source: a logits pair, a log-prob pair, or precomputed scores.

    Args:
        mask: bool [B, T], True = valid response token.
        logits_vis, logits_txt: [B, T, V] logits of the visual and text-only passes ("full": exact token KL at
            `temperature`, fused, no [B, T, V] softmax).
        logp_vis, logp_txt: [B, T] sampled-token log-probs of the two passes ("k3").
        scores: [B, T] precomputed visual-dependency scores S_t >= 0 (e.g. token_kl run inside a worker).
        temperature, tau, beta, eps, renormalize, backend: as in `pgpo_kernels.pgpo_token_weights`.

    Returns:
        (weights, scores): float32 [B, T] each; weights are 0 at padding and sum to the valid-token count per row.
    """
    given = {
        "logits": logits_vis is not None or logits_txt is not None,
        "logp": logp_vis is not None or logp_txt is not None,
        "scores": scores is not None,
    }
    if sum(given.values()) != 1:
        raise ValueError("pass exactly one source of visual-dependency scores: (logits_vis, logits_txt) [B, T, V], "
                         f"(logp_vis, logp_txt) [B, T], or scores [B, T]; got {[k for k, v in given.items() if v]}")
    check_reshape_params(tau, beta, eps)
    if given["logits"]:
        if logits_vis is None or logits_txt is None:
            raise ValueError("the 'full' estimator needs both logits_vis and logits_txt [B, T, V]")
        check_mask(mask, logits_vis.shape[:-1])
        return pgpo_token_weights(logits_vis, logits_txt, mask.bool(), temperature=temperature, tau=tau, beta=beta,
                                  eps=eps, renormalize=renormalize, backend=backend)
    if given["logp"]:
        if logp_vis is None or logp_txt is None:
            raise ValueError("the 'k3' estimator needs both logp_vis and logp_txt [B, T]")
        scores = k3_scores(logp_vis, logp_txt, mask)
    check_float("scores", scores)
    check_mask(mask, scores.shape)
    weights = reshape_weights(scores, mask.bool(), tau=tau, beta=beta, eps=eps, renormalize=renormalize,
                              backend=backend)
    return weights, scores.float()


def weight_metrics(weights: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked summaries for logging, as 0-d tensors (the caller decides when to sync them to floats)."""
    valid = mask.bool()
    n_valid = valid.sum().clamp(min=1)
    finite = valid & torch.isfinite(scores)
    inf, zero = weights.new_tensor(float("inf")), weights.new_zeros(())
    any_valid = valid.any()
    return {
        "pgpo/kl_mean": torch.where(finite, scores, 0.0).sum() / finite.sum().clamp(min=1),
        "pgpo/weight_max": torch.where(any_valid, torch.where(valid, weights, -inf).max(), zero),
        "pgpo/weight_min": torch.where(any_valid, torch.where(valid, weights, inf).min(), zero),
        "pgpo/frac_amplified": ((weights > 1.0) & valid).sum() / n_valid,
    }


def apply_variants(
    weights: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    control: str = "none",
    tau_mode: str = "absolute",
    floor: float = 0.0,
    generator: torch.Generator | None = None,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    renormalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """The issue-17 options on an adapter's weights: `weights` unchanged at the defaults (the paper's formula),
    else `core_algos.pgpo_variant_weights` from the same scores (the loop's code: one definition of every variant)."""
    from pgpo_train import core_algos
    from pgpo_train import weight_variants

    weight_variants.check_variant_args(control, tau_mode, floor)
    if weight_variants.is_default(control, tau_mode, floor):
        return weights
    return core_algos.pgpo_variant_weights(
        scores.to(weights.device), mask.to(weights.device), tau=tau, beta=beta, eps=eps, renormalize=renormalize,
        backend=backend, control=control, tau_mode=tau_mode, floor=floor, generator=generator)


def diagnostic_metrics(
    weights: torch.Tensor, scores: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor, tau: float, eps: float
) -> dict[str, torch.Tensor]:
    """The weight diagnostics every PGPO metrics row carries (loop, TRL, verl: same keys), as 0-d tensors:
    pgpo/frac_above_tau (valid tokens with I >= tau, I = the normalized score before any inversion / quantile) and
    core_algos.weight_diagnostics (Gini, effective token ratio, top-1% / top-10% advantage mass)."""
    from pgpo_train import core_algos

    valid = mask.bool()
    I = core_algos.normalized_scores(scores, valid, eps)
    out = {"pgpo/frac_above_tau": ((I >= tau) & valid).sum() / valid.sum().clamp(min=1)}
    out.update(core_algos.weight_diagnostics(weights, token_adv, valid))
    return out
