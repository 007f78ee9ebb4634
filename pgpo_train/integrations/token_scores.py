"""Visual-dependency scores and PGPO token weights from whatever a trainer has at hand.

Trainers hold different things after their two passes: TRL can give logits (the exact KL, "full"), verl's and
EasyR1's workers give the sampled tokens' log-probs (the paper's appendix estimator, "k3"), and a custom worker may
already have per-token scores. All three end in the project's one scores -> weights path,
`pgpo_train.rl.core_algos.pgpo_weights` (docs/method.md#reshape); `k3_scores` and `weight_metrics` live in core_algos
too and are re-exported here.
"""

from __future__ import annotations

import torch

from pgpo_kernels import token_kl
from pgpo_kernels.k3 import ESTIMATORS
from pgpo_kernels.reshape import check_reshape_args
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_mask
from pgpo_kernels.utils import check_reshape_params
from pgpo_kernels.utils import check_temperature
from pgpo_train.rl.core_algos import k3_scores
from pgpo_train.rl.core_algos import pgpo_weights
from pgpo_train.rl.core_algos import weight_metrics
from pgpo_train.rl.core_algos import weight_options
from pgpo_train.rl.weight_variants import check_variant_args
from pgpo_train.rl.weight_variants import is_default

__all__ = ["ESTIMATORS", "apply_variants", "check_estimator", "k3_scores", "pgpo_weights_from_passes",
           "weight_metrics"]


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} ('full' = exact KL from logits, 'k3' = the paper's "
                         f"sampled-token estimate from log-probs), got {estimator!r}")


def pgpo_weights_from_passes(
    mask: torch.Tensor,
    *,
    logits_vis: torch.Tensor | None = None,
    logits_txt: torch.Tensor | None = None,
    logp_vis: torch.Tensor | None = None,
    logp_txt: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    temperature: float = 1.0,
    k3_log_ratio_max: float = 0.0,
    k3_score_max: float = 0.0,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGPO token weights [B, T] from exactly one source: a logits pair, a log-prob pair, or precomputed scores.

    Args:
        mask: bool [B, T], True = valid response token.
        logits_vis, logits_txt: [B, T, V] logits of the visual and text-only passes ("full": exact token KL at
            `temperature`, fused, no [B, T, V] softmax).
        logp_vis, logp_txt: [B, T] sampled-token log-probs of the two passes ("k3").
        scores: [B, T] precomputed visual-dependency scores S_t >= 0 (e.g. token_kl run inside a worker).
        temperature: of the token KL (logits source only).
        k3_log_ratio_max, k3_score_max: the k3 clamps (log-prob source only; 0 = off, the paper's):
            `core_algos.k3_scores`' log_ratio_max and score_max (pgpo-train's --pgpo.k3-*; the dev-easyr1 preset's
            20 and 10).
        options: `pgpo_train.rl.core_algos.pgpo_weights`' keyword options (tau, beta, eps, renormalize, min_spread,
            backend, and the variants' control, tau_mode, floor, generator), with its defaults (the paper's).

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
    if (k3_log_ratio_max or k3_score_max) and not given["logp"]:
        raise ValueError("k3_log_ratio_max / k3_score_max clamp the k3 estimator: they need the log-prob source "
                         "(logp_vis, logp_txt)")
    opts = weight_options(**options)
    tau, beta, eps, renormalize, backend = (opts[k] for k in ("tau", "beta", "eps", "renormalize", "backend"))
    check_reshape_params(tau, beta, eps)
    if given["logits"]:
        if logits_vis is None or logits_txt is None:
            raise ValueError("the 'full' estimator needs both logits_vis and logits_txt [B, T, V]")
        check_logits_pair(logits_vis, logits_txt)
        check_temperature(temperature)
        # every reshape check before the pass over the logits: a bad mask must not cost a KL launch
        check_reshape_args(torch.empty(logits_vis.shape[:-1], device="meta"), mask, None, tau, beta, eps,
                           renormalize, device=logits_vis.device)
        with torch.no_grad():
            scores = token_kl(logits_vis, logits_txt, temperature=temperature, backend=backend)  # [B, T] float32
    elif given["logp"]:
        if logp_vis is None or logp_txt is None:
            raise ValueError("the 'k3' estimator needs both logp_vis and logp_txt [B, T]")
        scores = k3_scores(logp_vis, logp_txt, mask, log_ratio_max=k3_log_ratio_max, score_max=k3_score_max)
    check_float("scores", scores)
    check_mask(mask, scores.shape)
    weights = pgpo_weights(scores, mask.bool(), **opts)
    return weights, scores.float()


def apply_variants(
    weights: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    control: str = "none",
    tau_mode: str = "absolute",
    floor: float = 0.0,
    generator: torch.Generator | None = None,
    **options,
) -> torch.Tensor:
    """The variant options on weights an adapter computed for the whole batch in chunks: `weights` unchanged at
    the defaults (the paper's formula), else `core_algos.pgpo_weights` again on the whole batch's scores with them
    (so a shuffled control draws one permutation stream per batch). options: tau, beta, eps, renormalize,
    min_spread, backend, as `core_algos.pgpo_weights` takes them."""
    check_variant_args(control, tau_mode, floor)
    if is_default(control, tau_mode, floor):
        return weights
    return pgpo_weights(scores.to(weights.device), mask.to(weights.device), control=control, tau_mode=tau_mode,
                        floor=floor, generator=generator, **options)
