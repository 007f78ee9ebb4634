"""pgpo_kernels: fused Triton kernels for Perception-Grounded Policy Optimization (PGPO).

Public API (names are fixed; trainers import them):

    token_kl(logits_vis, logits_txt, *, temperature=1.0, backend="auto")            [..., V] x2 -> [...] float32
    reshape_weights(scores, mask=None, *, cu_seqlens=None, tau=0.4, beta=2.0, ...)  [B, T] or [total] -> float32
    pgpo_token_weights(logits_vis, logits_txt, mask, ...)                            -> (weights, kl)

Needs only torch and triton. `pgpo_kernels.reference` holds float64 oracles of every op.
"""

from pgpo_kernels.reshape import reshape_weights
from pgpo_kernels.token_kl import token_kl
from pgpo_kernels.weights import pgpo_token_weights

__all__ = ["token_kl", "reshape_weights", "pgpo_token_weights"]
__version__ = "0.1.0"
