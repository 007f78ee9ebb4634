"""Float64 oracles of every pgpo op: plain, slow, and the tests' ground truth.

Each function follows docs/method.md literally, in float64, with no chunking and no cleverness, so a reader can
check it against the paper line by line. The fast paths (Triton kernels, torch fallback) are tested against these.
"""

from __future__ import annotations

import torch

from pgpo_kernels.defaults import BETA
from pgpo_kernels.defaults import EPS
from pgpo_kernels.defaults import RENORMALIZE
from pgpo_kernels.defaults import TAU
from pgpo_kernels.defaults import TEMPERATURE


def _shift_by_finite_max(x: torch.Tensor) -> torch.Tensor:
    """x - max over the finite entries of each row (rows with no finite entry unshifted); NaN and +inf stay."""
    finite = torch.isfinite(x)
    m = torch.where(finite, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
    return x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def token_kl_ref(logits_vis: torch.Tensor, logits_txt: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """KL(softmax(a / temp) || softmax(b / temp)) per row, in float64 (docs/method.md#visual-dependency).

    Args:
        logits_vis: [..., V] logits a of the visual pass.
        logits_txt: [..., V] logits b of the text-only pass.
        temperature: softmax temperature (> 0).

    Returns:
        [...] float64 KL in nats, >= 0. Entries with a_i = -inf contribute nothing; a finite a_i where b_i = -inf
        gives +inf. A row whose a is all -inf has no distribution: our choice, its KL is 0 (treated like padding).
    """
    # Each row shifted by its finite max first (softmax is shift-invariant): with logits near +-3e38, float64 keeps
    # only ~1e22 of absolute precision, and KL = sum p (a - b) - LSE(a) + LSE(b) would cancel to garbage.
    a = _shift_by_finite_max(logits_vis.double() / temperature)
    b = _shift_by_finite_max(logits_txt.double() / temperature)
    lse_a = torch.logsumexp(a, dim=-1)  # [...]
    lse_b = torch.logsumexp(b, dim=-1)
    p = torch.exp(a - lse_a.unsqueeze(-1))  # [..., V]; nan where the whole row of a is -inf
    support = a != float("-inf")
    diff = torch.where(support, a - b, torch.zeros_like(a))  # a_i = -inf: p_i = 0, never 0 * inf
    weighted = torch.where(support, p * diff, torch.zeros_like(a))
    kl = weighted.sum(-1) - lse_a + lse_b
    # a finite where b = -inf -> +inf (mathematically true); lse_b = -inf gives the same.
    kl = torch.where((support & (b == float("-inf"))).any(-1), torch.full_like(kl, float("inf")), kl)
    kl = torch.where(support.any(-1), kl, torch.zeros_like(kl))
    return kl.clamp_min(0.0)


def token_logprob_ref(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """log softmax(logits / temp)[target] per row, float64. [..., V] x [...] -> [...]."""
    x = _shift_by_finite_max(logits.double() / temperature)
    return torch.gather(x, -1, target_ids.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)


def token_entropy_ref(logits: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Entropy of softmax(logits / temp) per row, float64, in nats. [..., V] -> [...]."""
    x = logits.double() / temperature
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def k3_kl_ref(logp_vis: torch.Tensor, logp_txt: torch.Tensor) -> torch.Tensor:
    """The paper's appendix estimator from the sampled token only: r = pi_txt / pi_vis, S = (r - 1) - log r.

    Args:
        logp_vis: [...] log pi_vis(x_t) of the sampled token.
        logp_txt: [...] log pi_txt(x_t) of the same token.
    Returns:
        [...] float64 estimate, >= 0; +inf where pi_txt(x_t) = 0 < pi_vis(x_t); 0 where pi_vis(x_t) = 0 (a token the
        visual policy cannot sample carries no evidence: our choice, as pgpo_kernels.k3_kl).
    """
    log_r = logp_txt.double() - logp_vis.double()
    est = (torch.expm1(log_r) - log_r).clamp_min(0.0)
    return torch.where(logp_vis.double() == float("-inf"), torch.zeros_like(est), est)


def _reshape_one_ref(s: torch.Tensor, tau: float, beta: float, eps: float, renormalize: bool) -> torch.Tensor:
    """The reshape (docs/method.md#reshape) on the valid scores of one sequence, [n] float64 -> [n] float64."""
    n = s.numel()
    if n == 0:
        return s.clone()
    s = torch.log1p(s)  # log-compression
    m, M = s.min(), s.max()
    ones = torch.ones_like(s)
    if n == 1 or bool(m == M):
        return ones  # our choice (docs/method.md#reshape-edge-cases): no information to reshape, uniform weights
    if torch.isinf(M):
        # +inf counts as the sequence maximum (I = 1); finite scores then sit at I = 0.
        I = torch.where(torch.isinf(s), ones, torch.zeros_like(s))
    else:
        I = (s - m) / (M - m + eps)
    w = torch.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps))
    if not renormalize:
        return w
    total = w.sum()
    if not bool(total > 0):
        return ones  # zero mass: nothing to renormalize, uniform weights (our choice)
    return w * n / total


def reshape_weights_ref(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    tau: float = TAU,
    beta: float = BETA,
    eps: float = EPS,
    renormalize: bool = RENORMALIZE,
) -> torch.Tensor:
    """Per-sequence PGPO reshape of visual-dependency scores into token weights, float64 (docs/method.md#reshape).

    Padded layout: scores [B, T] with bool mask [B, T] (None = all valid) -> [B, T], 0 at padding.
    Packed layout: scores [total] with cu_seqlens [B + 1] -> [total].
    """
    s = scores.double()
    out = torch.zeros_like(s)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            out[lo:hi] = _reshape_one_ref(s[lo:hi], tau, beta, eps, renormalize)
        return out
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.bool()
    for i in range(s.shape[0]):
        out[i, valid[i]] = _reshape_one_ref(s[i, valid[i]], tau, beta, eps, renormalize)
    return out


def pgpo_token_weights_ref(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float = TEMPERATURE,
    tau: float = TAU,
    beta: float = BETA,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token KL of [B, T, V] logits then the padded reshape: -> (weights [B, T], kl [B, T]), float64."""
    kl = token_kl_ref(logits_vis, logits_txt, temperature)
    return reshape_weights_ref(kl, mask, tau=tau, beta=beta, eps=eps), kl


def linear_logits_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The lm_head in float64: [..., H] x [V, H] (+ [V]) -> [..., V] logits, never rounded to the input dtype."""
    out = hidden.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def token_kl_grad_ref(
    logits_vis: torch.Tensor, logits_txt: torch.Tensor, grad_out: torch.Tensor, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of sum(grad_out * KL(softmax(a / T) || softmax(b / T))) w.r.t. a and b, float64, written out:

        dKL/da_j = p_j ((log p_j - log q_j) - KL) / T,    dKL/db_j = (q_j - p_j) / T

    Entries with a_j = -inf get 0 in dL/da (p_j = 0). [..., V] x2, [...] -> [..., V] x2.
    """
    a = logits_vis.double() / temperature
    b = logits_txt.double() / temperature
    logp = torch.log_softmax(a, -1)
    logq = torch.log_softmax(b, -1)
    p = logp.exp()
    support = a != float("-inf")
    diff = torch.where(support, logp - logq, torch.zeros_like(logp))
    kl = (p * diff).sum(-1, keepdim=True)
    g = grad_out.double().unsqueeze(-1) / temperature
    grad_a = torch.where(support, g * p * (diff - kl), torch.zeros_like(p))
    grad_b = g * (logq.exp() - p)
    return grad_a, grad_b


def fused_linear_logp_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(z / T)[target], entropy of softmax(z / T)) per row, z = hidden W^T + bias, all in float64.

    Differentiable (plain autograd through the float64 formulas): the tests take the three gradients from it. Rows with
    target == ignore_index get 0 for both. [..., H], [V, H], [...] -> [...] x2 float64.
    """
    x = linear_logits_ref(hidden, weight, bias) / temperature
    logp = torch.log_softmax(x, -1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.where(valid, picked, zero), torch.where(valid, ent, zero)
