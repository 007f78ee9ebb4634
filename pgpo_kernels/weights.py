"""pgpo_token_weights: token KL then the PGPO reshape, with no [N, V] intermediate.

No host sync in the padded layout with the full estimator; the packed layout reads cu_seqlens on the host once and
k3 checks the target ids' range on the host once (both before the pass over the logits).
"""

from __future__ import annotations

import torch

from pgpo_kernels.defaults import BETA
from pgpo_kernels.defaults import EPS
from pgpo_kernels.defaults import ESTIMATOR
from pgpo_kernels.defaults import RENORMALIZE
from pgpo_kernels.defaults import TAU
from pgpo_kernels.defaults import TEMPERATURE
from pgpo_kernels.k3 import check_estimator
from pgpo_kernels.reshape import check_reshape_args
from pgpo_kernels.reshape import reshape_weights_checked
from pgpo_kernels.token_kl import token_kl
from pgpo_kernels.token_stats import token_stats
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_temperature


def pgpo_token_weights(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    tau: float = TAU,
    beta: float = BETA,
    eps: float = EPS,
    renormalize: bool = RENORMALIZE,
    estimator: str = ESTIMATOR,
    target_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGPO token weights from the two passes' logits (arXiv 2604.01840: S_t = KL(vis || txt), then reshape).

    Args:
        logits_vis: padded [B, T, V] or packed [total, V] logits of the visual pass.
        logits_txt: the text-only pass's logits, same shape.
        mask: padded layout, bool [B, T] of valid response tokens (None = all valid).
        cu_seqlens: packed layout, int32 [B + 1] offsets (validated on the host: one small sync).
        temperature, tau, beta, eps, renormalize, backend: as in token_kl and reshape_weights.
        estimator: "full" (exact KL over the vocabulary, the default) or "k3" (the paper's appendix estimate from
            the sampled token, r = pi_txt(x) / pi_vis(x), S = r - 1 - log r; needs target_ids).
        target_ids: [B, T] (or [total]) integer ids of the sampled response tokens; required by estimator="k3".

    Returns:
        (weights, kl): float32, both [B, T] (or [total]); weights are 0 at padding, kl is computed for every row.
        Multiply the sequence advantage [B, 1] by weights to get token advantages. No gradient flows through
        either. A NaN or +inf logit makes its row's kl NaN and so its sequence's weights NaN (other sequences are
        unaffected); huge finite logits give the true KL.
    """
    check_logits_pair(logits_vis, logits_txt)
    check_temperature(temperature)
    check_estimator(estimator)
    score_shape = logits_vis.shape[:-1]
    if estimator == "k3" and target_ids is None:
        raise ValueError("estimator='k3' needs target_ids (the sampled token ids, shape [B, T] or [total])")
    if estimator == "full" and target_ids is not None:
        raise ValueError("target_ids is only used by estimator='k3'; pass estimator='k3' or drop target_ids")
    if cu_seqlens is None and len(score_shape) != 2:
        raise ValueError(f"logits_vis must have shape [B, T, V] (or [total, V] with cu_seqlens), got "
                         f"{tuple(logits_vis.shape)}")
    # every reshape check runs here, before the KL launch: a bad mask must not cost a pass over [N, V]
    check_reshape_args(torch.empty(score_shape, device="meta"), mask, cu_seqlens, tau, beta, eps, renormalize,
                       device=logits_vis.device)
    with torch.no_grad():  # weights, never a loss (docs/method.md#visual-dependency): no gradient on any backend
        if estimator == "k3":  # token_stats checks target_ids (shape, dtype, range) before reading the logits
            kl = token_stats(logits_vis, logits_txt, target_ids, temperature=temperature, estimator="k3",
                             backend=backend).kl  # [B, T] float32
        else:
            kl = token_kl(logits_vis, logits_txt, temperature=temperature, backend=backend)  # [B, T] float32
        weights = reshape_weights_checked(kl, mask, cu_seqlens, tau, beta, eps, renormalize, backend)
    return weights, kl
