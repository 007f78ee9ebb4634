"""The k3 estimator of the visual dependency, from the sampled token's log-probs only.

PGPO's appendix (arXiv 2604.01840) estimates S_t = KL(pi_vis || pi_txt) from the sampled token x_t ~ pi_vis:

    r = pi_txt(x_t) / pi_vis(x_t),   S_t ~= (r - 1) - log r          (Schulman's "k3": unbiased, >= 0)

It needs two log-probs per token instead of a sum over the vocabulary, but it is a single-sample estimate: its
spread around the exact KL is large (see docs/design/fused_ops.md for measured numbers). The exact full-vocab KL costs
the same pass over the logits when log pi(x_t) is computed anyway (token_stats), so "full" is our default.

Elementwise on [N] values: plain torch, no kernel (a launch would cost more than the arithmetic).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("full", "k3")


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def k3_kl(logp_vis: torch.Tensor, logp_txt: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_vis || pi_txt) per token from the sampled token's log-probs.

    Args:
        logp_vis: [...] log pi_vis(x_t) (<= 0, any float dtype).
        logp_txt: [...] log pi_txt(x_t), same shape.

    Returns:
        [...] float32 estimate >= 0; +inf where pi_txt(x_t) = 0 < pi_vis(x_t) (log r = -inf) or where r overflows;
        0 where pi_vis(x_t) = 0 (a token the visual policy cannot sample carries no evidence; our choice).
    """
    if not isinstance(logp_vis, torch.Tensor) or not isinstance(logp_txt, torch.Tensor):
        raise TypeError("logp_vis and logp_txt must be torch.Tensors of log-probs [...]")
    if not logp_vis.dtype.is_floating_point or not logp_txt.dtype.is_floating_point:
        raise TypeError(f"logp_vis and logp_txt must be floating tensors, got {logp_vis.dtype} and {logp_txt.dtype}")
    if logp_vis.shape != logp_txt.shape:
        raise ValueError(f"logp_txt must have the shape of logp_vis {tuple(logp_vis.shape)}, got "
                         f"{tuple(logp_txt.shape)}")
    # float64 so expm1(x) - x keeps its digits for small log r (the estimate is ~ (log r)^2 / 2 there)
    log_r = logp_txt.double() - logp_vis.double()
    est = torch.expm1(log_r) - log_r  # log r = -inf -> +inf
    est = torch.where(logp_vis.double() == float("-inf"), torch.zeros_like(est), est)
    return est.clamp_min(0.0).float()
