"""RL math as registered pure functions (verl's core_algos style): advantages, token weights, policy losses, agg_loss.

Shapes: B = sequences (prompts x G), T = response tokens, G = group size. `response_mask` is [B, T], 1 on valid
response tokens. Every loss is reduced by `agg_loss`. Functions return `(tensor, metrics)` where relevant, with
namespaced metric keys.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from enum import Enum

import torch

from pgpo_kernels import defaults
from pgpo_kernels import reshape_weights
from pgpo_kernels.k3 import k3_kl
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_mask
from pgpo_train.rl import weight_variants

# %% registries

ADV_ESTIMATOR_REGISTRY: dict[str, Callable] = {}
POLICY_LOSS_REGISTRY: dict[str, Callable] = {}
TOKEN_WEIGHT_REGISTRY: dict[str, Callable] = {}


def _register(registry: dict, kind: str, name: str):
    def decorator(fn):
        if name in registry and registry[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered to {registry[name].__name__}")
        registry[name] = fn
        return fn

    return decorator


def _get(registry: dict, kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(registry)}")
    return registry[name]


def register_adv_est(name: str):
    return _register(ADV_ESTIMATOR_REGISTRY, "advantage estimator", name)


def get_adv_estimator_fn(name: str) -> Callable:
    return _get(ADV_ESTIMATOR_REGISTRY, "advantage estimator", name)


def register_policy_loss(name: str):
    return _register(POLICY_LOSS_REGISTRY, "policy loss", name)


def get_policy_loss_fn(name: str) -> Callable:
    return _get(POLICY_LOSS_REGISTRY, "policy loss", name)


def register_token_weight(name: str):
    return _register(TOKEN_WEIGHT_REGISTRY, "token weighting", name)


def get_token_weight_fn(name: str) -> Callable:
    return _get(TOKEN_WEIGHT_REGISTRY, "token weighting", name)


class AdvantageEstimator(str, Enum):
    GRPO = "grpo"


# %% advantages


@register_adv_est(AdvantageEstimator.GRPO.value)
@torch.no_grad()
def compute_grpo_outcome_advantage(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, norm_by_std: bool = True
) -> tuple[torch.Tensor, dict]:
    """Group-normalized sequence advantages (GRPO, Shao et al. 2024, eq. 3): A_i = (r_i - mean_g) / (std_g + eps).

    Args:
        rewards: [B] scalar reward per response, B = n_prompts * G with each prompt's G responses adjacent.
        group_size: G.
        eps: added to std so all-equal groups give A = 0, not NaN.
        norm_by_std: False gives Dr. GRPO's mean-centering only.

    Returns:
        ([B] advantages, metrics).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [n_prompts * G] with G = {group_size}, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # [P, G]
    adv = r - r.mean(-1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(-1, unbiased=True, keepdim=True) + eps) if group_size > 1 else adv
    return adv.view(-1), {"adv/mean_abs": adv.abs().mean()}


@torch.no_grad()
def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling filter (Yu et al. 2025, sec. 3.2): keep groups whose rewards are not all equal.

    Args:
        rewards: [B] with each prompt's G responses adjacent.

    Returns:
        [B] bool, True on responses of kept groups.
    """
    r = rewards.view(-1, group_size)  # [P, G]
    keep = (r.max(-1).values - r.min(-1).values) > 1e-8  # [P]
    return keep.repeat_interleave(group_size)


# %% token weights (PGPO)


@register_token_weight("none")
@torch.no_grad()
def uniform_token_weights(scores: torch.Tensor | None, response_mask: torch.Tensor, **_) -> torch.Tensor:
    """[B, T] weights 1 on valid tokens (plain GRPO/DAPO)."""
    return response_mask.float()


@register_token_weight("pgpo")
@torch.no_grad()
def pgpo_weights(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tau: float = defaults.TAU,
    beta: float = defaults.BETA,
    eps: float = defaults.EPS,
    renormalize: bool = defaults.RENORMALIZE,
    min_spread: float = defaults.MIN_SPREAD,
    backend: str = "auto",
    control: str = defaults.CONTROL,
    tau_mode: str = defaults.TAU_MODE,
    floor: float = defaults.FLOOR,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGPO advantage weights (arXiv 2604.01840; docs/method.md#reshape) from token visual-dependency scores: the one
    scores -> weights path of the project (the loop, `integrations.token_scores`, TRL and verl all call it).

    The paper's gate (absolute tau, no floor, not inverted) runs the fused `pgpo_kernels.reshape_weights`; the
    variants (docs/method.md#variants) run rl.weight_variants' torch math; "shuffled" then permutes each sequence's
    weights among its valid tokens with `generator` (weight_variants.control_generator); min_spread acts last.

    Args:
        scores: [B, T] S_t >= 0 (token KL, full or k3).
        response_mask: [B, T] 1 on valid tokens.
        tau, beta, eps, renormalize, backend: as in `pgpo_kernels.reshape_weights`.
        min_spread: our choice, 0 (off) by default: a sequence whose log1p(score) spread is below this gets uniform
            weights (`flat_sequences`).
        control, tau_mode, floor, generator: the variants of pgpo_train.rl.weight_variants (defaults: the paper's).

    Returns:
        [B, T] float32 weights, 0 on padding (summing to each sequence's valid-token count with renormalize).
    """
    weight_variants.check_variant_args(control, tau_mode, floor)
    if tau_mode == "absolute" and floor == 0.0 and control != "inverted":
        w = reshape_weights(
            scores, response_mask.bool(), tau=tau, beta=beta, eps=eps, renormalize=renormalize, backend=backend
        )
    else:
        w = weight_variants.variant_weights(
            scores,
            response_mask,
            tau=tau,
            beta=beta,
            eps=eps,
            renormalize=renormalize,
            tau_mode=tau_mode,
            floor=floor,
            inverted=control == "inverted",
        )
    if control == "shuffled":
        if generator is None:
            raise ValueError("control 'shuffled' needs a generator (weight_variants.control_generator(seed, step))")
        w = weight_variants.shuffle_within_rows(w, response_mask, generator)
    if min_spread > 0:
        flat = flat_sequences(scores, response_mask, min_spread)  # [B]
        w = torch.where(flat[:, None], response_mask.to(w.dtype), w)
    return w


_WEIGHT_DEFAULTS = {
    k: p.default for k, p in inspect.signature(pgpo_weights).parameters.items() if p.kind is p.KEYWORD_ONLY
}


def weight_options(**options) -> dict:
    """pgpo_weights' keyword options with its defaults filled in; an unknown name is a TypeError naming it. The
    adapters take `**options` and pass them here, so each option and default is written once, in pgpo_weights."""
    unknown = sorted(set(options) - set(_WEIGHT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown PGPO weight option(s) {unknown}; valid: {sorted(_WEIGHT_DEFAULTS)}")
    return {**_WEIGHT_DEFAULTS, **options}


def flat_sequences(scores: torch.Tensor, mask: torch.Tensor, min_spread: float) -> torch.Tensor:
    """[B] bool: max - min of log1p(scores) over a row's valid tokens is below min_spread (or the row is empty).

    Min-max normalization stretches any spread to [0, 1]: on a sequence where the image barely changed any
    prediction, the PGPO weights would only be stretched noise. Torch ops only, no host sync.
    """
    m = mask.bool()
    ls = torch.log1p(scores.float())  # [B, T]; +inf stays +inf (a huge spread: never flat)
    hi = ls.masked_fill(~m, float("-inf")).amax(-1)
    lo = ls.masked_fill(~m, float("inf")).amin(-1)
    return (hi - lo) < min_spread  # a NaN spread (NaN score) is not flat: the reshape's own rules apply


@torch.no_grad()
def normalized_scores(scores: torch.Tensor, response_mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """I_t of docs/method.md#reshape, for metrics and pictures: min-max normalized log(1 + S_t) per sequence.

    As in the reshape, min and max run over each sequence's valid tokens and +inf scores are the sequence maximum
    (I = 1, its finite scores then sit at I = 0).

    Args:
        scores: [B, T] S_t >= 0.
        response_mask: [B, T] 1 on valid tokens.

    Returns:
        [B, T] float32 in [0, 1], 0 on padding.
    """
    # the reshape variants' I_t (one formula): scores clamped at 0 first, so no -inf and no < -1 case is left
    return weight_variants.normalized_dependency(scores.float().clamp_min(0), response_mask.bool(), eps)[0]


def k3_scores(logp_vis: torch.Tensor, logp_txt: torch.Tensor, mask: torch.Tensor | None = None, *,
              log_ratio_max: float = defaults.K3_LOG_RATIO_MAX, score_max: float = defaults.K3_SCORE_MAX) -> torch.Tensor:
    """The paper's appendix estimator of KL(pi_vis || pi_txt) from the sampled token only (Schulman's k3;
    docs/method.md#estimators).

    r = pi_txt(x_t) / pi_vis(x_t),  S_t = (r - 1) - log r  (>= 0). The formula itself is `pgpo_kernels.k3_kl`
    (float64, no clamp: +inf where pi_txt(x_t) = 0, which the reshape treats as the sequence maximum); this adds
    the argument checks and zeroes padding.

    Args:
        logp_vis: [B, T] log pi_vis(x_t) of the sampled tokens (visual pass).
        logp_txt: [B, T] log pi_txt(x_t) of the same tokens (text-only pass).
        mask: bool [B, T], True = valid response token; padding gets score 0 (None = all valid).
        log_ratio_max: > 0: log r clamped to [-log_ratio_max, log_ratio_max] before the formula (0 = off, the
            paper's); score_max: > 0: S_t clamped to [0, score_max] after it (0 = off). The authors' development
            code, as an independent EasyR1 reproduction reports it (second-hand), used 20 and 10: verl's
            "low_var_kl" clamps with the text-only pass as the reference.

    Returns:
        [B, T] float32 scores.
    """
    check_k3_clamps(log_ratio_max, score_max)
    check_float("logp_vis", logp_vis)
    check_float("logp_txt", logp_txt)
    if logp_vis.shape != logp_txt.shape:
        raise ValueError(f"logp_txt must have the shape of logp_vis [B, T] = {tuple(logp_vis.shape)}, "
                         f"got {tuple(logp_txt.shape)}")
    check_mask(mask, logp_vis.shape)
    if log_ratio_max > 0:  # k3 is a function of log r alone: move pi_txt so that log r sits in the clamp
        d = (logp_txt.double() - logp_vis.double()).clamp(-log_ratio_max, log_ratio_max)
        logp_txt = logp_vis.double() + d
        logp_vis = logp_vis.double()
    scores = k3_kl(logp_vis, logp_txt)  # [B, T] float32
    if score_max > 0:
        scores = scores.clamp(0.0, score_max)
    if mask is not None:
        scores = torch.where(mask.bool(), scores, torch.zeros_like(scores))  # padding may hold garbage log-probs
    return scores


def check_k3_clamps(log_ratio_max: float, score_max: float) -> None:
    for name, v in (("log_ratio_max", log_ratio_max), ("score_max", score_max)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"k3 {name} must be a finite number >= 0 (0 = off), got {v!r}")


# where ranks' (or micro-batches') values of each weight metric combine by max / min; every other key by mean
WEIGHT_METRIC_MAX = ("pgpo/kl_max", "pgpo/weight_max")
WEIGHT_METRIC_MIN = ("pgpo/weight_min",)


@torch.no_grad()
def weight_metrics(
    weights: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float = defaults.TAU,
    eps: float = defaults.EPS,
    token_adv: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The PGPO metrics every trainer logs (the loop, TRL, verl: one key set), as 0-d tensors: no host sync here,
    the caller converts when it logs.

    Keys: pgpo/kl_mean (mean over the finite scores: a +inf k3 score would swamp it), pgpo/kl_inf_frac,
    pgpo/kl_max, pgpo/frac_above_tau (share of valid tokens whose normalized score I_t is >= tau), and the
    weights' mean, std (unbiased), max and min, all over valid tokens (0 when there is none). With token_adv
    (A_t = A w~_t, [B, T]) also the concentration diagnostics of weight_variants.weight_diagnostics: pgpo/weight_gini,
    pgpo/eff_token_ratio, pgpo/top1_mass, pgpo/top10_mass.

    Args:
        weights, scores: [B, T] float; mask: [B, T], 1 / True on valid tokens. tau, eps: the run's (I_t >= tau).
    """
    valid = mask.bool()
    n = valid.sum()
    n1 = n.clamp(min=1).float()
    finite = valid & torch.isfinite(scores)
    zero = weights.new_zeros((), dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=weights.device)
    any_valid = n > 0
    s = scores.float()
    w = weights.float()
    I = normalized_scores(scores, valid, eps)
    w_mean = torch.where(valid, w, 0.0).sum() / n1
    w_var = torch.where(valid, (w - w_mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1).float()
    out = {
        "pgpo/kl_mean": torch.where(finite, s, 0.0).sum() / finite.sum().clamp(min=1).float(),
        "pgpo/kl_inf_frac": ((s == inf) & valid).sum().float() / n1,
        "pgpo/kl_max": torch.where(any_valid, torch.where(valid, s, -inf).max(), zero),
        "pgpo/frac_above_tau": ((I >= tau) & valid).sum().float() / n1,
        "pgpo/weight_mean": w_mean,
        "pgpo/weight_std": torch.where(n > 1, w_var.sqrt(), zero),
        "pgpo/weight_max": torch.where(any_valid, torch.where(valid, w, -inf).max(), zero),
        "pgpo/weight_min": torch.where(any_valid, torch.where(valid, w, inf).min(), zero),
    }
    if token_adv is not None:
        out.update(weight_variants.weight_diagnostics(weights, token_adv, mask))
    return out


# %% losses


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> torch.Tensor:
    """Reduces a [B, T] loss matrix to a scalar.

    Args:
        loss_mat: [B, T] per-token loss.
        loss_mask: [B, T] 1 on tokens that count.
        loss_agg_mode: "token-mean" (DAPO: every token of the mini-batch weighs the same), "seq-mean-token-mean"
            (GRPO: mean over each sequence's tokens, then over sequences) or "seq-mean-token-sum".
        global_tokens, global_seqs: the mini-batch's total token / sequence count, so micro-batches accumulate to
            the mini-batch's mean; None uses this micro-batch's own counts.
    """
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        denom = global_tokens if global_tokens is not None else mask.sum().clamp_min(1.0)
        return (loss_mat * mask).sum() / denom
    seq_sums = (loss_mat * mask).sum(-1)  # [B]
    if loss_agg_mode == "seq-mean-token-mean":
        seq_vals = seq_sums / mask.sum(-1).clamp_min(1.0)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_vals = seq_sums
    else:
        raise ValueError(
            f"unknown loss_agg_mode {loss_agg_mode!r}; valid: token-mean, seq-mean-token-mean, seq-mean-token-sum"
        )
    denom = global_seqs if global_seqs is not None else float(loss_mat.shape[0])
    return seq_vals.sum() / denom


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO, Schulman et al. 2017) with DAPO's decoupled clip range (clip-higher).

    L_t = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps_low, 1 + eps_high)),  r_t = pi(o_t) / pi_old(o_t).

    Args:
        old_log_prob, log_prob: [B, T] log-probs of the sampled tokens (old: no grad).
        advantages: [B, T] token advantages (PGPO: A * w~_t; GRPO/DAPO: A broadcast).
        response_mask: [B, T].

    Returns:
        (scalar loss, metrics with clip fraction and approximate KL to the old policy, detached).
    """
    # clamp the log-ratio before exp so one far-off token cannot overflow
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, global_tokens, global_seqs)
    with torch.no_grad():
        m = response_mask.bool()
        n = m.sum().clamp_min(1)
        metrics = {
            "actor/clip_frac": ((pg_losses2 > pg_losses1) & m).sum() / n,
            "actor/ppo_kl": (-log_ratio * m).sum() / n,
        }
    return loss, metrics
