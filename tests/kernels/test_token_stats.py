"""token_stats (log pi(target), entropy, KL in one read) and the k3 estimator against the float64 oracles.

Triton runs in the interpreter on CPU (conftest), so shapes stay small; one odd shape exercises the padded lanes.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgpo_kernels import TokenStats
from pgpo_kernels import k3_kl
from pgpo_kernels import pgpo_token_weights
from pgpo_kernels import token_stats
from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import pgpo_token_weights_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reference import token_entropy_ref
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.reference import token_logprob_ref
from pgpo_kernels.token_stats import token_stats_forward

BACKENDS = ["torch", "triton"]
_SHAPE_PARAMS = [(1, 1, 7), (2, 3, 64), (2, 5, 1271)]  # B, T, V; 1271 is odd: a ragged last block
_DTYPE_PARAMS = [(torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5)]  # dtype, atol (+ rtol 1e-5)


def _pair(shape, dtype, scale=3.0):
    a = torch.randn(shape) * scale
    b = a + torch.randn(shape)
    return a.to(dtype), b.to(dtype)


def _refs(a, b, tgt, temperature):
    return (token_logprob_ref(a, tgt, temperature), token_entropy_ref(a, temperature),
            token_kl_ref(a, b, temperature))


def _assert_ranges(st: TokenStats, n_cols: int):
    """docs/method.md#trainer-traps: a fused log-prob kernel returning positive log-probs collapsed a verl run."""
    assert bool((st.logp <= 0).all()), "log-probs must be <= 0"
    assert bool((st.kl >= 0).all()), "KL must be >= 0"
    assert bool((st.entropy >= 0).all()), "entropy must be >= 0"
    assert bool((st.entropy <= math.log(n_cols) * (1 + 1e-6)).all()), "entropy must be <= log V"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", _DTYPE_PARAMS)
@pytest.mark.parametrize("B, T, V", _SHAPE_PARAMS)
def test_matches_reference(B, T, V, dtype, atol, backend):
    a, b = _pair((B, T, V), dtype)
    tgt = torch.randint(0, V, (B, T))
    st = token_stats(a, b, tgt, temperature=0.7, backend=backend)
    assert isinstance(st, TokenStats)
    for got, ref in zip(st, _refs(a, b, tgt, 0.7)):
        assert got.shape == (B, T) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=1e-5)
    _assert_ranges(st, V)


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
def test_triton_split_vocab_matches_one_pass(n_chunks):
    # several vocab chunks per row (the few-rows launch shape); the target lands in different chunks
    V = 5000  # > MAX_BLOCK_V: two blocks per row, so both the in-chunk loop and the combine run
    a, b = _pair((3, V), torch.float32)
    tgt = torch.tensor([0, 2500, V - 1])
    logp, logq, ent, kl = token_stats_forward(a, b, tgt, 1.0, n_chunks=n_chunks)
    ref = _refs(a, b, tgt, 1.0)
    for got, r in zip((logp, ent, kl), ref):
        torch.testing.assert_close(got.double(), r, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logq.double(), token_logprob_ref(b, tgt), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nasty_rows(backend):
    V = 300
    a, b = _pair((6, V), torch.float32)
    a[0, :100] = float("-inf")  # masked vocab entries in a: contribute nothing
    b[0, :50] = float("-inf")  # ... and in b where a is -inf too: still finite KL
    a[1] = float("-inf")  # no distribution: KL 0, entropy 0, logp -inf (our choice)
    b[2, 7] = float("-inf")  # a finite where b = -inf: KL = +inf
    a[3] += 1e4  # huge logits: shift invariance must hold in fp32
    b[3] += 1e4
    a[4] = 0.0  # uniform: entropy = log V exactly
    a[5, 11] = 60.0  # one-hot-like: entropy ~ 0, logp(11) ~ 0 (clamped <= 0)
    tgt = torch.tensor([150, 3, 7, 10, 0, 11])
    st = token_stats(a, b, tgt, backend=backend)
    ref = _refs(a, b, tgt, 1.0)
    for got, r in zip(st, ref):
        ok = torch.isfinite(r)
        torch.testing.assert_close(got.double()[ok], r[ok], atol=5e-5, rtol=1e-5)
    assert st.kl[1] == 0 and st.entropy[1] == 0 and st.logp[1] == float("-inf")
    assert st.kl[2] == float("inf")
    assert abs(float(st.entropy[4]) - math.log(V)) < 1e-5
    target_on_masked = token_stats(a[:1], b[:1], torch.tensor([5]), backend=backend)
    assert target_on_masked.logp[0] == float("-inf")  # pi(target) = 0
    _assert_ranges(st, V)


@pytest.mark.parametrize("backend, n_chunks", [("torch", None), ("triton", 1), ("triton", 3)])
def test_infinite_kl_survives_underflow(backend, n_chunks):
    a, b = torch.randn(2, 9000), torch.randn(2, 9000)
    b[0, 10] = float("-inf")  # infinite term in the first block, then the max of a jumps: the rescale underflows
    a[0, 5000] = 500.0
    a[1, 4096:8192] -= 300.0  # a whole vocab chunk far below the max holds the infinite term
    b[1, 5000] = float("-inf")
    target = torch.zeros(2, dtype=torch.long)
    if backend == "triton":
        kl = token_stats_forward(a, b, target, 1.0, n_chunks=n_chunks)[3]
    else:
        kl = token_stats(a, b, target, backend=backend).kl
    assert torch.isinf(token_kl_ref(a, b)).all()
    assert torch.isinf(kl).all() and (kl > 0).all(), kl


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranges_bf16_peaked(backend):
    # bf16 logits with large magnitudes: the regime where a sloppy kernel returns logp > 0 or KL < 0
    a, b = _pair((4, 8, 512), torch.bfloat16, scale=30.0)
    tgt = a.float().argmax(-1)  # the most likely token: logp ~ 0, the place rounding pushes it positive
    st = token_stats(a, b, tgt, backend=backend)
    _assert_ranges(st, 512)
    torch.testing.assert_close(st.logp.double(), token_logprob_ref(a, tgt), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_estimator(backend):
    a, b = _pair((3, 9, 100), torch.float32)
    tgt = torch.randint(0, 100, (3, 9))
    st = token_stats(a, b, tgt, estimator="k3", backend=backend)
    ref = k3_kl_ref(token_logprob_ref(a, tgt), token_logprob_ref(b, tgt))
    torch.testing.assert_close(st.kl.double(), ref, atol=1e-5, rtol=1e-4)
    full = token_stats(a, b, tgt, backend=backend)
    torch.testing.assert_close(st.logp, full.logp)
    assert bool((st.kl >= 0).all())


def test_k3_small_ratio_keeps_digits():
    # (r - 1) - log r ~ (log r)^2 / 2 for r near 1: naive fp32 would cancel to 0 or garbage
    lv = torch.tensor([-1.0, -2.0])
    lt = lv + torch.tensor([1e-4, -3e-3])
    torch.testing.assert_close(k3_kl(lv, lt).double(), k3_kl_ref(lv, lt), atol=0, rtol=1e-5)
    assert float(k3_kl(torch.tensor([-1.0]), torch.tensor([float("-inf")]))) == float("inf")


def test_k3_is_unbiased_for_the_full_kl():
    # the estimator's defining property: E_{x ~ pi_vis}[k3(x)] = KL(pi_vis || pi_txt); 200k draws, 5-sigma band
    a, b = _pair((1, 50), torch.float64, scale=1.5)
    lp, lq = a.log_softmax(-1)[0], b.log_softmax(-1)[0]
    x = torch.multinomial(lp.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    est = k3_kl(lp[x], lq[x]).double()
    kl = float(token_kl_ref(a, b)[0])
    assert abs(float(est.mean()) - kl) < 5 * float(est.std()) / math.sqrt(est.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pgpo_token_weights_k3(backend):
    a, b = _pair((2, 6, 40), torch.float32)
    tgt = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    w, s = pgpo_token_weights(a, b, mask, estimator="k3", target_ids=tgt, backend=backend)
    s_ref = k3_kl_ref(token_logprob_ref(a, tgt), token_logprob_ref(b, tgt))
    torch.testing.assert_close(s.double(), s_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.double(), reshape_weights_ref(s_ref, mask), atol=1e-4, rtol=1e-4)
    w_full, s_full = pgpo_token_weights(a, b, mask, backend=backend)
    w_ref, s_full_ref = pgpo_token_weights_ref(a, b, mask)
    torch.testing.assert_close(s_full.double(), s_full_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(w_full.double(), w_ref, atol=1e-4, rtol=1e-4)


def test_errors_name_the_argument():
    a, b = _pair((2, 3, 10), torch.float32)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target_ids must have the logits' leading shape"):
        token_stats(a, b, tgt[:, :2], backend="torch")
    with pytest.raises(TypeError, match="target_ids must be an integer"):
        token_stats(a, b, tgt.float(), backend="torch")
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V\)"):
        token_stats(a, b, tgt - 100, backend="torch")
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, V\)"):
        token_stats(a, b, tgt + 10, backend="triton")
    with pytest.raises(ValueError, match="estimator must be one of"):
        token_stats(a, b, tgt, estimator="k2", backend="torch")
    with pytest.raises(ValueError, match="logits_txt must have the shape"):
        token_stats(a, b[..., :5], tgt, backend="torch")
    with pytest.raises(ValueError, match="needs target_ids"):
        pgpo_token_weights(a, b, estimator="k3", backend="torch")
    with pytest.raises(ValueError, match="only used by estimator='k3'"):
        pgpo_token_weights(a, b, target_ids=tgt, backend="torch")


def test_torch_fallback_leaves_inputs_alone():
    a, b = _pair((2, 3, 10), torch.float32)
    a0, b0 = a.clone(), b.clone()
    token_stats(a, b, torch.zeros(2, 3, dtype=torch.long), temperature=0.5, backend="torch")
    assert torch.equal(a, a0) and torch.equal(b, b0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_rows", [1, 64, 4096])
def test_gpu_vocab_152064(n_rows):
    a, b = _pair((n_rows, 152064), torch.bfloat16)
    tgt = torch.randint(0, 152064, (n_rows,))
    st = token_stats(a.cuda(), b.cuda(), tgt.cuda())
    rows = torch.arange(0, n_rows, max(1, n_rows // 16))
    for got, ref in zip(st, _refs(a[rows], b[rows], tgt[rows], 1.0)):
        torch.testing.assert_close(got[rows].cpu().double(), ref, atol=1e-4, rtol=1e-4)
    _assert_ranges(st, 152064)


def test_k3_edge_cases_match_reference():
    # pi_txt = 0 < pi_vis -> +inf; pi_vis = 0 -> 0 (our choice), in the op and the oracle alike
    from pgpo_kernels import k3_kl
    from pgpo_kernels.reference import k3_kl_ref

    ninf = float("-inf")
    lv = torch.tensor([-0.5, -2.0, ninf, ninf, -1.0])
    lt = torch.tensor([ninf, -1.0, -3.0, ninf, -1.0])
    ref = k3_kl_ref(lv, lt)
    out = k3_kl(lv, lt)
    assert ref[0] == float("inf") and ref[2] == 0 and ref[3] == 0 and ref[4] == 0
    torch.testing.assert_close(out.double(), ref)


# %% non-finite and huge inputs on the Triton path (the project's rules 1-4 and 7; the interpreter runs the kernels)
_FLT_MAX = torch.finfo(torch.float32).max
_BF16_MAX = torch.finfo(torch.bfloat16).max


def _log_softmax_ref(a, b, tgt, temperature=1.0):
    """float64 truth via log_softmax (which subtracts the row max first), so logits near +-3e38 do not cancel as
    `sum p (a - b) - lse_a + lse_b` would: -> (logp, entropy, kl), each [N] float64."""
    la = (a.double() / temperature).log_softmax(-1)
    lb = (b.double() / temperature).log_softmax(-1)
    p = la.exp()
    zero = torch.zeros((), dtype=torch.float64)
    ent = -torch.where(p > 0, p * la, zero).sum(-1)
    kl = torch.where(p > 0, p * (la - lb), zero).sum(-1)
    logp = la.gather(-1, tgt.long().unsqueeze(-1)).squeeze(-1)
    return logp, ent.clamp_min(0.0), kl.clamp_min(0.0)


def _stats_triton(a, b, tgt, n_chunks, temperature=1.0):
    if n_chunks is None:
        return token_stats(a, b, tgt, temperature=temperature, backend="triton")
    logp, _, ent, kl = token_stats_forward(a, b, tgt, temperature, n_chunks=n_chunks)
    return TokenStats(logp, ent, kl)


@pytest.mark.parametrize("n_chunks", [None, 3])
@pytest.mark.parametrize("bad", ["nan_a", "nan_b", "posinf_a", "posinf_b", "nan_target", "nan_where_a_masked"])
def test_triton_nan_or_posinf_makes_the_row_nan(bad, n_chunks):
    # rule 2: a NaN or +inf anywhere in a row of either input -> every output of that row NaN (before: 0 / finite)
    V = 700
    a, b = _pair((4, V), torch.float32)
    tgt = torch.tensor([5, 650, 9, 100])
    a[1, :50] = float("-inf")
    row, col = 1, {"nan_a": 3, "nan_b": 640, "posinf_a": 699, "posinf_b": 0, "nan_target": 650,
                   "nan_where_a_masked": 10}[bad]
    t = b if bad.endswith("_b") or bad == "nan_where_a_masked" else a
    t[row, col] = float("inf") if bad.startswith("posinf") else float("nan")
    st = _stats_triton(a, b, tgt, n_chunks)
    for out in st:
        assert torch.isnan(out[row]), (bad, st)
    ok = torch.tensor([0, 2, 3])
    for got, ref in zip(st, _refs(a[ok], b[ok], tgt[ok], 1.0)):
        torch.testing.assert_close(got[ok].double(), ref, atol=2e-5, rtol=1e-5)
    k3 = token_stats(a, b, tgt, estimator="k3", backend="triton").kl
    assert torch.isnan(k3[row]) and torch.isfinite(k3[ok]).all()


@pytest.mark.parametrize("n_chunks", [None, 2])
def test_triton_whole_minus_inf_rows(n_chunks):
    # rule 1: an all -inf row of a -> kl 0, entropy 0, logp -inf; an all -inf row of b with finite a -> kl +inf
    a, b = _pair((3, 300), torch.float32)
    a[0] = float("-inf")
    b[1] = float("-inf")
    a[2] = float("-inf")
    b[2] = float("-inf")
    st = _stats_triton(a, b, torch.tensor([1, 2, 3]), n_chunks)
    assert st.kl[0] == 0 and st.entropy[0] == 0 and st.logp[0] == float("-inf")
    assert st.kl[1] == float("inf") and torch.isfinite(st.logp[1]) and torch.isfinite(st.entropy[1])
    assert st.kl[2] == 0 and st.entropy[2] == 0 and st.logp[2] == float("-inf")
    assert not any(torch.isnan(x).any() for x in st)


def _huge_rows(dtype):
    big = _BF16_MAX if dtype == torch.bfloat16 else torch.finfo(dtype).max if dtype == torch.float16 else 3e38
    V = 300
    a, b = _pair((6, V), torch.float32)
    a[0, 7], b[0, 7] = big, big  # one dominant entry in both: p = q ~ one-hot, KL ~ 0
    a[1, 3], a[1, 4], b[1, 4] = big, -big, big  # a and b peak on different entries: the true KL overflows fp32
    a[2] = -big  # a whole row at -max: uniform
    a[2, 11] = -big / 2
    b[2] = big
    a[3] += big / 2  # a shift by a huge constant keeps the KL (up to fp32 rounding of the shifted logits)
    b[3] += big / 2
    a[4, ::2], b[4, 1::2] = -big, -big  # +-max interleaved
    a[5, 0], b[5, 0] = big, -big  # p one-hot where q is ~0: KL ~ 2 big / T overflows; logp_txt too
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("n_chunks", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_huge_finite_logits_give_the_true_values(dtype, n_chunks):
    # rule 3: huge finite logits -> the true value (finite, or +inf where it overflows fp32); never 0, never NaN
    a, b = _huge_rows(dtype)
    tgt = torch.tensor([7, 4, 11, 0, 1, 0])
    st = _stats_triton(a, b, tgt, n_chunks, temperature=0.9)
    for name, got, ref in zip(("logp", "entropy", "kl"), st, _log_softmax_ref(a, b, tgt, 0.9)):
        assert not torch.isnan(got).any(), (name, got)
        over = ref.abs() > _FLT_MAX
        assert torch.equal(torch.isinf(got), over), (name, got, ref)
        torch.testing.assert_close(got.double()[~over], ref[~over], atol=1e-4, rtol=1e-4, msg=name)
        assert bool((got[ref != 0] != 0).all()), (name, got, ref)  # never a silent 0


def test_triton_outputs_carry_no_grad():
    # rule 7: weights, not a loss
    a, b = _pair((2, 3, 40), torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    st = token_stats(a, b, torch.zeros(2, 3, dtype=torch.long), backend="triton")
    assert all(x.grad_fn is None and not x.requires_grad for x in st)


@pytest.mark.parametrize("temperature, err", [(float("inf"), ValueError), (float("nan"), ValueError),
                                              (-1.0, ValueError), (0, ValueError), (True, TypeError),
                                              ("1.0", TypeError)])
def test_temperature_must_be_a_finite_positive_real(temperature, err):
    # rule 4, on the Triton path (before: inf accepted, "1.0" a raw comparison TypeError)
    a, b = _pair((2, 10), torch.float32)
    with pytest.raises(err, match="temperature"):
        token_stats(a, b, torch.zeros(2, dtype=torch.long), temperature=temperature, backend="triton")


# %% [B, T, V] views and temperature= (pgpo_train passes logits[:, :-1] in the model dtype, not logits.float() / T)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bf16_view_with_temperature_matches_the_old_fp32_path(backend):
    from pgpo_kernels.token_stats import _row_blocks
    from pgpo_kernels.utils import row_view

    B, T, V = 2, 5, 300
    full = (torch.randn(B, T + 1, V) * 4).bfloat16()  # the model's logits_to_keep=T+1 output
    full_txt = (full.float() + torch.randn(B, T + 1, V)).bfloat16()
    vis, txt = full[:, :-1], full_txt[:, :-1]  # strided views: no [N, V] row view exists
    tgt = torch.randint(0, V, (B, T))
    new = token_stats(vis, txt, tgt, temperature=0.7, backend=backend)
    old = token_stats(vis.float() / 0.7, txt.float() / 0.7, tgt, backend=backend)  # what train.py did before
    for n, o, ref in zip(new, old, _refs(vis, txt, tgt, 0.7)):
        assert n.shape == (B, T)
        torch.testing.assert_close(n, o, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(n.double(), ref, atol=2e-5, rtol=1e-5)
    # and neither backend copies the view: the kernels read it through a (batch, time) stride pair, the torch
    # fallback goes batch row by batch row
    rv = row_view(vis)
    assert rv.tensor.data_ptr() == full.data_ptr() and (rv.n_inner, rv.stride_outer, rv.stride_inner) == (T, (T + 1) * V, V)
    blocks = _row_blocks(vis, txt, tgt)
    assert len(blocks) == B and all(x.data_ptr() == full[i].data_ptr() for i, (x, _, _) in enumerate(blocks))


def test_row_view_layouts():
    from pgpo_kernels.utils import row_view

    x = torch.randn(3, 4, 5, 6)
    v = row_view(x)  # contiguous: rows of a [12, 5, 6] view
    assert v.n_rows == 60 and v.n_cols == 6 and v.tensor.data_ptr() == x.data_ptr()
    s = x[:, :, :-1]  # outer dims merge by a view, the time dim stays strided
    v = row_view(s)
    assert v.n_rows == 48 and (v.n_inner, v.stride_outer, v.stride_inner) == (4, 30, 6)
    assert v.tensor.data_ptr() == x.data_ptr()
    t = x.transpose(-1, -2)  # last stride != 1: one copy
    assert row_view(t).tensor.stride(-1) == 1
    assert row_view(torch.randn(7)).n_rows == 1 and row_view(torch.randn(0, 7)).n_rows == 0
