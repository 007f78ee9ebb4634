"""fused_linear_logp: log-prob + entropy from hidden states with a backward, no [N, V] logits.

Truth: fused_linear_logp_ref (float64 lm_head and log-softmax, gradients by float64 autograd), evaluated at the
inputs as given (rounded to their dtype), so every dtype is checked against exact math. Triton runs in the
interpreter at small shapes; its config makes several vocab chunks and ragged row/col/H tiles.
"""

from __future__ import annotations

import math

import pytest
import torch

import pgpo_kernels.torch_fallback.fused_logp as tfl
from pgpo_kernels import fused_linear_logp
from pgpo_kernels.reference import fused_linear_logp_ref

_SHAPES = [(1, 16, 7), (37, 40, 150), (20, 72, 33)]  # N, H, V: ragged row, vocab and H tiles
# tolerance on values and grads relative to the largest reference gradient: the Triton forward sums exact products in
# fp32; its backward rounds d to 16 bits before the tensor-core dots (as cut-cross-entropy does), hence 16-bit tolerances
_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _inputs(N, H, V, dtype, bias=True, n_ignored=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:min(n_ignored, N - 1)]] = -100
    return h, w, b, t


def _loss_grads(fn, tensors, g_lp, g_ent):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in tensors]
    lp, ent = fn(*leaves)
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return lp.detach(), ent.detach(), grads


def _check(backend, N, H, V, dtype, has_bias, temperature, chunk_size=None):
    h, w, b, t = _inputs(N, H, V, dtype, has_bias)
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref = _loss_grads(lambda h_, w_, b_: fused_linear_logp_ref(h_, w_, t, b_, temperature), (h, w, b), g_lp, g_ent)
    got = _loss_grads(lambda h_, w_, b_: fused_linear_logp(h_, w_, t, b_, temperature=temperature, with_entropy=True,
                                                           backend=backend, chunk_size=chunk_size),
                      (h, w, b), g_lp, g_ent)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    tol = _TOL[dtype]
    torch.testing.assert_close(got[0].double(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].double(), ref[1], atol=tol, rtol=tol)
    ignored = t == -100
    assert bool((got[0][ignored] == 0).all()) and bool((got[1][ignored] == 0).all())
    for gg, rr in zip(got[2], ref[2]):
        assert gg.dtype == dtype
        scale = rr.abs().max().item()
        torch.testing.assert_close(gg.double(), rr.double(), atol=tol * max(scale, 1.0), rtol=0)
    assert bool((got[2][0][ignored] == 0).all())  # ignored rows pass no gradient to their hidden states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, H, V", _SHAPES)
def test_triton_matches_float64_reference(N, H, V, dtype):
    _check("triton", N, H, V, dtype, has_bias=(V != 33), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, H, V", _SHAPES)
def test_torch_matches_float64_reference(N, H, V, dtype):
    _check("torch", N, H, V, dtype, has_bias=(V != 7), temperature=1.3, chunk_size=8)


def test_torch_gradcheck_float64():
    h, w, b, t = _inputs(6, 5, 11, torch.float64)
    leaves = [x.requires_grad_() for x in (h, w, b)]

    def fn(h_, w_, b_):
        lp, ent = fused_linear_logp(h_, w_, t, b_, temperature=0.9, with_entropy=True, backend="torch", chunk_size=4)
        return lp, ent

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_non_contiguous_hidden(backend):
    """[B, T, H] slice hidden[:, :-1] (not contiguous) and [B, T] targets; gradient lands in the full tensor."""
    B, T, H, V = 2, 9, 24, 70
    full = torch.randn(B, T + 1, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    t[1, -3:] = -100
    lp = fused_linear_logp(full[:, :-1], w, t, backend=backend)
    assert lp.shape == (B, T)
    lp.sum().backward()
    ref = fused_linear_logp_ref(full.detach()[:, :-1], w.detach(), t)[0]
    torch.testing.assert_close(lp.detach().double(), ref, atol=2e-5, rtol=2e-5)
    assert bool((full.grad[:, -1] == 0).all()) and bool((full.grad[1, -4:-1] == 0).all())
    h64 = full.detach().double().requires_grad_()
    fused_linear_logp_ref(h64[:, :-1], w.detach().double(), t)[0].sum().backward()
    torch.testing.assert_close(full.grad.double(), h64.grad.double(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logp_only_gradient_and_entropy_flag(backend):
    h, w, b, t = _inputs(13, 16, 40, torch.float32)
    h.requires_grad_()
    lp = fused_linear_logp(h, w, t, b, backend=backend)
    assert isinstance(lp, torch.Tensor) and lp.shape == (13,)
    (gh,) = torch.autograd.grad(lp.sum(), h)
    h64 = h.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(fused_linear_logp_ref(h64, w, t, b)[0].sum(), h64)
    torch.testing.assert_close(gh.double(), ref, atol=3e-5, rtol=1e-4)


def test_triton_large_odd_vocab():
    """V = 4099 (odd, not a multiple of any tile) over many vocab chunks, against the reference."""
    h, w, b, t = _inputs(5, 16, 4099, torch.float32, n_ignored=1)
    lp, ent = fused_linear_logp(h, w, t, b, with_entropy=True, backend="triton")
    r_lp, r_ent = fused_linear_logp_ref(h, w, t, b)
    torch.testing.assert_close(lp.double(), r_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=2e-5, rtol=2e-5)


def test_torch_qwen_vocab_and_chunk_bound(monkeypatch):
    """V = 152064: the fallback never builds logits for more than chunk_size rows, forward or backward."""
    h, w, b, t = _inputs(9, 8, 152064, torch.float32)
    rows = []
    real = tfl.F.linear
    monkeypatch.setattr(tfl.F, "linear", lambda x, *a: rows.append(x.shape[0]) or real(x, *a))
    h.requires_grad_()
    lp, ent = fused_linear_logp(h, w, t, b, with_entropy=True, backend="torch", chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    assert max(rows) == 4 and len(rows) == 6  # 3 chunks forward, 3 backward
    r_lp, r_ent = fused_linear_logp_ref(h.detach(), w, t, b)
    torch.testing.assert_close(lp.detach().double(), r_lp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.detach().double(), r_ent, atol=1e-4, rtol=2e-5)
    assert tfl.default_logp_chunk_rows(152064) == 13


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_offsets_beyond_int32(backend):
    """hidden rows and weight rows that start past 2**31 elements: every pointer offset must be int64 (forward and
    backward). The storages are only reserved (untouched pages of an empty tensor); the rows read are small."""
    N, H, V, stride = 3, 16, 5, 2**31 + 97
    src_h, src_w, _, t = _inputs(N, H, V, torch.bfloat16, bias=False, n_ignored=0)
    big_h = torch.empty(stride * (N - 1) // 2 + H + stride, dtype=torch.bfloat16)
    h = big_h.as_strided((N, H), (stride // 2, 1))  # rows 0, 1, 2 at 0, ~2**30, ~2**31 + 97 elements
    big_w = torch.empty(stride * (V - 1) // 4 + H, dtype=torch.bfloat16)
    w = big_w.as_strided((V, H), (stride // 4, 1))  # the last row past 2**31 elements
    h.copy_(src_h)
    w.copy_(src_w)
    assert h.stride(0) * (N - 1) > 2**31 and w.stride(0) * (V - 1) > 2**31
    g_lp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ref = _loss_grads(lambda h_, w_: fused_linear_logp_ref(h_, w_, t), (src_h, src_w), g_lp, g_ent)
    h.requires_grad_()  # on the strided views themselves (a clone would be contiguous)
    w.requires_grad_()
    lp, ent = fused_linear_logp(h, w, t, with_entropy=True, backend=backend)
    assert h.stride(0) == stride // 2 and w.stride(0) == stride // 4
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    got = (lp.detach(), ent.detach(), torch.autograd.grad(loss, [h, w]))
    tol = _TOL[torch.bfloat16]
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
    for gg, rr in zip(got[2], ref[2]):
        torch.testing.assert_close(gg.double(), rr.double(), atol=tol * max(rr.abs().max().item(), 1.0), rtol=0)


def test_empty_rows():
    w = torch.randn(10, 4)
    for backend in ("torch", "triton"):
        lp = fused_linear_logp(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long), backend=backend)
        assert lp.shape == (0,)


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"hidden": torch.randn(3, 4, dtype=torch.float64), "weight": torch.randn(10, 4, dtype=torch.float64),
          "backend": "triton"}, TypeError, "backend='triton'"),
    ({"hidden": torch.randn(3, 5)}, ValueError, "weight must have shape"),
    ({"weight": torch.randn(10, 4, dtype=torch.float16)}, TypeError, "weight must have hidden's dtype"),
    ({"targets": torch.zeros(3)}, TypeError, "targets must be an integer"),
    ({"targets": torch.zeros(4, dtype=torch.long)}, ValueError, "targets must have hidden's leading shape"),
    ({"targets": torch.tensor([0, 10, 1])}, ValueError, "targets must lie in"),
    ({"targets": torch.tensor([0, -1, 1])}, ValueError, "targets must lie in"),
    ({"bias": torch.randn(9)}, ValueError, "bias must have shape"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"with_entropy": 1}, TypeError, "with_entropy"),
    ({"ignore_index": -100.0}, TypeError, "ignore_index"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"hidden": [[1.0]]}, TypeError, "hidden must be a torch.Tensor"),
])
def test_bad_input_named_before_launch(kwargs, exc, words, monkeypatch):
    import pgpo_kernels.fused_logp as fl

    def boom(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(fl, "logp_forward", boom)
    monkeypatch.setattr(fl, "fused_linear_logp_torch", boom)
    args = {"hidden": torch.randn(3, 4), "weight": torch.randn(10, 4), "targets": torch.tensor([0, 9, -100])}
    args.update(kwargs)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace("[", r"\[")):
        fused_linear_logp(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_qwen_shape_against_reference(dtype):
    """The compiled kernels at V = 152064 (not a multiple of 1024), H = 3584, odd N, with ignored rows and entropy."""
    N, H, V = 129, 3584, 152064
    h, w, _, t = (x.cuda() if x is not None else None for x in _inputs(N, H, V, dtype, bias=False, n_ignored=5))
    g_lp = torch.randn(N, dtype=torch.float64, device="cuda")
    g_ent = torch.randn(N, dtype=torch.float64, device="cuda")
    got = _loss_grads(lambda h_, w_: fused_linear_logp(h_, w_, t, temperature=0.9, with_entropy=True,
                                                       backend="triton"), (h, w), g_lp, g_ent)
    ref = _loss_grads(lambda h_, w_: fused_linear_logp_ref(h_, w_, t, None, 0.9), (h, w), g_lp, g_ent)
    tol = 5e-5 if dtype == torch.float32 else _TOL[dtype]
    torch.testing.assert_close(got[0].double(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].double(), ref[1], atol=tol, rtol=tol)
    for gg, rr in zip(got[2], ref[2]):
        scale = rr.abs().max().item()
        torch.testing.assert_close(gg.double(), rr.double(), atol=tol * max(scale, 1.0), rtol=0)
