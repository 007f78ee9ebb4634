"""RL math: group advantages, dynamic sampling, k3, agg_loss, and PGPO with tau = 0, beta = 0 == DAPO."""

import pytest
import torch

from pgpo_kernels.reference import k3_kl_ref
from pgpo_train.rl import core_algos


def test_grpo_advantages_group_normalized():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, _ = core_algos.get_adv_estimator_fn("grpo")(r, group_size=4)
    g = adv.view(2, 4)
    assert torch.allclose(g[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(g[0], (r[:4] - 0.5) / (r[:4].std() + 1e-6))
    assert torch.equal(g[1], torch.zeros(4))  # all-equal group: 0, not NaN
    keep = core_algos.dynamic_sampling_keep(r, 4)
    assert keep.tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        core_algos.get_adv_estimator_fn("nope")


def test_k3_matches_float64_reference():
    lv = -torch.rand(3, 7) * 5
    lt = -torch.rand(3, 7) * 5
    assert torch.allclose(core_algos.k3_scores(lv, lt), k3_kl_ref(lv, lt).float(), atol=1e-5, rtol=1e-5)
    assert (core_algos.k3_scores(lv, lv) == 0).all()
    mask = torch.rand(3, 7) < 0.5
    lt_padded = torch.where(mask, lt, torch.full_like(lt, -1e30))  # garbage log-probs on padding: score 0 there
    s = core_algos.k3_scores(lv, lt_padded, mask)
    assert (s[~mask] == 0).all() and torch.equal(s[mask], core_algos.k3_scores(lv, lt)[mask])
    with pytest.raises(ValueError, match="logp_txt must have the shape"):
        core_algos.k3_scores(lv, lt[:, :3])


def _loop_metrics_as_before(scores, weights, mask, tau, eps):
    """pgpo-train's weight metrics as the loop computed them before weight_metrics (compacted, host-side)."""
    m = mask.bool()
    s, w = scores[m], weights[m]
    I = core_algos.normalized_scores(scores, m, eps)
    finite = s[torch.isfinite(s)]
    return {
        "pgpo/kl_mean": float(finite.mean()) if finite.numel() else 0.0,
        "pgpo/kl_inf_frac": float((s == float("inf")).float().mean()),
        "pgpo/kl_max": float(s.max()),
        "pgpo/frac_above_tau": float((I[m] >= tau).float().mean()),
        "pgpo/weight_mean": float(w.mean()),
        "pgpo/weight_std": float(w.std()) if w.numel() > 1 else 0.0,
        "pgpo/weight_max": float(w.max()),
        "pgpo/weight_min": float(w.min()),
    }


def test_weight_metrics_one_key_set_same_values_as_the_loop_had():
    """One set of metric keys for the loop, TRL and verl; values as the loop's compacted formulas (to float32
    rounding: masked sums add in another order), 0-d tensors (no host sync), zeros without any valid token."""
    torch.manual_seed(3)
    for trial in range(20):
        scores = torch.rand(5, 9) ** 3 * 4
        if trial % 3 == 0:
            scores[1, 2] = float("inf")
        mask = torch.rand(5, 9) < 0.7
        mask[:, 0] = True
        w = core_algos.pgpo_weights(scores, mask, backend="torch")
        got = core_algos.weight_metrics(w, scores, mask, tau=0.4, eps=1e-6)
        want = _loop_metrics_as_before(scores, w, mask, 0.4, 1e-6)
        assert list(got) == list(want)
        assert all(v.dim() == 0 for v in got.values())
        for k in want:
            assert float(got[k]) == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    empty = core_algos.weight_metrics(w, scores, torch.zeros_like(mask), tau=0.4)
    assert all(float(v) == 0.0 for v in empty.values())


def test_adapters_log_the_loops_metric_keys():
    """verl's helper returns exactly core_algos.weight_metrics' keys (TRL logs the same dict: test_integration_trl)."""
    from pgpo_train.integrations import pgpo_reshape_advantages_

    mask = torch.ones(2, 4)
    batch = {"advantages": torch.ones(2, 4), "response_mask": mask}
    _, metrics = pgpo_reshape_advantages_(batch, scores=torch.rand(2, 4), backend="torch")
    keys = core_algos.weight_metrics(torch.ones(2, 4), torch.zeros(2, 4), mask, token_adv=mask)
    assert list(metrics) == list(keys)


def test_normalized_scores_are_the_reshapes_I():
    """I_t gates the reshape: without renormalization the weights are the gate of I_t (docs/method.md#reshape)."""
    torch.manual_seed(2)
    tau, beta, eps = 0.4, 2.0, 1e-6
    scores = torch.rand(4, 7) * 3
    scores[2, 3] = float("inf")  # an infinite score is the sequence maximum, the finite ones sit at I = 0
    mask = (torch.arange(7)[None] < torch.tensor([7, 5, 7, 2])[:, None]).long()
    scores[1, 5:] = 100.0  # padding never enters min / max
    I = core_algos.normalized_scores(scores, mask, eps)
    assert I[2].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert float(I[1].max()) == pytest.approx(1.0, abs=1e-5) and (I[1, 5:] == 0).all()
    gate = torch.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps)) * mask
    w = core_algos.pgpo_weights(scores, mask, tau=tau, beta=beta, eps=eps, renormalize=False, backend="torch")
    assert core_algos.get_token_weight_fn("pgpo") is core_algos.pgpo_weights
    assert torch.allclose(w, gate, atol=1e-5)


def test_agg_loss_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert core_algos.agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert core_algos.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # micro-batches with global counts add up to the whole mini-batch's mean
    parts = sum(
        core_algos.agg_loss(loss[i : i + 1], mask[i : i + 1], "token-mean", global_tokens=4.0) for i in range(2)
    )
    assert parts.item() == pytest.approx(10 / 4)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        core_algos.agg_loss(loss, mask, "nope")


def _loss(adv_tok, old, new, mask):
    return core_algos.get_policy_loss_fn("vanilla")(old, new, adv_tok, mask, clip_ratio_low=0.2, clip_ratio_high=0.28)[
        0
    ]


def test_pgpo_tau0_beta0_is_dapo():
    torch.manual_seed(1)
    B, T = 6, 9
    mask = (torch.arange(T)[None] < torch.tensor([9, 3, 1, 7, 5, 9])[:, None]).long()
    scores = torch.rand(B, T) * 3
    w = core_algos.get_token_weight_fn("pgpo")(scores, mask, tau=0.0, beta=0.0, backend="torch")
    assert torch.allclose(w, mask.float(), atol=1e-6)
    adv = torch.randn(B)
    old = -torch.rand(B, T)
    new = (old + 0.3 * torch.randn(B, T)).requires_grad_()
    l_pgpo = _loss(adv[:, None] * w, old, new, mask)
    l_dapo = _loss(adv[:, None] * mask.float(), old, new, mask)
    assert torch.allclose(l_pgpo, l_dapo, atol=1e-6)
    # and with the default tau/beta the loss differs (the test can fail)
    w2 = core_algos.get_token_weight_fn("pgpo")(scores, mask, backend="torch")
    assert not torch.allclose(_loss(adv[:, None] * w2, old, new, mask), l_dapo, atol=1e-4)


def test_clip_higher():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 1.35]]))  # ratios 1.25 (inside 1.28) and 1.35 (clipped)
    adv = torch.ones(1, 2)
    loss, m = core_algos.get_policy_loss_fn("vanilla")(old, new, adv, torch.ones(1, 2), clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2, rel=1e-5)
    assert m["actor/clip_frac"].item() == pytest.approx(0.5)


def test_adapters_take_pgpo_weights_options_by_name_only():
    """pgpo_weights_from_passes / pgpo_reshape_advantages_ forward their options to core_algos.pgpo_weights: the same
    weights as calling it directly, and a misspelt option is refused before anything runs."""
    from pgpo_train.integrations import pgpo_reshape_advantages_
    from pgpo_train.integrations import pgpo_weights_from_passes

    torch.manual_seed(5)
    scores, mask = torch.rand(3, 6) * 2, torch.ones(3, 6, dtype=torch.bool)
    opts = {"tau": 0.3, "beta": 1.5, "renormalize": False, "min_spread": 0.05, "tau_mode": "quantile", "floor": 0.1}
    w, _ = pgpo_weights_from_passes(mask, scores=scores, backend="torch", **opts)
    assert torch.equal(w, core_algos.pgpo_weights(scores, mask, backend="torch", **opts))
    with pytest.raises(TypeError, match=r"unknown PGPO weight option\(s\) \['taus'\]"):
        pgpo_weights_from_passes(mask, scores=scores, taus=0.3)
    batch = {"advantages": torch.ones(3, 6), "response_mask": mask}
    with pytest.raises(TypeError, match="renormalise"):
        pgpo_reshape_advantages_(batch, scores=scores, renormalise=False)
    assert torch.equal(batch["advantages"], torch.ones(3, 6))  # untouched
