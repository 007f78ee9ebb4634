"""PGPO variants, controls and weight diagnostics (docs/method.md#variants): rl.weight_variants via core_algos."""

import math

import pytest
import torch

from pgpo_kernels import reshape_weights
from pgpo_train.rl import core_algos
from pgpo_train.rl.weight_variants import control_generator
from pgpo_train.rl.weight_variants import normalized_dependency
from pgpo_train.rl.weight_variants import row_quantile
from pgpo_train.rl.weight_variants import shuffle_within_rows
from pgpo_train.rl.weight_variants import variant_weights
from pgpo_train.rl.weight_variants import weight_diagnostics


def _batch(seed=0, B=6, T=17):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, T, generator=g).pow(3) * 5  # heavy-ish tail
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 12:] = False
    mask[2, 1:] = False  # a single valid token: uniform 1
    scores[3] = 0.7  # all equal: uniform 1
    mask[4, :] = False  # empty row
    scores[5, 3] = math.inf  # +inf is the row maximum
    return scores, mask


def test_defaults_equal_the_kernel():
    scores, mask = _batch()
    ref = reshape_weights(scores, mask, backend="torch")
    for renorm in (True, False):
        ref = reshape_weights(scores, mask, renormalize=renorm, backend="torch")
        got = variant_weights(scores, mask, renormalize=renorm)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the dispatcher takes the kernel itself when every option is at its default: byte-identical
    assert torch.equal(core_algos.pgpo_weights(scores, mask, backend="torch"), reshape_weights(scores, mask))


@pytest.mark.parametrize(
    "kw",
    [
        {"tau_mode": "quantile"},
        {"floor": 0.1},
        {"control": "inverted"},
        {"control": "shuffled"},
        {"control": "inverted", "tau_mode": "quantile", "floor": 0.1},
    ],
)
def test_every_variant_keeps_the_mass_and_zero_padding(kw):
    scores, mask = _batch(1)
    w = core_algos.pgpo_weights(scores, mask, generator=control_generator(0, 1), **kw)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), mask.sum(-1).float(), rtol=1e-5, atol=1e-5)
    assert (w[~mask] == 0).all()
    assert torch.equal(w[2, :1], torch.ones(1)) and torch.equal(w[3], torch.ones(17))  # degenerate rows: uniform


def test_shuffled_keeps_each_rows_weights_moves_them_and_is_seeded():
    scores, mask = _batch(2)
    plain = core_algos.pgpo_weights(scores, mask)
    w = core_algos.pgpo_weights(scores, mask, control="shuffled", generator=control_generator(7, 3))
    for i in range(scores.shape[0]):
        torch.testing.assert_close(w[i][mask[i]].sort().values, plain[i][mask[i]].sort().values)
    assert (w[~mask] == 0).all() and not torch.equal(w, plain)
    again = core_algos.pgpo_weights(scores, mask, control="shuffled", generator=control_generator(7, 3))
    other = core_algos.pgpo_weights(scores, mask, control="shuffled", generator=control_generator(7, 4))
    assert torch.equal(w, again) and not torch.equal(w, other)  # a function of (seed, step): resumable
    with pytest.raises(ValueError, match="generator"):
        core_algos.pgpo_weights(scores, mask, control="shuffled")


def test_shuffle_is_uniform_over_positions():
    w = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    g = control_generator(0, 0)
    first = [shuffle_within_rows(w, mask, g)[0, 0].item() for _ in range(600)]
    assert all(shuffle_within_rows(w, mask, g)[0, 3] == 0 for _ in range(5))
    assert abs(first.count(3.0) / 600 - 1 / 3) < 0.06


def test_inverted_reverses_the_order():
    scores, mask = _batch(3)
    w = core_algos.pgpo_weights(scores, mask, control="inverted")
    for i in (0, 1):  # ordinary rows: weights non-increasing in S
        s, wi = scores[i][mask[i]], w[i][mask[i]]
        order = s.argsort()
        assert (wi[order].diff() <= 1e-6).all()
        assert wi[s.argmax()] == wi.min() and wi[s.argmin()] == wi.max()
    plain = core_algos.pgpo_weights(scores, mask)
    assert plain[5, 3] == plain[5].max() and w[5, 3] == w[5][mask[5]].min()  # +inf: the least weight when inverted


def test_quantile_tau_gates_that_share_and_floor_bounds_the_weights():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(3, 101, generator=g) * 3  # distinct scores
    mask = torch.ones(3, 101, dtype=torch.bool)
    I, _ = normalized_dependency(scores, mask, 1e-6)
    t = row_quantile(I, mask, 0.4)
    torch.testing.assert_close(t, torch.quantile(I, 0.4, dim=-1, keepdim=True))
    w = variant_weights(scores, mask, tau=0.4, tau_mode="quantile", renormalize=False)
    assert ((w >= 1).float().mean(-1) - 0.6).abs().max() < 0.02  # the top 60% of each response are amplified
    w = variant_weights(scores, mask, floor=0.1, renormalize=False)
    assert w.min() == pytest.approx(0.1) and (w == 0.1).sum() >= 3  # each row's I = 0 token sits at the floor
    ref = reshape_weights(scores, mask, renormalize=False, backend="torch")
    torch.testing.assert_close(w, ref.clamp_min(0.1))


def test_nan_score_poisons_its_row_only():
    scores, mask = _batch(5)
    scores[0, 2] = math.nan
    w = core_algos.pgpo_weights(scores, mask, control="inverted")
    assert torch.isnan(w[0]).all() and torch.isfinite(w[1:]).all()


def test_bad_variant_arguments_are_named():
    s, m = _batch()
    for kw, name in (({"control": "random"}, "control"), ({"tau_mode": "rank"}, "tau_mode"), ({"floor": -1}, "floor")):
        with pytest.raises(ValueError, match=name):
            core_algos.pgpo_weights(s, m, **kw)


def _gini(x):
    x = sorted(x)
    n = len(x)
    return sum((2 * (i + 1) - n - 1) * v for i, v in enumerate(x)) / (n * sum(x))


def test_diagnostics_match_their_definitions():
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    w = torch.zeros(2, 10)
    w[0] = 1.0  # uniform
    w[1, :6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 6.0])  # one token holds everything
    adv = torch.tensor([[1.0], [-2.0]]) * w
    d = {k: float(v) for k, v in weight_diagnostics(w, adv, mask).items()}
    assert d["pgpo/weight_gini"] == pytest.approx((0 + 5 / 6) / 2)
    assert d["pgpo/eff_token_ratio"] == pytest.approx((1 + 1 / 6) / 2)
    # |A w|: ten tokens of 1 and one of 12 (16 valid tokens: top 1% = 1 token, top 10% = 2 tokens)
    assert d["pgpo/top1_mass"] == pytest.approx(12 / 22) and d["pgpo/top10_mass"] == pytest.approx(13 / 22)
    scores, m = _batch(6)
    w = core_algos.pgpo_weights(scores, m)
    rows = [w[i][m[i]].tolist() for i in range(w.shape[0]) if m[i].any()]
    d = weight_diagnostics(w, w, m)
    assert float(d["pgpo/weight_gini"]) == pytest.approx(sum(map(_gini, rows)) / len(rows), abs=1e-5)
    assert all(v.dim() == 0 for v in d.values())
