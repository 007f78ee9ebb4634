"""pgpo_kernels: fused Triton kernels for Perception-Grounded Policy Optimization (PGPO).

Public API (names are fixed; trainers import them):

    token_kl(logits_vis, logits_txt, *, temperature=1.0, backend="auto")            [..., V] x2 -> [...] float32
    reshape_weights(scores, mask=None, *, cu_seqlens=None, tau=0.4, beta=2.0, ...)  [B, T] or [total] -> float32
    pgpo_token_weights(logits_vis, logits_txt, mask, ..., estimator="full"|"k3", target_ids=None) -> (weights, kl)
    token_stats(logits_vis, logits_txt, target_ids, *, temperature=1.0, estimator="full", backend="auto")
                                                                -> TokenStats(logp, entropy, kl), [...] float32 each
    fused_linear_token_kl(hidden_vis, hidden_txt, lm_head_weight, bias=None, *, temperature=1.0, chunk_size=None,
                          backend="auto")                      [..., H] x2, [V, H] -> [...] float32, no [N, V] logits
    fused_linear_token_stats(hidden_vis, hidden_txt, lm_head_weight, target_ids, bias=None, *, ...) -> TokenStats
    k3_kl(logp_vis, logp_txt)                                  the paper's sampled-token estimator, [...] float32

Needs only torch and triton. `pgpo_kernels.reference` holds float64 oracles of every op, `pgpo_kernels.defaults`
the method's defaults (tau, beta, eps, ...), `pgpo_kernels.torch_fallback` the torch version of each op.
"""

from pgpo_kernels.fused_linear import fused_linear_token_kl
from pgpo_kernels.fused_linear import fused_linear_token_stats
from pgpo_kernels.fused_logp import fused_linear_logp
from pgpo_kernels.k3 import k3_kl
from pgpo_kernels.reshape import reshape_weights
from pgpo_kernels.token_kl import TokenKLFunction
from pgpo_kernels.token_kl import token_kl
from pgpo_kernels.token_stats import TokenStats
from pgpo_kernels.token_stats import token_stats
from pgpo_kernels.weights import pgpo_token_weights

__all__ = ["pgpo_token_weights", "reshape_weights", "token_kl"]
__all__ += ["TokenStats", "fused_linear_token_kl", "fused_linear_token_stats", "k3_kl", "token_stats"]
__all__ += ["TokenKLFunction", "fused_linear_logp"]
__version__ = "0.1.0"
