"""The torch fallback: same results as the Triton kernels, memory-frugal, for CPUs and where Triton cannot run.

Token KL works over row chunks, so it never holds a full fp32 copy of an [N, V] input: peak extra memory is a few
[chunk, V] fp32 buffers. Each chunk runs one of two fast paths, then fixes the rows they cannot do exactly:

- compiled (torch.compile of `kl_block`, see torch_compile.py), for large inputs where inductor works;
- eager, the plain formula with in-place ops (no more [chunk, V] passes than a hand-written eager KL).

Both fast paths give a non-finite KL for every row that needs care (an -inf, NaN or +inf logit, or a huge finite one
whose fp32 differences overflow), and only those rows are recomputed by `kl_block` in float64 with every rule
spelled out (docs/method.md#nonfinite): the -inf rules, NaN/+inf in a row -> NaN for that row, huge
finite logits -> the true value (finite, or +inf where it overflows fp32).

The reshape is vectorized over all sequences with segment reductions (scatter_reduce), for the padded and the packed
layout alike, under no_grad (the weights carry no gradient), with no host sync.
"""

from __future__ import annotations

import math

import torch

from pgpo_kernels.torch_compile import run_compiled

# Rows per chunk are chosen so that one fp32 [chunk, V] buffer stays near this many elements (64 MiB).
_CHUNK_ELEMS = 1 << 24


# The eager path works on smaller slices: its ~10 passes over a slice then hit the CPU's cache, not DRAM (measured
# 3-4x faster than one 64 MiB chunk at V = 32768, benchmarks/results/cpu-fallback-2026-11-30.md).
_EAGER_ELEMS = 1 << 17


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(n_cols, 1))


def eager_slices(n_rows: int, n_cols: int):
    """(lo, hi) row slices of about _EAGER_ELEMS elements (at least one row) covering n_rows."""
    step = max(1, min(_EAGER_ELEMS, _CHUNK_ELEMS) // max(n_cols, 1))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation whatever the input dtype (docs/method.md#kl-from-logits), fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centred_logp(t: torch.Tensor, dt: torch.dtype, temperature: float):
    """log_softmax(t / T) as (x - max) - log(sum(exp(x - max))), written out so that inductor fuses it into the
    reductions that use it instead of writing a [c, V] buffer -> (logp [c, V], x - max [c, V], log-sum [c, 1],
    max [c, 1]). The max also says what kind of row it is: NaN or +inf (a bad row), -inf (no mass), else finite."""
    x = t.to(dt) / temperature
    m = x.amax(-1, keepdim=True)  # propagates NaN
    xs = x - m  # centred: no cancellation of large logits
    lse = xs.exp().sum(-1, keepdim=True).log()
    return xs - lse, xs, lse, m


def kl_block(a: torch.Tensor, b: torch.Tensor, temperature: float, dt: torch.dtype) -> torch.Tensor:
    """[c, V] logits x2 -> [c] KL in dtype dt with every rule explicit; no data-dependent control flow (compilable).

    In float64 it is exact for any fp32/bf16/fp16 logits, huge ones included (their differences fit). In float32 a
    row that needs care (differences that overflow, a logit that overflows on / T, p_i underflowing where b_i = -inf)
    comes out non-finite, and the caller recomputes it in float64.
    """
    logp, _, _, m_a = centred_logp(a, dt, temperature)  # [c, V], [c, 1]
    logq, _, _, m_b = centred_logp(b, dt, temperature)
    zero = torch.zeros((), dtype=dt, device=a.device)
    # a_i = -inf contributes nothing (p_i = 0, never 0 * inf); any other 0 * inf is a NaN for the float64 redo
    kl = torch.where(a != -math.inf, logp.exp() * (logp - logq), zero).sum(-1)
    if dt == torch.float64:  # the exact pass: a finite a_i where b_i = -inf gives +inf even if p_i underflows
        kl = torch.where(((a != -math.inf) & (b == -math.inf)).any(-1), math.inf, kl)
    m_a, m_b = m_a.squeeze(-1), m_b.squeeze(-1)
    # an all -inf row of b (with mass in a) has no q: +inf
    kl = torch.where(m_b == -math.inf, math.inf, kl)
    # our choice (docs/method.md#nonfinite): an all -inf row of a has no distribution -> KL 0
    kl = torch.where(m_a == -math.inf, zero, kl).clamp_min(0.0)
    # NaN or +inf anywhere in either row (max NaN or +inf): the row's KL is NaN, never 0 or finite garbage
    return torch.where(~(m_a < math.inf) | ~(m_b < math.inf), math.nan, kl)


def _kl_plain(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain sum p * (log p - log q) in two [c, V] buffers, in place: finite exactly where no rule is needed.

    An -inf entry gives NaN (0 * inf) or +inf, a NaN or +inf logit NaN, an overflowing difference of huge logits
    -inf in log p (then 0 * inf = NaN) or in log q (+inf): every row that needs care comes out non-finite.
    """
    dt = compute_dtype(a.dtype)
    x, y = a.to(dt), b.to(dt)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    logp = x.log_softmax(-1)  # [c, V] new tensors: the inputs are never written
    diff = y.log_softmax(-1).neg_().add_(logp)  # log p - log q
    return logp.exp_().mul_(diff).sum(-1)


def fix_rows(out: torch.Tensor, special: torch.Tensor, exact) -> None:
    """Recompute the rows flagged by `special` ([c] bool) with exact(row_index) -> values; one host sync per chunk."""
    rows = special.nonzero().squeeze(-1)
    if rows.numel():
        out[rows] = exact(rows).to(out.dtype)


def _kl_rows(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: [c, V] logits x2 -> [c] KL in the compute dtype. Never writes into its inputs."""
    kl = run_compiled(kl_block, a.numel(), a, b, temperature, compute_dtype(a.dtype))
    if kl is None:
        kl = torch.cat([_kl_plain(a[lo:hi], b[lo:hi], temperature) for lo, hi in eager_slices(*a.shape)])
    fix_rows(kl, ~torch.isfinite(kl), lambda r: kl_block(a[r], b[r], temperature, torch.float64))
    return kl.clamp_min_(0.0)


def token_kl_torch(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(a / temp) || softmax(b / temp)) per row of [N, V] inputs -> [N] float32 (float64 for float64 in).

    No autograd graph (TokenKLFunction gives the gradient).
    """
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=compute_dtype(a.dtype), device=a.device)
    step = _rows_per_chunk(n_cols)
    with torch.no_grad():
        for lo in range(0, n_rows, step):
            hi = min(lo + step, n_rows)
            out[lo:hi] = _kl_rows(a[lo:hi], b[lo:hi], temperature)
    return out


def _segment_ids_packed(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)  # [total]


@torch.no_grad()  # weights carry no gradient (docs/method.md#reshape-edge-cases)
def reshape_weights_torch(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    tau: float,
    beta: float,
    eps: float,
    renormalize: bool,
) -> torch.Tensor:
    """The reshape over a padded [B, T] (+ mask) or packed [total] (+ cu_seqlens) batch -> float32, 0 at padding.

    A NaN, -inf or < -1 score (log1p undefined) in a valid position makes its sequence's weights NaN; +inf scores
    are the sequence maximum (I = 1), a score of exactly -1 (log1p = -inf) its minimum (I = 0). No host sync.
    """
    if cu_seqlens is not None:
        n_seq = cu_seqlens.numel() - 1
        seg = _segment_ids_packed(cu_seqlens, scores.numel())
        valid = torch.ones_like(scores, dtype=torch.bool)
    else:
        n_seq = scores.shape[0]
        seg = torch.arange(n_seq, device=scores.device).unsqueeze(1).expand_as(scores)
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    shape = scores.shape
    raw = scores.float().reshape(-1)
    s = torch.log1p(raw)  # log-compression, [N]
    seg, valid = seg.reshape(-1), valid.reshape(-1)
    inf = torch.tensor(math.inf, device=s.device)
    zeros = torch.zeros(n_seq, device=s.device)

    # 0. a score log1p cannot take (NaN, -inf, < -1) in a valid position poisons its sequence (NaN weights)
    bad_tok = valid & (torch.isnan(raw) | (raw < -1.0))
    bad = zeros.scatter_add(0, seg, bad_tok.float()) > 0  # [B]

    # 1. min, max and count over each sequence's valid tokens; padding never enters.
    m = zeros.scatter_reduce(0, seg, torch.where(valid, s, inf), "amin", include_self=False)  # [B]
    M = zeros.scatter_reduce(0, seg, torch.where(valid, s, -inf), "amax", include_self=False)  # [B]
    n_valid = zeros.scatter_add(0, seg, valid.float())  # [B]
    m_t, M_t = m[seg], M[seg]  # [N]

    # 2. min-max normalize; a +inf score is the sequence maximum (I = 1) and finite ones then sit at I = 0; failing
    # that, a -inf s (score -1) is the minimum (I = 0) and finite ones sit at I = 1 (both: the limits of the formula)
    I = torch.where(M_t == inf, (s == inf).float(),
                    torch.where(m_t == -inf, (s != -inf).float(), (s - m_t) / (M_t - m_t + eps)))
    # 3. gate: suppress below tau (ramp 0..1), amplify above (1 .. 1 + beta)
    w = torch.where(I < tau, I / (tau + eps), 1.0 + beta * (I - tau) / (1.0 - tau + eps))
    w = torch.where(valid, w, torch.zeros_like(w))

    # 4. renormalize to keep the mass: sum of weights = number of valid tokens
    total = zeros.scatter_add(0, seg, w)  # [B]
    # our choice (docs/method.md#reshape-edge-cases): all-equal, one token or zero mass -> weights 1
    degenerate = (n_valid <= 1) | (M == m) | ~(total > 0)
    scale = n_valid / total if renormalize else torch.ones_like(total)
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    out = torch.where(degenerate[seg], torch.ones_like(w), w * scale[seg])
    out = torch.where(bad[seg], torch.full_like(out, math.nan), out)
    out = torch.where(valid, out, torch.zeros_like(out))
    return out.reshape(shape)
