"""pgpo_token_weights: KL then reshape, against the float64 reference; errors before any launch."""

import sys

import pytest
import torch

from pgpo_kernels import pgpo_token_weights
from pgpo_kernels.reference import pgpo_token_weights_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reference import token_kl_ref

_BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_matches_reference(backend, dtype):
    a, b = torch.randn(3, 17, 1031).to(dtype), torch.randn(3, 17, 1031).to(dtype)
    mask = torch.rand(3, 17) > 0.3
    w, kl = pgpo_token_weights(a, b, mask, temperature=0.9, backend=backend)
    w_ref, kl_ref = pgpo_token_weights_ref(a, b, mask, temperature=0.9)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.sum(1), mask.sum(1).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_packed_matches_reference(backend):
    a, b = torch.randn(40, 257), torch.randn(40, 257)
    cu = torch.tensor([0, 9, 9, 33, 40], dtype=torch.int32)
    w, kl = pgpo_token_weights(a, b, cu_seqlens=cu, tau=0.2, beta=1.0, backend=backend)
    kl_ref = token_kl_ref(a, b)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.double(), reshape_weights_ref(kl_ref, cu_seqlens=cu, tau=0.2, beta=1.0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_image_irrelevant_gives_uniform_weights(backend):
    # identical passes: the image changed nothing, every KL is 0, so PGPO reduces to plain GRPO/DAPO weights
    a = torch.randn(2, 11, 300)
    w, kl = pgpo_token_weights(a, a.clone(), torch.ones(2, 11, dtype=torch.bool), backend=backend)
    assert kl.abs().max().item() < 1e-6
    torch.testing.assert_close(w, torch.ones(2, 11))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 5\)"),
        (dict(tau=2.0), ValueError, "tau must lie in"),
        (dict(beta=-0.5), ValueError, "beta must be >= 0"),
    ],
)
def test_bad_input_raises_before_kl_launch(monkeypatch, kwargs, err, match):
    mod = sys.modules["pgpo_kernels.weights"]
    launched = []
    monkeypatch.setattr(mod, "token_kl", lambda *a, **k: launched.append(1))
    a, b = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    mask = kwargs.pop("mask", None)
    with pytest.raises(err, match=match):
        pgpo_token_weights(a, b, mask, backend="triton", **kwargs)
    assert not launched


def test_needs_batch_layout():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        pgpo_token_weights(torch.randn(5, 64), torch.randn(5, 64), None)


def test_packed_reads_cu_seqlens_once(monkeypatch):
    # the packed layout validates cu_seqlens on the host (a sync); the reshape must not validate it a second time
    import pgpo_kernels.reshape as reshape_mod

    calls = []
    real = reshape_mod.check_cu_seqlens
    monkeypatch.setattr(reshape_mod, "check_cu_seqlens", lambda *args: calls.append(1) or real(*args))
    a, b = torch.randn(10, 33), torch.randn(10, 33)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    w, _ = pgpo_token_weights(a, b, cu_seqlens=cu, backend="torch")
    assert len(calls) == 1
    torch.testing.assert_close(w[:4].sum(), torch.tensor(4.0))
    torch.testing.assert_close(w[4:].sum(), torch.tensor(6.0))
