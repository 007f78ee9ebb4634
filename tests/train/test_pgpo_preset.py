"""--pgpo.preset dev-easyr1 (the authors' development variant, second-hand) and the k3 clamps, against hand
computations on small tensors, and in the loop's scoring pass."""

import argparse
import math

import pytest
import torch

from pgpo_train.data.tasks import make_count_records
from pgpo_train.models.tiny import build_tiny
from pgpo_train.rl import core_algos
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.config import add_train_args
from pgpo_train.run.config import config_from_args
from pgpo_train.step.sampling import rollout
from pgpo_train.step.scoring import old_logp_and_scores


def test_k3_clamps_by_hand():
    lp_vis = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -40.0]])
    d = torch.tensor([[0.5, -1.0, 25.0, -30.0, 30.0]])  # log r = log pi_txt - log pi_vis
    lp_txt = lp_vis + d
    plain = core_algos.k3_scores(lp_vis, lp_txt)
    k3 = [math.exp(x) - 1 - x for x in (0.5, -1.0, 25.0, -30.0, 30.0)]
    torch.testing.assert_close(plain, torch.tensor([k3]), rtol=1e-5, atol=0)
    ratio = core_algos.k3_scores(lp_vis, lp_txt, log_ratio_max=20.0)
    k3_20 = [math.exp(x) - 1 - x for x in (0.5, -1.0, 20.0, -20.0, 20.0)]
    torch.testing.assert_close(ratio, torch.tensor([k3_20]), rtol=1e-5, atol=0)
    both = core_algos.k3_scores(lp_vis, lp_txt, log_ratio_max=20.0, score_max=10.0)
    torch.testing.assert_close(both, torch.tensor([[k3[0], k3[1], 10.0, 10.0, 10.0]]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="score_max"):
        core_algos.k3_scores(lp_vis, lp_txt, score_max=-1.0)


def test_dev_preset_weights_by_hand():
    # log1p(S) = 0, 1, 2, 3, 4 -> I = 0, .25, .5, .75, 1; the row's 0.4-quantile of I is 0.25 + 0.6 * 0.25 = 0.4
    scores = torch.expm1(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]]))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    kw = PGPOWeightsConfig(preset="dev-easyr1").with_preset().weight_kwargs()
    w = core_algos.pgpo_weights(scores, mask, **kw)
    # below the gate I / t (0 floored at 0.1), above 1 + 2 (I - t) / (1 - t); no renormalization
    want = torch.tensor([[0.1, 0.25 / 0.4, 1 + 2 * 0.1 / 0.6, 1 + 2 * 0.35 / 0.6, 1 + 2 * 0.6 / 0.6, 0.0]])
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-5)
    paper = core_algos.pgpo_weights(scores, mask)  # renormalized, absolute gate: another answer
    assert math.isclose(float(paper.sum()), 5.0, rel_tol=1e-5) and not torch.allclose(paper, want, atol=1e-2)


def test_preset_fills_defaults_only_and_flags():
    c = TrainConfig(out_dir="x", pgpo=PGPOWeightsConfig(preset="dev-easyr1", floor=0.2)).resolved()
    p = c.pgpo
    assert (p.tau_mode, p.renormalize, p.estimator, p.k3_log_ratio_max, p.k3_score_max) == (
        "quantile", False, "k3", 20.0, 10.0)
    assert p.floor == 0.2, "an explicit value wins over the preset's"
    ap = argparse.ArgumentParser()
    add_train_args(ap)
    ns = ap.parse_args(["--pgpo.preset", "dev-easyr1", "--out-dir", "x"])
    assert config_from_args(ns).resolved().pgpo.floor == 0.1
    with pytest.raises(SystemExit):
        ap.parse_args(["--pgpo.preset", "nope"])
    with pytest.raises(ValueError, match="--pgpo.k3-score-max.*--pgpo.estimator k3"):
        TrainConfig(out_dir="x", pgpo=PGPOWeightsConfig(k3_score_max=10.0)).resolved()
    with pytest.raises(ValueError, match="--pgpo.preset"):
        TrainConfig(out_dir="x", pgpo=PGPOWeightsConfig(preset="nope")).resolved()


@pytest.mark.parametrize("fused", [False, True])
def test_scoring_pass_applies_the_clamps(fused):
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked: some tokens' k3 far above 10
    base = {"prompt_template": "tiny", "out_dir": "x", "group_size": 4, "micro_batch_size": 3, "max_new_tokens": 12}
    plain = TrainConfig(**base, pgpo=PGPOWeightsConfig(estimator="k3", backend="torch")).resolved()
    clamped = TrainConfig(**base, pgpo=PGPOWeightsConfig(estimator="k3", backend="torch", k3_log_ratio_max=3.0,
                                                         k3_score_max=10.0)).resolved()
    batch, _ = rollout(model, processor, make_count_records(2, seed=4), plain, torch.device("cpu"), {})
    batch.pop("texts")
    a = old_logp_and_scores(model, batch, plain, {}, fused_lm_head=fused)["scores"]
    b = old_logp_and_scores(model, batch, clamped, {}, fused_lm_head=fused)["scores"]
    m = batch["response_mask"].bool()
    assert a[m].max() > 10, "test needs scores above the clamp"
    # k3 from the unclamped score: log r is the root of expm1(x) - x = S on the side of the sign; compare through
    # the clamp's own formula instead: min(k3(clamp(log r, -3, 3)), 10) <= min(S, 10) with equality where |log r| <= 3
    assert (b[m] <= a[m].clamp(max=10.0) + 1e-5).all()
    small = a[m] < math.exp(-3) - 1 + 3 - 1e-3  # |log r| < 3 on both sides (k3(-3) = e^-3 + 2 is the smaller bound)
    assert small.any()
    torch.testing.assert_close(b[m][small], a[m][small], rtol=1e-5, atol=1e-6)
    assert b[m].max() <= math.exp(3) - 4 + 1e-4  # k3(3) = e^3 - 4: the log-ratio clamp bounds every score
