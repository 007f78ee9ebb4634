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
