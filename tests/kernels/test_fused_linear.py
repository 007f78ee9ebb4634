"""fused_linear_token_kl / fused_linear_token_stats (KL and stats from hidden states, no [N, V] logits).

Truth: the float64 lm_head (linear_logits_ref) then the float64 oracles. The Triton kernel accumulates tl.dot in fp32
and never rounds logits, so it is checked tightly for every dtype; the torch fallback rounds each logit chunk to the
input dtype (as an unfused lm_head does), so it is checked against the oracle applied to those rounded logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pgpo_kernels.torch_fallback.fused_linear as tfo
from pgpo_kernels import fused_linear_token_kl
from pgpo_kernels import fused_linear_token_stats
from pgpo_kernels import token_stats
from pgpo_kernels.fused_linear import fused_linear_forward
from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import linear_logits_ref
from pgpo_kernels.reference import token_entropy_ref
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.reference import token_logprob_ref
from pgpo_kernels.torch_fallback.fused_linear import default_chunk_rows

_SHAPE_PARAMS = [(1, 16, 7), (37, 40, 150), (20, 72, 33)]  # N, H, V: odd sizes leave ragged row/col/H tiles
_DTYPE_PARAMS = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-3, 2e-3), (torch.float16, 5e-4, 5e-4)]
_TRITON_ATOL = 2e-5  # fp32 accumulation of exactly representable products: only summation order differs


def _inputs(N, H, V, dtype, bias=True, lead=None):
    hv = torch.randn(N, H)
    ht = hv + 0.7 * torch.randn(N, H)
    w = torch.randn(V, H) / math.sqrt(H) * 3
    b = torch.randn(V) if bias else None
    if lead is not None:
        hv, ht = hv.reshape(*lead, H), ht.reshape(*lead, H)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hv), cast(ht), cast(w), cast(b)


def _ranges(st, V):
    assert bool((st.logp <= 0).all()) and bool((st.kl >= 0).all())
    assert bool((st.entropy >= 0).all()) and bool((st.entropy <= math.log(V) * (1 + 1e-6)).all())


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype, atol, rtol", _DTYPE_PARAMS)
@pytest.mark.parametrize("N, H, V", _SHAPE_PARAMS)
def test_triton_matches_float64_lm_head(N, H, V, dtype, atol, rtol, has_bias):
    hv, ht, w, b = _inputs(N, H, V, dtype, has_bias)
    la, lb = linear_logits_ref(hv, w, b), linear_logits_ref(ht, w, b)
    kl = fused_linear_token_kl(hv, ht, w, b, temperature=0.8, backend="triton")
    assert kl.shape == (N,) and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), token_kl_ref(la, lb, 0.8), atol=_TRITON_ATOL, rtol=1e-5)
    tgt = torch.randint(0, V, (N,))
    st = fused_linear_token_stats(hv, ht, w, tgt, b, temperature=0.8, backend="triton")
    torch.testing.assert_close(st.logp.double(), token_logprob_ref(la, tgt, 0.8), atol=_TRITON_ATOL, rtol=1e-5)
    torch.testing.assert_close(st.entropy.double(), token_entropy_ref(la, 0.8), atol=_TRITON_ATOL, rtol=1e-5)
    torch.testing.assert_close(st.kl, kl)
    _ranges(st, V)


@pytest.mark.parametrize("dtype, atol, rtol", _DTYPE_PARAMS)
def test_torch_fallback_matches_unfused_lm_head(dtype, atol, rtol):
    N, H, V = 37, 40, 301
    hv, ht, w, b = _inputs(N, H, V, dtype)
    la, lb = F.linear(hv, w, b), F.linear(ht, w, b)  # [N, V] in the input dtype, as an unfused model would have
    kl = fused_linear_token_kl(hv, ht, w, b, temperature=1.3, chunk_size=8, backend="torch")
    torch.testing.assert_close(kl.double(), token_kl_ref(la, lb, 1.3), atol=1e-5, rtol=1e-5)
    tgt = torch.randint(0, V, (N,))
    st = fused_linear_token_stats(hv, ht, w, tgt, b, temperature=1.3, chunk_size=8, backend="torch")
    torch.testing.assert_close(st.logp.double(), token_logprob_ref(la, tgt, 1.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.entropy.double(), token_entropy_ref(la, 1.3), atol=1e-5, rtol=1e-5)
    # and close to the exact (float64 lm_head) answer within the input dtype's rounding of the logits
    exact = token_kl_ref(linear_logits_ref(hv, w, b), linear_logits_ref(ht, w, b), 1.3)
    torch.testing.assert_close(kl.double(), exact, atol=atol * 10, rtol=rtol * 10)
    _ranges(st, V)


def test_triton_many_tiles_and_chunks_and_row_launches():
    # force small tiles so each program loops over several vocab tiles and H steps, plus 3 vocab chunks and 2 launches
    N, H, V = 40, 48, 200
    hv, ht, w, b = _inputs(N, H, V, torch.bfloat16)
    tgt = torch.randint(0, V, (N,))
    tgt[:4] = torch.tensor([0, V - 1, 63, 64])  # tile and chunk borders
    la, lb = linear_logits_ref(hv, w, b), linear_logits_ref(ht, w, b)
    # GROUP_N = 2 over 2 and then 1 row blocks per launch: a full and a ragged launch group
    cfg = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "CHUNK_TILES": 4, "GROUP_N": 2}
    kl, logp, logq, ent = fused_linear_forward(hv, ht, w, b, tgt, 1.0, chunk_rows=24, n_chunks=3, config=cfg)
    torch.testing.assert_close(kl.double(), token_kl_ref(la, lb), atol=_TRITON_ATOL, rtol=1e-5)
    torch.testing.assert_close(logp.double(), token_logprob_ref(la, tgt), atol=_TRITON_ATOL, rtol=1e-5)
    torch.testing.assert_close(logq.double(), token_logprob_ref(lb, tgt), atol=_TRITON_ATOL, rtol=1e-5)
    torch.testing.assert_close(ent.double(), token_entropy_ref(la), atol=_TRITON_ATOL, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leading_dims_k3_and_agreement_with_token_stats(backend):
    B, T, H, V = 2, 5, 24, 90
    hv, ht, w, b = _inputs(B * T, H, V, torch.float32, lead=(B, T))
    tgt = torch.randint(0, V, (B, T))
    st = fused_linear_token_stats(hv, ht, w, tgt, b, estimator="k3", backend=backend)
    assert st.kl.shape == (B, T)
    la, lb = linear_logits_ref(hv, w, b), linear_logits_ref(ht, w, b)
    torch.testing.assert_close(st.kl.double(), k3_kl_ref(token_logprob_ref(la, tgt), token_logprob_ref(lb, tgt)),
                               atol=1e-5, rtol=1e-4)
    via_logits = token_stats(F.linear(hv, w, b), F.linear(ht, w, b), tgt, estimator="k3", backend=backend)
    for x, y in zip(st, via_logits):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_logits_and_noncontiguous_hidden(backend):
    # hidden states as a strided view (every other row of a bigger buffer); large logits: shift invariance in fp32
    N, H, V = 12, 32, 64
    big = torch.randn(2 * N, H) * 20
    hv, ht = big[::2], big[1::2]
    w = torch.randn(V, H)
    b = torch.full((V,), 1e4)  # adds 1e4 to every logit: KL unchanged
    kl = fused_linear_token_kl(hv, ht, w, b, backend=backend)
    ref = token_kl_ref(linear_logits_ref(hv, w), linear_logits_ref(ht, w))
    torch.testing.assert_close(kl.double(), ref, atol=2e-3, rtol=2e-3)  # fp32 logits near 1e4 keep ~1e-3
    assert bool((kl >= 0).all())


def test_fallback_chunks_honour_chunk_size(monkeypatch):
    # peak extra memory is O(chunk x V): the lm_head is only ever applied to chunk_size rows at once
    seen = []
    real = F.linear

    def spy(x, weight, bias=None):
        seen.append(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(tfo.F, "linear", spy)
    hv, ht, w, b = _inputs(23, 16, 50, torch.float32)
    fused_linear_token_kl(hv, ht, w, b, chunk_size=5, backend="torch")
    assert max(seen) == 5 and sum(seen) == 2 * 23


def test_default_chunk_from_free_memory(monkeypatch):
    monkeypatch.setattr(tfo, "free_memory_bytes", lambda device: 4 << 30)  # 4 GiB free
    rows = default_chunk_rows(152064, 2, torch.device("cpu"))
    per_row = 152064 * (2 * 2 + 16)
    assert rows == int((4 << 30) * tfo.FREE_MEMORY_SHARE) // per_row  # 352 rows of Qwen2.5 vocab in bf16
    monkeypatch.setattr(tfo, "free_memory_bytes", lambda device: 0)
    assert default_chunk_rows(152064, 2, torch.device("cpu")) == 1
    monkeypatch.setattr(tfo, "free_memory_bytes", lambda device: 1 << 50)
    assert default_chunk_rows(10, 4, torch.device("cpu")) == tfo.MAX_CHUNK_ROWS
    assert tfo.free_memory_bytes(torch.device("cpu")) > 0  # the real host query


def test_no_gradient_flows():
    hv, ht, w, b = _inputs(4, 16, 20, torch.float32)
    w.requires_grad_(True)
    assert not fused_linear_token_kl(hv, ht, w, b, backend="torch").requires_grad


def test_errors_name_the_argument():
    hv, ht, w, b = _inputs(4, 16, 20, torch.float32)
    tgt = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden_txt must have the shape of hidden_vis"):
        fused_linear_token_kl(hv, ht[:3], w, backend="torch")
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \[V, H\] = \[V, 16\]"):
        fused_linear_token_kl(hv, ht, w[:, :8], backend="torch")
    with pytest.raises(TypeError, match="lm_head_weight must have hidden_vis's dtype"):
        fused_linear_token_kl(hv, ht, w.double(), backend="torch")
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[20\]"):
        fused_linear_token_kl(hv, ht, w, b[:5], backend="torch")
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        fused_linear_token_kl(hv, ht, w, chunk_size=0, backend="torch")
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        fused_linear_token_kl(hv.double(), ht.double(), w.double(), backend="triton")
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V\)"):
        fused_linear_token_stats(hv, ht, w, tgt + 20, backend="torch")
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        fused_linear_token_kl(hv, ht, w, temperature=0.0, backend="torch")


def test_float64_torch_backend_is_exact():
    hv, ht, w, b = _inputs(6, 16, 30, torch.float64)
    kl = fused_linear_token_kl(hv, ht, w, b, backend="torch")
    ref = token_kl_ref(linear_logits_ref(hv, w, b), linear_logits_ref(ht, w, b))
    torch.testing.assert_close(kl.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N", [5, 2048])
def test_gpu_qwen_shapes_and_memory(N):
    # Qwen2.5-VL-7B's lm_head in bf16; the reference recomputes 16 evenly spread rows in float64 on the CPU
    H, V = 3584, 152064
    hv, ht, w, _ = _inputs(N, H, V, torch.bfloat16, bias=False)
    hv, ht, w = hv.cuda(), ht.cuda(), w.cuda()
    tgt = torch.randint(0, V, (N,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    st = fused_linear_token_stats(hv, ht, w, tgt)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.10 * (2 * N * V * 2), f"extra {extra} B vs unfused bf16 logits {2 * N * V * 2} B"
    rows = torch.arange(0, N, max(1, N // 16))
    la, lb = linear_logits_ref(hv[rows].cpu(), w.cpu()), linear_logits_ref(ht[rows].cpu(), w.cpu())
    torch.testing.assert_close(st.kl[rows].cpu().double(), token_kl_ref(la, lb), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.logp[rows].cpu().double(), token_logprob_ref(la, tgt[rows].cpu()), atol=1e-3,
                               rtol=1e-4)
    torch.testing.assert_close(st.entropy[rows].cpu().double(), token_entropy_ref(la), atol=1e-3, rtol=1e-4)
    _ranges(st, V)


# %% non-finite and huge inputs on the Triton path (the project's rules 2-4 and 7; the interpreter runs the kernels)
def _log_softmax_ref(la, lb, tgt):
    """float64 truth via log_softmax (row max subtracted first: logits near +-3e38 do not cancel)."""
    lpa, lpb = la.log_softmax(-1), lb.log_softmax(-1)
    p = lpa.exp()
    zero = torch.zeros((), dtype=torch.float64)
    kl = torch.where(p > 0, p * (lpa - lpb), zero).sum(-1).clamp_min(0.0)
    ent = -torch.where(p > 0, p * lpa, zero).sum(-1)
    return lpa.gather(-1, tgt.unsqueeze(-1)).squeeze(-1), ent.clamp_min(0.0), kl


@pytest.mark.parametrize("bad", ["nan_hidden_vis", "inf_hidden_txt", "nan_bias"])
def test_triton_nan_or_inf_input_makes_the_row_nan(bad):
    # rule 2: a NaN or +inf logit in a row -> every output of that row NaN (before: 0 or finite garbage)
    N, H, V = 6, 32, 70
    hv, ht, w, b = _inputs(N, H, V, torch.float32)
    tgt = torch.randint(0, V, (N,))
    rows = torch.tensor([2]) if bad != "nan_bias" else torch.arange(N)
    if bad == "nan_hidden_vis":
        hv[2, 5] = float("nan")
    elif bad == "inf_hidden_txt":
        ht[2, 0] = float("inf")  # +-inf logits in that row of the text pass: +inf among them -> NaN
    else:
        b[33] = float("nan")  # a NaN column: every row
    st = fused_linear_token_stats(hv, ht, w, tgt, b, backend="triton")
    for out in st:
        assert torch.isnan(out[rows]).all(), (bad, st)
    ok = torch.ones(N, dtype=torch.bool)
    ok[rows] = False
    la, lb = linear_logits_ref(hv[ok], w, b), linear_logits_ref(ht[ok], w, b)
    torch.testing.assert_close(st.kl[ok].double(), token_kl_ref(la, lb), atol=_TRITON_ATOL, rtol=1e-5)
    k3 = fused_linear_token_stats(hv, ht, w, tgt, b, estimator="k3", backend="triton").kl
    assert torch.isnan(k3[rows]).all()


def test_triton_huge_finite_logits_give_the_true_values():
    # rule 3: a bias of +-3e38 makes huge finite logits: the true values (finite, or +inf where they overflow fp32)
    N, H, V = 5, 16, 40
    hv, ht, w, _ = _inputs(N, H, V, torch.float32, bias=False)
    b = torch.zeros(V)
    b[3], b[7], b[20:30] = 3e38, -3e38, 1e38
    tgt = torch.tensor([3, 7, 25, 0, 3])
    st = fused_linear_token_stats(hv, ht, w, tgt, b, temperature=0.8, backend="triton")
    kl = fused_linear_token_kl(hv, ht, w, b, temperature=0.8, backend="triton")
    la, lb = linear_logits_ref(hv, w, b) / 0.8, linear_logits_ref(ht, w, b) / 0.8
    for name, got, ref in zip(("logp", "entropy", "kl"), st, _log_softmax_ref(la, lb, tgt)):
        assert not torch.isnan(got).any(), (name, got)
        over = ref.abs() > torch.finfo(torch.float32).max
        assert torch.equal(torch.isinf(got), over), (name, got, ref)
        torch.testing.assert_close(got.double()[~over], ref[~over], atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(kl, st.kl)


def test_triton_outputs_carry_no_grad_and_temperature_is_checked():
    # rules 7 and 4 on the Triton path
    hv, ht, w, b = _inputs(4, 16, 20, torch.float32)
    w.requires_grad_(True)
    hv.requires_grad_(True)
    st = fused_linear_token_stats(hv, ht, w, torch.zeros(4, dtype=torch.long), b, backend="triton")
    assert all(x.grad_fn is None and not x.requires_grad for x in st)
    assert fused_linear_token_kl(hv, ht, w, b, backend="triton").grad_fn is None
    for temperature, err in ((float("inf"), ValueError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(err, match="temperature"):
            fused_linear_token_kl(hv, ht, w, b, temperature=temperature, backend="triton")
