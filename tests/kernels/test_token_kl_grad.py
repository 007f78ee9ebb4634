"""Differentiable token_kl: TokenKLFunction's backward (fused Triton kernel / torch fallback) against float64 truth.

gradcheck in float64 on the torch backend (finite differences of the forward itself); the Triton backward against
token_kl_grad_ref, which is in turn checked against autograd through a plain float64 KL formula.
"""

from __future__ import annotations

import pytest
import torch

from pgpo_kernels import TokenKLFunction
from pgpo_kernels import token_kl
from pgpo_kernels.reference import token_kl_grad_ref

_SHAPE_PARAMS = [(1, 1, 5), (2, 3, 64), (3, 1271), (2, 5000)]  # [..., V]; 1271 ragged, 5000 spans two blocks
_DTYPE_PARAMS = [(torch.float32, 1e-6, 1e-4), (torch.bfloat16, 1e-2, 2e-2), (torch.float16, 2e-3, 5e-3)]


def _pair(shape, dtype, scale=2.0):
    a = torch.randn(shape) * scale
    b = a + torch.randn(shape)
    return a.to(dtype), b.to(dtype)


def _plain_kl64(a, b, temperature):
    logp = (a / temperature).log_softmax(-1)
    logq = (b / temperature).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def test_reference_gradient_is_the_autograd_gradient():
    a, b = _pair((4, 33), torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    g = torch.randn(4, dtype=torch.float64)
    ga, gb = torch.autograd.grad((_plain_kl64(a, b, 0.7) * g).sum(), (a, b))
    ra, rb = token_kl_grad_ref(a.detach(), b.detach(), g, 0.7)
    torch.testing.assert_close(ra, ga, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rb, gb, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradcheck_float64_torch_backend(temperature):
    a, b = _pair((2, 3, 17), torch.float64)
    a[0, 0, :3] = float("-inf")  # masked entries in both: p = q = 0, zero gradient, finite KL
    b[0, 0, :3] = float("-inf")
    a.requires_grad_(True)
    b.requires_grad_(True)

    def fn(x, y):
        return TokenKLFunction.apply(x, y, temperature, "torch")

    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda x: fn(x, b.detach()), (a,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPE_PARAMS)
@pytest.mark.parametrize("shape", _SHAPE_PARAMS)
def test_gradient_matches_reference(shape, dtype, atol, rtol, backend):
    a, b = _pair(shape, dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    g = torch.randn(shape[:-1])  # grad_out != 1: the scaling path runs
    out = token_kl(a, b, temperature=0.8, backend=backend)
    assert out.dtype == torch.float32
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    assert ga.dtype == dtype and ga.shape == a.shape
    ra, rb = token_kl_grad_ref(a.detach(), b.detach(), g, 0.8)
    torch.testing.assert_close(ga.double(), ra, atol=atol, rtol=rtol)
    torch.testing.assert_close(gb.double(), rb, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_special_rows(backend):
    V = 40
    a, b = _pair((4, V), torch.float32)
    a[0, :10] = float("-inf")  # masked in a only: dL/da = 0 there, dL/db = q / T there
    a[1] = float("-inf")  # no distribution: KL is the constant 0, zero gradients
    b[2, 5] = float("-inf")  # KL = +inf: no derivative, NaN gradients (documented)
    a[3] += 1e4  # huge logits
    b[3] += 1e4
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = token_kl(a, b, backend=backend)
    ga, gb = torch.autograd.grad(out[[0, 1, 3]].sum() + 0 * out[2], (a, b))
    ra, rb = token_kl_grad_ref(a.detach(), b.detach(), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(ga[0].double(), ra[0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gb[0].double(), rb[0], atol=1e-6, rtol=1e-4)
    assert bool((ga[0, :10] == 0).all()) and bool((gb[0, :10] != 0).all())
    assert bool((ga[1] == 0).all()) and bool((gb[1] == 0).all())
    assert bool(torch.isnan(ga[2]).all())  # 0 * NaN upstream stays NaN: an infinite KL has no gradient
    torch.testing.assert_close(ga[3].double(), ra[3], atol=1e-3, rtol=1e-3)  # fp32 logits near 1e4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_infinite_kl_with_underflowing_p_has_nan_gradients(backend):
    # p_i underflows to 0 where q_i = 0: the KL is still +inf, so both gradients are NaN as for any infinite KL
    a, b = _pair((2, 40), torch.float32)
    a[0, 3] = -300.0
    b[0, 3] = float("-inf")
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = token_kl(a, b, backend=backend)
    assert out[0].item() == float("inf") and bool(torch.isfinite(out[1]))
    ga, gb = torch.autograd.grad(out[1] + 0 * out[0], (a, b))
    assert bool(torch.isnan(ga[0]).all()) and bool(torch.isnan(gb[0]).all())
    assert bool(torch.isfinite(ga[1]).all()) and bool(torch.isfinite(gb[1]).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_input_needs_grad_and_nothing_big_is_saved(backend):
    a, b = _pair((3, 50), torch.float32)
    b.requires_grad_(True)
    out = token_kl(a, b, backend=backend)
    # forward saves the inputs themselves (references) and, on the triton backend, the [N, 5] fp32 row stats the
    # one-read backward needs: nothing [N, V] of its own
    node = out.grad_fn  # fp32 in, fp32 out: no cast node in between
    assert "TokenKLFunction" in type(node).__name__
    saved = node.saved_tensors
    own = [t for t in saved if t.data_ptr() not in {a.data_ptr(), b.data_ptr()}]
    assert [tuple(t.shape) for t in own] == ([(3, 5)] if backend == "triton" else [])
    (gb,) = torch.autograd.grad(out.sum(), (b,))
    torch.testing.assert_close(gb.double(), token_kl_grad_ref(a, b.detach(), torch.ones(3))[1], atol=1e-6,
                               rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_unchanged_and_inputs_untouched(backend):
    # regression: an earlier torch fallback scaled fp32 inputs in place when temperature != 1
    a, b = _pair((2, 3, 30), torch.float32)
    a0, b0 = a.clone(), b.clone()
    out = token_kl(a, b, temperature=0.5, backend=backend)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    with torch.no_grad():
        again = token_kl(a, b, temperature=0.5, backend=backend)
    torch.testing.assert_close(out, again)
    assert not again.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backward_vocab_152064():
    a, b = _pair((64, 152064), torch.bfloat16)
    a, b = a.cuda().requires_grad_(True), b.cuda().requires_grad_(True)
    g = torch.randn(64, device="cuda")
    ga, gb = torch.autograd.grad((token_kl(a, b) * g).sum(), (a, b))
    rows = torch.arange(0, 64, 4)
    ra, rb = token_kl_grad_ref(a.detach()[rows].cpu(), b.detach()[rows].cpu(), g[rows].cpu())
    torch.testing.assert_close(ga[rows].cpu().double(), ra, atol=1e-5, rtol=2e-2)
    torch.testing.assert_close(gb[rows].cpu().double(), rb, atol=1e-5, rtol=2e-2)


# %% non-finite rows and the one-read backward's flags (triton backend, interpreter) ------------------------------
def test_nan_row_gives_nan_gradients_and_huge_finite_rows_the_true_ones():
    a, b = _pair((4, 300), torch.float32)
    a[0, 7] = float("nan")  # NaN row (forward NaN): NaN gradients in that row only
    b[1, 250] = float("inf")  # +inf in b: NaN row
    a[2, 1], b[2, 1] = -40.0, -3e38  # tiny p where log q ~ -3e38: finite KL and gradients (no overflow to inf)
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = token_kl(a, b, backend="triton")
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()
    g = torch.tensor([1.0, 1.0, 0.7, -1.3])
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    assert torch.isnan(ga[:2]).all() and torch.isnan(gb[:2]).all()
    ra, rb = token_kl_grad_ref(a.detach()[2:], b.detach()[2:], g[2:])
    torch.testing.assert_close(ga[2:].double(), ra, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gb[2:].double(), rb, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_backward_writes_only_the_gradients_asked_for(need, n_chunks, monkeypatch):
    import importlib

    tk = importlib.import_module("pgpo_kernels.token_kl")
    monkeypatch.setattr(tk, "MAX_BLOCK_V", 128)  # 128-wide tiles: V = 333 has full tiles, a tail and 3 chunks
    a, b = _pair((3, 333), torch.bfloat16)
    g = torch.randn(3)
    _, stats = tk.token_kl_forward(a, b, 0.9, save_stats=True)
    assert stats.shape == (3, 5) and stats.dtype == torch.float32
    ga, gb = tk.token_kl_backward(a, b, stats, g, 0.9, need_grad=need, n_chunks=n_chunks)
    ra, rb = token_kl_grad_ref(a, b, g, 0.9)
    for got, ref, wanted in ((ga, ra, need[0]), (gb, rb, need[1])):
        if not wanted:
            assert got is None
        else:
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), ref, atol=1e-2, rtol=2e-2)
