"""fused_linear_logp's gradient filter: the error bound against float64 math, exactness at 0, the skip count.

The Triton kernels run in the interpreter (tiles of 16 rows x 32 columns). Logits go from flat to very peaked by
scaling the lm_head; targets are sampled from the model's own softmax, as an RL response is, so the target column
of a peaked row has p near 1 and its tile can be skipped too.
"""

from __future__ import annotations

import math

import pytest
import torch

import pgpo_kernels.fused_logp as fl
from pgpo_kernels import fused_linear_logp
from pgpo_kernels.logp_filter import filter_tiles
from pgpo_kernels.reference import fused_linear_logp_ref

_N, _H, _V = 40, 32, 300
_BLOCKS = (fl.INTERPRETER_BLOCKS["BLOCK_N"], fl.INTERPRETER_BLOCKS["BLOCK_V"])


def _inputs(scale, dtype=torch.float32, seed=0, n_ignored=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(_N, _H, generator=g).to(dtype)
    w = (torch.randn(_V, _H, generator=g) / math.sqrt(_H) * scale).to(dtype)
    b = (torch.randn(_V, generator=g) * 0.1).to(dtype)
    p = torch.softmax(fl_logits(h, w, b, 1.0), -1)
    t = torch.multinomial(p, 1, generator=g).squeeze(-1)
    t[torch.randperm(_N, generator=g)[:n_ignored]] = -100
    return h, w, b, t


def fl_logits(h, w, b, temperature):
    return (h.double() @ w.double().T + b.double()) / temperature


def _grads(backend, h, w, b, t, g_lp, g_ent, temperature, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    if backend == "ref":
        lp, ent = fused_linear_logp_ref(*leaves[:2], t, leaves[2], temperature)
    else:
        lp, ent = fused_linear_logp(leaves[0], leaves[1], t, leaves[2], temperature=temperature, with_entropy=True,
                                    backend=backend, **kw)
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    return torch.autograd.grad(loss, leaves)


def _skip_bound(h, w, b, t, g_lp, g_ent, temperature, eps):
    """Per-element bound on what skipping can change, from float64 math: every skipped d_ij has |d_ij| < eps s_i, so
    the skipped terms are a subset of the small ones; summing |d_ij| |W_jk| over all small (i, j) bounds grad_h, etc.
    (slack 1e-3 on eps: the kernel decides on fp32 d)."""
    x = fl_logits(h, w, b, temperature)
    valid = t != -100
    logp = x.log_softmax(-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1, keepdim=True)
    gl = torch.where(valid, g_lp, 0.0)[:, None]
    ge = torch.where(valid, g_ent, 0.0)[:, None]
    d = -p * (gl + ge * (logp + ent))
    d[valid.nonzero()[:, 0], t[valid]] += gl[valid, 0]
    d /= temperature
    s = (gl.abs() + ge.abs()) / temperature
    small_d = torch.where(d.abs() < eps * (1 + 1e-3) * s, d.abs(), 0.0)  # [N, V]
    return (small_d @ w.double().abs(), small_d.T @ h.double().abs(), small_d.sum(0)), (small_d > 0)


# flat (H ~ log V) ... very peaked (H ~ 0); the default eps (2**-28 for fp32) skips a tile only when very peaked
@pytest.mark.parametrize("scale, eps", [(0.05, 0.01), (1.0, 0.01), (6.0, 0.01), (30.0, 0.01), (30.0, None)])
def test_filtered_gradients_within_bound_of_float64(scale, eps):
    h, w, b, t = _inputs(scale)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(_N, generator=g, dtype=torch.float64), torch.randn(_N, generator=g, dtype=torch.float64)
    temperature = 0.8
    eps_val = fl.resolve_grad_filter(eps, h.dtype)
    ref = _grads("ref", h, w, b, t, g_lp, g_ent, temperature)
    exact = _grads("triton", h, w, b, t, g_lp, g_ent, temperature, grad_filter=0.0)
    got = _grads("triton", h, w, b, t, g_lp, g_ent, temperature, grad_filter=eps)
    bounds, small = _skip_bound(h, w, b, t, g_lp, g_ent, temperature, eps_val)
    tiles = filter_tiles(h, w, t, b, grad_logp=g_lp, grad_entropy=g_ent, temperature=temperature, grad_filter=eps,
                         block_n=_BLOCKS[0], block_v=_BLOCKS[1])
    for gg, ee, rr, bb in zip(got, exact, ref, bounds):
        rnd = 2e-5 * max(rr.abs().max().item(), 1.0)  # the exact kernel's fp32 rounding (tests/test_fused_logp.py)
        assert bool(((ee.double() - rr).abs() <= rnd).all())
        err = (gg.double() - rr).abs()
        assert bool((err <= bb + rnd).all()), f"max excess {(err - bb - rnd).max().item():.3e}"
    if tiles.skipped:  # the filter did something, and what it dropped is seen in the gradients
        assert any(not torch.equal(gg, ee) for gg, ee in zip(got, exact))
    else:
        assert all(torch.equal(gg, ee) for gg, ee in zip(got, exact))
    if eps == 0.01 and scale in (0.05, 30.0):  # flat: every p < 1/300 < eps; peaked: most p ~ 0, targets near 1
        assert tiles.skipped > 0


def test_kernel_skip_count_matches_torch_rule():
    for scale in (0.05, 6.0, 30.0):
        h, w, b, t = _inputs(scale, seed=3)
        x = fl_logits(h, w, b, 1.0).float()
        lse = torch.logsumexp(x, -1)
        ent = -(x.log_softmax(-1).exp() * x.log_softmax(-1)).sum(-1)
        valid = t != -100
        grads = torch.stack([torch.where(valid, 1.0, 0.0), torch.zeros(_N)], -1)
        counter = torch.zeros(1, dtype=torch.int32)
        fl.logp_backward(h, w, b, t.long(), torch.stack([lse, ent], -1), grads, 1.0, False, (True, True, True),
                         filter_eps=0.01, skip_counter=counter)
        tiles = filter_tiles(h, w, t, b, grad_filter=0.01, block_n=_BLOCKS[0], block_v=_BLOCKS[1])
        assert tiles.tiles == math.ceil(_N / _BLOCKS[0]) * math.ceil(_V / _BLOCKS[1])
        assert int(counter.item()) == tiles.skipped, scale


def test_zero_filter_runs_the_exact_kernel_and_a_filter_that_skips_nothing_is_bit_identical(monkeypatch):
    h, w, b, t = _inputs(1.0, torch.bfloat16, n_ignored=0)
    t[:] = torch.arange(_N) * 7  # a target in every tile column block: nothing can be skipped at a tiny eps
    launches = []
    real = fl._logp_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["FILTER"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(fl, "_logp_bwd_kernel", Spy())
    g_lp, g_ent = torch.randn(_N, dtype=torch.float64), torch.randn(_N, dtype=torch.float64)
    exact = _grads("triton", h, w, b, t, g_lp, g_ent, 0.9, grad_filter=0)
    tiny = _grads("triton", h, w, b, t, g_lp, g_ent, 0.9, grad_filter=1e-30)
    assert launches == [False, True]
    for a, c in zip(exact, tiny):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_torch_backend_is_exact_at_any_filter():
    h, w, b, t = _inputs(30.0)
    g_lp, g_ent = torch.randn(_N, dtype=torch.float64), torch.randn(_N, dtype=torch.float64)
    a = _grads("torch", h, w, b, t, g_lp, g_ent, 1.0, grad_filter=0.0)
    c = _grads("torch", h, w, b, t, g_lp, g_ent, 1.0, grad_filter=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_default_is_cce_rule():
    assert fl.resolve_grad_filter(None, torch.bfloat16) == 2.0**-12
    assert fl.resolve_grad_filter(None, torch.float16) == 2.0**-15
    assert fl.resolve_grad_filter(None, torch.float32) == 2.0**-28
    assert fl.resolve_grad_filter(0, torch.bfloat16) == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value, exc", [(-1e-3, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError), ("auto", TypeError),
                                        (torch.tensor(0.1), TypeError)])
def test_bad_grad_filter_named_before_launch(backend, value, exc, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(fl, "logp_forward", boom)
    monkeypatch.setattr(fl, "fused_linear_logp_torch", boom)
    with pytest.raises(exc, match="grad_filter"):
        fused_linear_logp(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 9, -100]), backend=backend,
                          grad_filter=value)
