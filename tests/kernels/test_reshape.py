"""reshape_weights (Triton under the interpreter, and torch) against the float64 reference and the properties of
docs/method.md#reshape."""

import pytest
import torch

from pgpo_kernels import reshape_weights
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reshape import reshape_weights_forward

_BACKENDS = ["triton", "torch"]
# (tau, beta, renormalize): paper default, its sweep corners, boosting-only (tau 0), suppression-only (tau 1), off
_PARAMS = [(0.4, 2.0, True), (0.2, 1.0, True), (0.6, 2.0, True), (0.0, 2.0, True), (1.0, 2.0, True),
           (0.4, 0.0, True), (0.4, 2.0, False)]


def _scores(shape):
    return torch.rand(shape).pow(3) * 5.0  # skewed, like KLs


def _padded_batch(B=6, T=53):
    s = _scores((B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # empty sequence
    mask[2] = False
    mask[2, 7] = True  # single valid token
    s[3] = 0.7  # all-equal scores
    s[4, 11] = float("inf")  # +inf is the maximum
    mask[4, 11] = True
    return s, mask


@pytest.mark.parametrize("tau, beta, renormalize", _PARAMS)
@pytest.mark.parametrize("backend", _BACKENDS)
def test_padded_matches_reference(tau, beta, renormalize, backend):
    s, mask = _padded_batch()
    out = reshape_weights(s, mask, tau=tau, beta=beta, renormalize=renormalize, backend=backend)
    ref = reshape_weights_ref(s, mask, tau=tau, beta=beta, renormalize=renormalize)
    assert out.dtype == torch.float32 and out.shape == s.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", _BACKENDS)
def test_dtypes_and_no_mask(dtype, backend):
    s = _scores((3, 40)).to(dtype)
    out = reshape_weights(s, backend=backend)
    torch.testing.assert_close(out.double(), reshape_weights_ref(s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_packed_matches_reference(backend):
    cu = torch.tensor([0, 5, 5, 40, 41, 100, 1130], dtype=torch.int32)
    s = _scores(1130)
    s[50:60] = 0.25  # a run of equal scores inside a sequence
    out = reshape_weights(s, cu_seqlens=cu, backend=backend)
    ref = reshape_weights_ref(s, cu_seqlens=cu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_long_sequence_loops_in_chunks():
    # a 33k-token sequence next to a short one: the kernel loops over chunks (BLOCK_T small to force many)
    cu = torch.tensor([0, 33000, 33017], dtype=torch.int32)
    s = _scores(33017)
    ref = reshape_weights_ref(s, cu_seqlens=cu)
    for block_t in (None, 64):
        out = reshape_weights_forward(s, None, cu, 0.4, 2.0, 1e-6, True, block_t=block_t)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_strided_padded_scores():
    s_wide, mask = _scores((4, 90)), torch.rand(4, 45) > 0.2
    s = s_wide[:, ::2]  # non-contiguous scores
    out = reshape_weights(s, mask, backend="triton")
    torch.testing.assert_close(out.double(), reshape_weights_ref(s, mask), rtol=1e-5, atol=1e-5)


# %% docs/method.md#reshape properties, on both backends -----------------------------------------------------
@pytest.mark.parametrize("backend", _BACKENDS)
def test_mass_conservation_and_padding_zero(backend):
    s, mask = _padded_batch()
    out = reshape_weights(s, mask, backend=backend)
    torch.testing.assert_close(out.sum(1), mask.sum(1).float(), rtol=1e-5, atol=1e-4)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", _BACKENDS)
def test_order_preservation(backend):
    s = _scores((4, 200))
    out = reshape_weights(s, backend=backend)
    for i in range(4):
        order = torch.argsort(s[i])
        assert (out[i, order].diff() >= -1e-6).all()


@pytest.mark.parametrize("backend", _BACKENDS)
def test_padding_isolation(backend):
    s, mask = _padded_batch()
    s2 = s.clone()
    s2[~mask] = torch.rand(int((~mask).sum())) * 1e6  # garbage at padding changes nothing
    s2[1] = float("nan")  # even nan in a fully padded row
    torch.testing.assert_close(reshape_weights(s2, mask, backend=backend), reshape_weights(s, mask, backend=backend))


@pytest.mark.parametrize("backend", _BACKENDS)
def test_degenerate_rows_uniform(backend):
    s, mask = _padded_batch()
    out = reshape_weights(s, mask, backend=backend)
    assert out[2, 7].item() == 1.0 and out[2].sum().item() == 1.0  # single valid token
    assert torch.all(out[3][mask[3]] == 1.0)  # all-equal scores
    assert (out[1] == 0).all()  # no valid token at all
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("backend", _BACKENDS)
def test_inf_is_the_maximum(backend):
    s = _scores((1, 30))
    s[0, 4] = float("inf")
    out = reshape_weights(s, tau=0.4, beta=2.0, renormalize=False, backend=backend)
    assert out[0, 4].item() == pytest.approx(3.0, rel=1e-5)  # I = 1 -> 1 + beta
    assert (out[0, torch.arange(30) != 4] == 0).all()  # finite scores sit at I = 0 beside +inf


@pytest.mark.parametrize("backend", _BACKENDS)
def test_tiny_scores_keep_their_spread(backend):
    # log1p must stay accurate for tiny KLs: 1e-9 vs 1e-8 is a real spread, not a degenerate row
    s = torch.tensor([[1e-9, 5e-9, 1e-8]])
    out = reshape_weights(s, renormalize=False, backend=backend)
    torch.testing.assert_close(out.double(), reshape_weights_ref(s, renormalize=False), rtol=1e-4, atol=1e-4)
    assert out[0, 0] < out[0, 1] < out[0, 2]


@pytest.mark.parametrize("backend", _BACKENDS)
def test_empty_batches(backend):
    assert reshape_weights(torch.zeros(0, 5), backend=backend).shape == (0, 5)
    assert reshape_weights(torch.zeros(3, 0), backend=backend).shape == (3, 0)
    out = reshape_weights(torch.zeros(0), cu_seqlens=torch.zeros(1, dtype=torch.int32), backend=backend)
    assert out.shape == (0,)


# %% bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(tau=1.5), ValueError, "tau must lie in"),
        (dict(tau=-0.1), ValueError, "tau must lie in"),
        (dict(beta=-1.0), ValueError, "beta must be >= 0"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(mask=torch.ones(4, 9, dtype=torch.bool)), ValueError, r"mask must have shape \(4, 10\)"),
        (dict(mask=torch.ones(4, 10)), TypeError, "mask must be a bool"),
        (dict(cu_seqlens=torch.tensor([0, 2, 40], dtype=torch.int32)), ValueError, r"packed scores must have shape"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_padded(kwargs, err, match):
    with pytest.raises(err, match=match):
        reshape_weights(torch.rand(4, 10), **kwargs)


@pytest.mark.parametrize(
    "cu, err, match",
    [
        (torch.tensor([0, 5, 3, 10], dtype=torch.int32), ValueError, "non-decreasing"),
        (torch.tensor([1, 5, 10], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 5, 9], dtype=torch.int32), ValueError, r"cu_seqlens\[-1\] must equal"),
        (torch.tensor([0.0, 10.0]), TypeError, "cu_seqlens must be int32"),
    ],
)
def test_bad_cu_seqlens(cu, err, match):
    with pytest.raises(err, match=match):
        reshape_weights(torch.rand(10), cu_seqlens=cu, backend="triton")


def test_scores_wrong_rank_and_dtype():
    with pytest.raises(ValueError, match=r"padded scores must have shape \[B, T\]"):
        reshape_weights(torch.rand(10))
    with pytest.raises(TypeError, match="scores must be a floating"):
        reshape_weights(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="either mask"):
        reshape_weights(torch.rand(10), torch.ones(10, dtype=torch.bool), cu_seqlens=torch.tensor([0, 10]))
