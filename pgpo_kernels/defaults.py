"""The PGPO method's defaults, in one place: the kernels' signatures and the float64 reference read them here, and so
do the training loop's config, the TRL and verl integrations (tests check that they agree).

The gate and estimator values are the paper's best setting (arXiv 2604.01840: tau 0.4, beta 2.0, the exact KL, mass
kept); the rest are our choices where the paper is silent.
"""

from __future__ import annotations

TAU = 0.4  # gate threshold on the min-max normalized score I, in [0, 1]
BETA = 2.0  # amplification of tokens above tau (1 + beta at I = 1), >= 0
EPS = 1e-6  # added to the min-max and gate denominators (a sequence of equal scores gets I = 0), > 0
RENORMALIZE = True  # rescale each sequence's weights to sum to its valid-token count (the paper ablates False)
ESTIMATOR = "full"  # the exact token KL over the vocabulary; "k3" estimates it from the sampled token
TEMPERATURE = 1.0  # softmax temperature of the token KL (the training loop uses its sampling temperature)
# the training side's extras, all off by default (the paper's method as written)
MIN_SPREAD = 0.0  # a sequence whose log1p(score) spread is below this gets uniform weights
CONTROL = "none"  # no control ("shuffled": weights permuted within a sequence; "inverted": I -> 1 - I)
TAU_MODE = "absolute"  # gate at I = tau ("quantile": at each sequence's tau-quantile of I)
FLOOR = 0.0  # minimum weight after the gate, before the renormalization (0: none)
# the k3 estimator's clamps (0: off, the paper's): log r clamped to [-K3_LOG_RATIO_MAX, K3_LOG_RATIO_MAX] before
# (r - 1) - log r, the score to [0, K3_SCORE_MAX] after it
K3_LOG_RATIO_MAX = 0.0
K3_SCORE_MAX = 0.0
PRESET = "none"  # no preset (PRESETS)
# named bundles of the options above (pgpo-train's --pgpo.preset, TRL's pgpo_preset, verl's algorithm.pgpo.preset).
# dev-easyr1: the authors' development variant as an independent EasyR1 reproduction that ran it reports it (second-
# hand: not in the paper, not checked against the authors' code): each response's gate at its own tau-quantile of I,
# weights below it floored at 0.1, no renormalization, k3 on the sampled token with log r clamped to [-20, 20] and
# the score to [0, 10] (verl's low_var_kl clamps, the text-only pass as the reference).
PRESETS = {
    "none": {},
    "dev-easyr1": {"tau_mode": "quantile", "floor": 0.1, "renormalize": False, "estimator": "k3",
                   "k3_log_ratio_max": 20.0, "k3_score_max": 10.0},
}
