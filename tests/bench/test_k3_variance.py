"""pgpo_bench/k3_variance.py on a few rollouts of the embedded default (random tiny Qwen2.5-VL, no warm-up)."""

import math

import torch

from pgpo_bench.k3_variance import measure
from pgpo_bench.k3_variance import summarize


def test_measure_on_a_few_rollouts():
    r = measure(sft_steps=0, prompts=2, group=2, seed=0, micro_batch=2)
    assert r["sequences"] == 4 and r["tokens"] > 0
    assert r["full_mean"] > 0 and r["k3_mean"] >= 0  # both estimators scored every valid token
    assert r["diff_std"] > 0  # and they are two estimators: k3 is a single-sample estimate of the full KL
    for key in ("full_std", "k3_std", "diff_std", "pearson", "weights_mean_abs_diff"):
        assert math.isfinite(r[key]), key
    assert r["sampling_logit_gap"] < 1e-4  # generate() sampled from the distribution the scoring pass computes


def test_summarize_identical_scores():
    full = torch.rand(3, 5) + 0.1
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    s = summarize(full, full.clone(), mask, tau=0.4, beta=2.0)
    assert s["tokens"] == 13 and s["sequences"] == 3
    assert s["diff_mean"] == 0 and s["diff_std"] == 0 and s["gate_flip_frac"] == 0
    assert s["pearson"] > 0.999 and s["spearman"] > 0.999 and s["weights_max_abs_diff"] == 0
