"""The project's non-finite and bad-parameter rules (docs/method.md#nonfinite, #reshape-edge-cases) on every op.

Logit ops (token_kl and its gradient, token_stats full and k3, fused_linear_*, pgpo_token_weights):
  NaN or +inf anywhere in a row of either input -> every output of that row NaN, other rows untouched;
  huge finite logits (+-max of fp32 / bf16) -> the true value (float64 oracle), finite or +inf, never 0 or NaN;
  -inf as in docs/method.md#nonfinite (all -inf row of a -> 0, all -inf row of b -> +inf).
Reshape: a NaN, -inf or < -1 score at a valid position -> NaN weights for that sequence only, padding 0.
Parameters: real, finite, in range, with the argument's name in the error; renormalize a bool.
Gradients: token_kl differentiable; token_stats / reshape / pgpo_token_weights outputs carry no grad_fn.

The torch backend is checked for every op; the reshape and the parameter checks on both backends (Triton in the
interpreter). `test_logit_rules_triton` holds the same logit-op cases for the Triton kernels, whose fixes live on
other branches (token_kl, token_stats): judge it after the merge.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pgpo_kernels.reshape as reshape_mod
import pgpo_kernels.weights as weights_mod
from pgpo_kernels import fused_linear_token_kl
from pgpo_kernels import fused_linear_token_stats
from pgpo_kernels import pgpo_token_weights
from pgpo_kernels import reshape_weights
from pgpo_kernels import token_kl
from pgpo_kernels import token_stats
from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reference import token_entropy_ref
from pgpo_kernels.reference import token_kl_grad_ref
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.reference import token_logprob_ref

BACKENDS = ["torch", "triton"]
NAN, INF = math.nan, math.inf
V = 37  # odd: a ragged last block on the Triton side
TAU, BETA, EPS = 0.4, 2.0, 1e-6


# %% logit rows: one case per row, other rows must stay exact ---------------------------------------------------
def _logit_rows(dtype: torch.dtype):
    """(a, b, target, bad) [R, V]: one rule per row. bad[r]: the row holds a NaN or +inf (expect NaN everywhere)."""
    big = torch.finfo(dtype).max if dtype in (torch.float32, torch.bfloat16) else 6e4
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, V, generator=g) * 2
    b = a + torch.randn(16, V, generator=g)
    tgt = torch.randint(0, V, (16,), generator=g)
    a[1, 5] = NAN
    a[2, 7] = INF
    b[3, 3] = NAN
    b[4, 9] = INF
    # huge finite: p on token 0, q on token 1 -> KL ~ 2 max, +inf in fp32
    a[5, 0], a[5, 1], b[5, 0], b[5, 1] = big, -big, -big, big
    # huge finite with a finite KL ~ max / 2: p = (1/2, 1/2, 0..), q = (1, 0, ..), log q_1 = -max
    a[6], b[6] = -big, -big
    a[6, 0], a[6, 1], b[6, 0], b[6, 1] = big, big, big, 0.0
    # huge and equal: KL 0, never NaN
    a[7] = a[7].sign() * big
    b[7] = a[7]
    # an -inf target; a finite where b = -inf -> +inf
    a[8, 2] = -INF
    b[8, 4] = -INF
    tgt[8] = 2
    a[9] = -INF  # all -inf row of a: no distribution -> 0 (logp -inf)
    b[10] = -INF  # all -inf row of b with finite a -> +inf
    # NaN wins over the all -inf rule
    a[11] = -INF
    b[11, 0] = NAN
    a[12, 0] = NAN
    b[12] = -INF
    a[13, 3] = b[13, 3] = -INF  # both -inf at the same token: fine
    a[14] *= 1e30  # large but far from overflow
    b[14] = a[14] + torch.randn(V, generator=g) * 1e30
    a[15, 11] = -big  # one huge negative logit, the rest ordinary
    a, b = a.to(dtype), b.to(dtype)
    # rows 1-4, 11, 12; in fp16 also row 14 (it overflows to +-inf)
    bad = (torch.isnan(a) | (a == INF) | torch.isnan(b) | (b == INF)).any(-1)
    return a, b, tgt, bad


def _oracle(a, b, tgt, temperature):
    """float64 (logp, logp_txt, entropy, kl) from centred log-softmaxes, the -inf rules (docs/method.md#nonfinite)
    written out.

    pgpo_kernels.reference computes lse(a) = max + log(sum) uncentred: next to a logit of 3.4e38 float64 drops the
    log-sum (ulp 4e22), e.g. KL max instead of max / 2 on row 6, log-prob 0 instead of -log 2. This oracle keeps
    every term relative to the row's max, so it is exact for any fp32 input; it is checked against the reference
    on the rows without huge logits."""
    logp = torch.log_softmax(a.double() / temperature, -1)
    logq = torch.log_softmax(b.double() / temperature, -1)
    p = logp.exp()
    support = a != -INF
    kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
    kl = torch.where((support & (b == -INF)).any(-1), INF, kl)
    ent = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    no_a, no_b = ~support.any(-1), (b == -INF).all(-1)
    kl, ent = torch.where(no_a, 0.0, kl).clamp_min(0.0), torch.where(no_a, 0.0, ent)
    lp = torch.where(no_a, -INF, logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))  # our choice: -inf
    lq = torch.where(no_b, -INF, logq.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
    return lp, lq, ent, kl


def _expected(a, b, tgt, bad, temperature):
    """The oracle with NaN rows applied: (logp, logp_txt, entropy, kl, k3), each [R] float64."""
    lp, lq, ent, kl = _oracle(a, b, tgt, temperature)
    def small(t):  # the reference is exact only while float64 keeps log(sum) next to the max
        return torch.where(torch.isfinite(t), t.double().abs(), 0.0).amax(-1) < 1e6

    plain = ~bad & small(a) & small(b)
    plain &= ~(a == -INF).all(-1) & ~(b == -INF).all(-1)  # the reference gives NaN for these (no distribution)
    for mine, ref in ((kl, token_kl_ref(a, b, temperature)), (ent, token_entropy_ref(a, temperature)),
                      (lp, token_logprob_ref(a, tgt, temperature)), (lq, token_logprob_ref(b, tgt, temperature))):
        torch.testing.assert_close(mine[plain], ref[plain], rtol=1e-9, atol=1e-9)  # the oracle itself
    k3 = k3_kl_ref(lp.float(), lq.float())  # k3 is defined on the fp32 log-probs the ops return
    return tuple(torch.where(bad, NAN, v) for v in (lp, lq, ent, kl, k3))


def _close(got, want):
    got = got.double()
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN rows differ: got {got}, want {want}"
    torch.testing.assert_close(got, want.float().double(), rtol=2e-5, atol=2e-5, equal_nan=True)


def _check_logit_ops(backend: str, dtype: torch.dtype, temperature: float) -> None:
    a, b, tgt, bad = _logit_rows(dtype)
    lp, _, ent, kl, k3 = _expected(a, b, tgt, bad, temperature)
    _close(token_kl(a, b, temperature=temperature, backend=backend), kl)
    st = token_stats(a, b, tgt, temperature=temperature, backend=backend)
    _close(st.logp, lp)
    _close(st.entropy, ent)
    _close(st.kl, kl)
    k3_got = token_stats(a, b, tgt, temperature=temperature, estimator="k3", backend=backend).kl
    # k3 = r - 1 - log r from log r = logp_txt - logp: near |logp| ~ 1e5 one fp32 ulp of either log-prob moves it,
    # so rows with such log-probs are held to the verdict only (NaN, +inf or finite), the others to the value
    fine = lp.abs() < 1e3
    _close(k3_got[fine], k3[fine])
    assert torch.equal(torch.isnan(k3_got), torch.isnan(k3)) and torch.equal(torch.isinf(k3_got), torch.isinf(k3))


def _check_fused_linear(backend: str, temperature: float) -> None:
    # the lm_head is the identity: the logits are the hidden states exactly (no -inf rows: 0 * -inf is NaN)
    a, b, tgt, bad = _logit_rows(torch.float32)
    rows = [0, 1, 2, 3, 4, 5, 6, 7, 14, 15]
    a, b, tgt, bad = a[rows], b[rows], tgt[rows], bad[rows]
    eye = torch.eye(V)
    bad = bad | ~torch.isfinite(a).all(-1) | ~torch.isfinite(b).all(-1)  # +inf * 0 = NaN spreads over the row
    lp, _, ent, kl, k3 = _expected(a, b, tgt, bad, temperature)
    _close(fused_linear_token_kl(a, b, eye, temperature=temperature, chunk_size=3, backend=backend), kl)
    st = fused_linear_token_stats(a, b, eye, tgt, temperature=temperature, chunk_size=3, backend=backend)
    _close(st.logp, lp)
    _close(st.entropy, ent)
    _close(st.kl, kl)
    st = fused_linear_token_stats(a, b, eye, tgt, temperature=temperature, estimator="k3", backend=backend)
    fine = lp.abs() < 1e3  # as in _check_logit_ops
    _close(st.kl[fine], k3[fine])
    assert torch.equal(torch.isnan(st.kl), torch.isnan(k3)) and torch.equal(torch.isinf(st.kl), torch.isinf(k3))


def _check_kl_gradient(backend: str, dtype: torch.dtype, temperature: float) -> None:
    a, b, _, bad = _logit_rows(dtype)
    rows = [0, 1, 2, 3, 4, 6, 7, 9, 13, 14, 15]  # not the +inf KL rows (no derivative: NaN, an older rule)
    a, b, bad = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_(), bad[rows]
    kl = token_kl(a, b, temperature=temperature, backend=backend)
    assert kl.grad_fn is not None  # token_kl stays differentiable
    grad_out = torch.linspace(0.5, 1.5, len(rows))
    kl.backward(grad_out)
    ga, gb = token_kl_grad_ref(a.detach(), b.detach(), grad_out, temperature)
    no_a = (a == -INF).all(-1, keepdim=True)  # no distribution: KL is the constant 0, its gradient 0 (our choice)
    for got, want in ((a.grad, ga), (b.grad, gb)):
        want = torch.where(bad.unsqueeze(-1), NAN, torch.where(no_a, 0.0, want))
        assert torch.equal(torch.isnan(got).all(-1), bad) and not torch.isnan(got[~bad]).any()
        torch.testing.assert_close(got[~bad].double(), want[~bad].to(dtype).double(), rtol=2e-2 if
                                   dtype == torch.bfloat16 else 2e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])  # 0.7: x / T overflows fp32 on the huge rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logit_rules_torch(dtype, temperature):
    _check_logit_ops("torch", dtype, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_rules_torch(temperature):
    _check_fused_linear("torch", temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_gradient_rules_torch(dtype, temperature):
    _check_kl_gradient("torch", dtype, temperature)


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_logit_rules_torch_compiled(dtype, temperature, monkeypatch):
    # the compiled fast path (torch.compile of the per-chunk blocks) gives the same verdicts as the eager one
    import pgpo_kernels.torch_fallback.compile as tc

    monkeypatch.setenv("PGPO_TORCH_COMPILE", "1")
    monkeypatch.setattr(tc, "_failed", set())
    with _no_compile_warning():
        _check_logit_ops("torch", dtype, temperature)


class _no_compile_warning:
    """Fails the test if torch.compile fell back to eager (then the compiled path was not tested at all)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        failed = [w for w in self._log if "torch.compile of pgpo_kernels" in str(w.message)]
        if failed and exc[0] is None:
            pytest.skip(f"torch.compile does not work here: {failed[0].message}")
        return False


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_rules_triton(dtype, temperature):
    """The same rows on the Triton kernels (interpreter). Fixed on the kl / stats branches: judge after the merge."""
    _check_logit_ops("triton", dtype, temperature)
    if dtype == torch.float32:
        _check_fused_linear("triton", temperature)
        _check_kl_gradient("triton", dtype, temperature)
    _check_token_weights("triton")


def test_token_stats_carries_no_gradient_torch():
    a, b, tgt, _ = _logit_rows(torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    for estimator in ("full", "k3"):
        st = token_stats(a, b, tgt, estimator=estimator, backend="torch")
        assert all(t.grad_fn is None and not t.requires_grad for t in st)


# %% pgpo_token_weights: the KL's verdict reaches the weights of that sequence only --------------------------------
def _check_token_weights(backend: str) -> None:
    a, b, _, _ = _logit_rows(torch.float32)
    la = torch.stack([a[[0, 13, 14, 15, 0]], a[[0, 1, 14, 15, 13]], a[[6, 7, 14, 0, 3]]])  # [3, 5, V]
    lb = torch.stack([b[[0, 13, 14, 15, 0]], b[[0, 1, 14, 15, 13]], b[[6, 7, 14, 0, 3]]])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False  # a NaN logit at padding changes nothing
    la.requires_grad_()
    w, kl = pgpo_token_weights(la, lb, mask, tau=TAU, beta=BETA, eps=EPS, backend=backend)
    assert w.grad_fn is None and kl.grad_fn is None
    assert torch.isnan(w[1]).all(), "a NaN logit must make its sequence's weights NaN"
    assert torch.isnan(kl[1, 1]) and torch.isnan(kl[2, 4])
    kl_ref = _oracle(la.detach().reshape(-1, V), lb.reshape(-1, V), torch.zeros(15, dtype=torch.long), 1.0)[3]
    kl_ref = kl_ref.reshape(3, 5)
    for seq in (0, 2):
        want = reshape_weights_ref(kl_ref[seq:seq + 1], mask[seq:seq + 1], tau=TAU, beta=BETA, eps=EPS)[0]
        _close(w[seq], want)
    assert w[2, 4] == 0


def test_token_weights_rules_torch():
    _check_token_weights("torch")


# %% reshape: both backends ------------------------------------------------------------------------------------------
def _min_rule_weights(scores: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Our choice for a score of exactly -1 (log1p = -inf, the sequence minimum): I = 0 there, 1 elsewhere."""
    s = torch.log1p(scores.double())
    I = torch.where(s == -INF, 0.0, 1.0)
    w = torch.where(I < TAU, I / (TAU + EPS), 1.0 + BETA * (I - TAU) / (1.0 - TAU + EPS))
    w = w.double()
    return w * s.numel() / w.sum() if renormalize else w


def _score_batch():
    """(scores [8, 6], mask, kind per sequence): 'bad' (NaN weights), 'ref' (the float64 oracle), 'min' (-1)."""
    s = torch.rand(8, 6) * 3
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[:, 5] = False
    mask[0, 3] = False
    s[1, 1] = NAN
    s[2, 3] = -INF
    s[3, 0] = -2.5  # log1p undefined
    s[4, 5] = NAN  # at padding: ignored
    s[5, 2] = INF  # the maximum
    s[6, 1] = -1.0  # log1p = -inf: the minimum (our choice)
    s[7, 4] = -0.5  # in [-1, 0): accepted as is
    return s, mask, ["ref", "bad", "bad", "bad", "ref", "ref", "min", "ref"]


def _check_weights(out, s, mask, kinds, renormalize):
    assert out.grad_fn is None
    for i, kind in enumerate(kinds):
        valid = mask[i]
        assert (out[i][~valid] == 0).all(), "padding stays 0"
        if kind == "bad":
            assert torch.isnan(out[i][valid]).all(), f"sequence {i}: a bad score must give NaN weights"
            continue
        assert torch.isfinite(out[i][valid]).all(), f"sequence {i} must not be touched by another's bad score"
        if kind == "min":
            want = _min_rule_weights(s[i][valid], renormalize)
        else:
            want = reshape_weights_ref(s[i][valid].unsqueeze(0), tau=TAU, beta=BETA, eps=EPS,
                                       renormalize=renormalize)[0]
        torch.testing.assert_close(out[i][valid].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reshape_rules_padded(backend, renormalize):
    s, mask, kinds = _score_batch()
    s.requires_grad_()  # the weights never carry a gradient
    out = reshape_weights(s, mask, tau=TAU, beta=BETA, eps=EPS, renormalize=renormalize, backend=backend)
    _check_weights(out, s.detach(), mask, kinds, renormalize)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reshape_rules_packed(backend, renormalize):
    s, mask, kinds = _score_batch()
    lens = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    packed = s[mask].clone().requires_grad_()
    out = reshape_weights(packed, cu_seqlens=cu, tau=TAU, beta=BETA, eps=EPS, renormalize=renormalize,
                          backend=backend)
    padded = torch.zeros_like(s)
    padded[mask] = out.detach()
    assert out.grad_fn is None
    _check_weights(padded, s, mask, kinds, renormalize)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reshape_long_sequence_bad_score_in_a_later_chunk(backend):
    # the kernel loops over a sequence in chunks: a NaN far from the start still poisons the whole sequence
    s = torch.rand(2, 3000)
    s[0, 2900] = NAN
    out = reshape_weights(s, backend=backend)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[1].double(), reshape_weights_ref(s[1:])[0], rtol=1e-5, atol=1e-5)


# %% parameter checks: both backends, before any launch ------------------------------------------------------------
_BAD_TEMPERATURE = [(INF, ValueError), (True, TypeError), ("1.0", TypeError),
                    (None, TypeError), (torch.tensor(1.0), TypeError)]
_BAD_RESHAPE = [
    ("tau", "0.4", TypeError), ("tau", True, TypeError), ("tau", None, TypeError),
    ("beta", INF, ValueError), ("beta", "2", TypeError), ("beta", False, TypeError),
    ("eps", INF, ValueError), ("eps", True, TypeError), ("eps", "1e-6", TypeError),
    ("renormalize", "no", TypeError), ("renormalize", 1, TypeError), ("renormalize", None, TypeError),
]


def _no_launch(monkeypatch):
    """Any kernel or fallback launch after the checks would fail the test."""
    def boom(*args, **kwargs):
        raise AssertionError("launched before the arguments were checked")

    monkeypatch.setattr(reshape_mod, "reshape_weights_forward", boom)
    monkeypatch.setattr(reshape_mod, "reshape_weights_torch", boom)
    monkeypatch.setattr(weights_mod, "token_kl", boom)
    monkeypatch.setattr(weights_mod, "token_stats", boom)


def _logit_op_calls(temperature, backend):
    a, b = torch.randn(2, 3, V), torch.randn(2, 3, V)
    tgt = torch.randint(0, V, (2, 3))
    eye = torch.eye(V)
    return [
        lambda: token_kl(a, b, temperature=temperature, backend=backend),
        lambda: token_stats(a, b, tgt, temperature=temperature, backend=backend),
        lambda: fused_linear_token_kl(a, b, eye, temperature=temperature, backend=backend),
        lambda: fused_linear_token_stats(a, b, eye, tgt, temperature=temperature, backend=backend),
        lambda: pgpo_token_weights(a, b, temperature=temperature, backend=backend),
    ]


@pytest.mark.parametrize("temperature, exc", _BAD_TEMPERATURE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_is_checked(backend, temperature, exc, monkeypatch):
    _no_launch(monkeypatch)
    for call in _logit_op_calls(temperature, backend):
        with pytest.raises(exc, match="temperature"):
            call()


@pytest.mark.parametrize("name, value, exc", _BAD_RESHAPE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reshape_params_are_checked(backend, name, value, exc, monkeypatch):
    _no_launch(monkeypatch)
    kwargs = {"tau": TAU, "beta": BETA, "eps": EPS, "renormalize": True, name: value}
    s = torch.rand(2, 5)
    with pytest.raises(exc, match=name):
        reshape_weights(s, backend=backend, **kwargs)
    with pytest.raises(exc, match=name):
        reshape_weights(s.reshape(-1), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), backend=backend,
                        **kwargs)
    with pytest.raises(exc, match=name):
        pgpo_token_weights(torch.randn(2, 5, V), torch.randn(2, 5, V), backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_number_types_accepted(backend):
    # not a rule case but its limit: ints and numpy scalars are real numbers, accepted, same result as the float
    s = torch.rand(2, 9)
    want = reshape_weights(s, tau=0.5, beta=2.0, eps=1e-6, backend=backend)
    got = reshape_weights(s, tau=np.float32(0.5), beta=2, eps=np.float64(1e-6), backend=backend)
    torch.testing.assert_close(got, want)
    a, b = torch.randn(3, V), torch.randn(3, V)
    torch.testing.assert_close(token_kl(a, b, temperature=np.float64(1.0), backend="torch"),
                               token_kl(a, b, temperature=1, backend="torch"))


def test_compile_policy(monkeypatch):
    # auto: small chunks never compile, a large one compiles from its second call; 0 never; 1 always
    import pgpo_kernels.torch_fallback.compile as tc

    monkeypatch.setattr(tc, "_large_calls", {})

    def fn():
        pass

    monkeypatch.setenv("PGPO_TORCH_COMPILE", "auto")
    assert not tc.wants_compile(fn, tc.COMPILE_MIN_ELEMS - 1)
    assert not tc.wants_compile(fn, tc.COMPILE_MIN_ELEMS)  # one-off calls stay eager
    assert tc.wants_compile(fn, tc.COMPILE_MIN_ELEMS)
    monkeypatch.setenv("PGPO_TORCH_COMPILE", "0")
    assert not tc.wants_compile(fn, 1 << 30)
    monkeypatch.setenv("PGPO_TORCH_COMPILE", "1")
    assert tc.wants_compile(fn, 1)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    # a compiler that fails (no C++ compiler, no Triton on a GPU) warns once and the eager path gives the values
    import pgpo_kernels.torch_fallback.compile as tc

    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("no working C++ compiler")
        return run

    monkeypatch.setenv("PGPO_TORCH_COMPILE", "1")
    monkeypatch.setattr(tc, "_compiled", {})
    monkeypatch.setattr(tc, "_failed", set())
    monkeypatch.setattr(tc.torch, "compile", broken_compile)
    a, b, tgt, bad = _logit_rows(torch.float32)
    with pytest.warns(RuntimeWarning, match="no working C"):
        kl = token_kl(a, b, backend="torch")
    _close(kl, _expected(a, b, tgt, bad, 1.0)[3])
    import warnings

    from pgpo_kernels.torch_fallback.token_kl import kl_block

    assert kl_block in tc._failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not retried, not warned again
        _close(token_kl(a, b, backend="torch"), _expected(a, b, tgt, bad, 1.0)[3])
