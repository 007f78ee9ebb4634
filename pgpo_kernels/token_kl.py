"""Per-token KL between two [N, V] logit tensors in one read of each, never building a softmax.

    KL(p || q) = sum_i p_i (log p_i - log q_i),  p = softmax(a / temp), q = softmax(b / temp)

One streaming pass over the vocabulary keeps, per row, the running max m and rescaled sum s of exp for a and for b
(online log-sum-exp, as flash-attention's softmax), and t = sum_i exp(a_i - m_a) * ((a_i - m_a) - (b_i - m_b)):
the p-weighted log-ratio kept *relative to the running maxes*, so large logits never cancel in fp32. When a max grows,
old terms are rescaled and shifted:

    t <- exp(m_a - m_a') * (t + s_a * ((m_a - m_a') - (m_b - m_b')))

and at the end KL = t / s_a - log s_a + log s_b. Everything runs in base 2 (differences scaled by log2(e) / temp) so
each element costs two exp2; maxes are subtracted before scaling. Bytes per row: V * (2 * itemsize) read, 4 written.

Two launch shapes: one program per row (many rows), or a split over vocab chunks (few rows: 1..64 rows of 152064
would leave most of an H100's 132 SMs idle) whose per-chunk stats a tiny kernel combines.

Backward (TokenKLFunction): dKL/da_j = p_j ((log p_j - log q_j) - KL) / T and dKL/db_j = (q_j - p_j) / T. Nothing
[N, V] is saved in forward; one program per row recomputes the stats (one read of both rows) and streams the row
again to write both gradients: bytes per row 2 * V * 2 * itemsize read, V * 2 * itemsize written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pgpo_kernels.torch_fused_ops import token_kl_backward_torch
from pgpo_kernels.torch_ops import token_kl_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import next_power_of_2
from pgpo_kernels.utils import resolve_backend

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2_C = tl.constexpr(LN2)  # globals read inside @triton.jit must be constexpr
MAX_BLOCK_V = 4096
N_STATS = 5  # per-chunk partial stats: m_a, s_a, m_b, s_b, t


# %% shared device helpers -----------------------------------------------------------------------------------------
@triton.jit
def _safe_max(m):
    # a max of -inf (nothing seen yet, or an all -inf row) is replaced by 0 wherever it offsets an exponent
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale_t(t, alpha, s_a, shift):
    """Carry the p-weighted log-ratio t over to a new max: alpha (t + s_a shift).

    An infinite t (a finite a_i where b_i = -inf) stays infinite even when alpha underflows to 0, and a finite t whose
    alpha is 0 (nothing seen yet, or mass far below the new max) adds nothing: never 0 * inf.
    """
    return tl.where(t == float("inf"), float("inf"), tl.where(alpha == 0.0, 0.0, alpha * (t + s_a * shift)))


@triton.jit
def _kl_stream(a_row_ptr, b_row_ptr, col_start, col_end, scale, BLOCK_V: tl.constexpr):
    """Stream columns [col_start, col_end) of one row -> (m_a, s_a, m_b, s_b, t).

    Maxes are in input units, sums and t in base 2 of the scaled logits (scale = log2(e) / temperature).
    """
    m_a = float("-inf")
    m_b = float("-inf")
    s_a = 0.0
    s_b = 0.0
    t = 0.0
    offs = tl.arange(0, BLOCK_V)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs
        in_row = cols < col_end
        # fp32 whatever the input dtype; padded lanes are -inf, which contribute nothing
        x = tl.load(a_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_m_a = tl.maximum(m_a, tl.max(x, axis=0))
        new_m_b = tl.maximum(m_b, tl.max(y, axis=0))
        ma_old, ma_new = _safe_max(m_a), _safe_max(new_m_a)
        mb_old, mb_new = _safe_max(m_b), _safe_max(new_m_b)
        # rescale factors of the old sums (0 when nothing was seen: s and t are 0 then, avoid inf * 0)
        alpha = tl.where(m_a == float("-inf"), 0.0, tl.exp2((m_a - ma_new) * scale))
        gamma = tl.where(m_b == float("-inf"), 0.0, tl.exp2((m_b - mb_new) * scale))
        # subtract the max before scaling: the rounding of a large logit * scale never enters the result
        xa = (x - ma_new) * scale
        yb = (y - mb_new) * scale
        ea = tl.exp2(xa)  # x = -inf -> 0
        eb = tl.exp2(yb)
        # p_i = 0 (a_i = -inf) contributes nothing, never 0 * inf; a finite a_i where b_i = -inf gives +inf (true KL)
        # even if 2^xa underflows
        term = tl.where(x == float("-inf"), 0.0, tl.where(y == float("-inf"), float("inf"), ea * (xa - yb)))
        shift = ((ma_old - ma_new) - (mb_old - mb_new)) * scale
        t = _rescale_t(t, alpha, s_a, shift) + tl.sum(term, axis=0)
        s_a = alpha * s_a + tl.sum(ea, axis=0)
        s_b = gamma * s_b + tl.sum(eb, axis=0)
        m_a = new_m_a
        m_b = new_m_b
    return m_a, s_a, m_b, s_b, t


@triton.jit
def _kl_finish(s_a, s_b, t):
    """KL in nats from base-2 stats; an all -inf row of a has no distribution (0), s_b = 0 < s_a means +inf."""
    kl = _LN2_C * (t / s_a - tl.log2(s_a) + tl.log2(s_b))
    kl = tl.where(s_b == 0.0, float("inf"), kl)
    kl = tl.where(s_a == 0.0, 0.0, kl)
    return tl.maximum(kl, 0.0)  # clamp tiny negative rounding


@triton.jit
def _load_chunk_stats(base, ok):
    """The first five per-chunk stats (m_a, s_a, m_b, s_b, t) at base [C]; absent chunks load as empty ones."""
    m_a = tl.load(base + 0, mask=ok, other=float("-inf"))
    s_a = tl.load(base + 1, mask=ok, other=0.0)
    m_b = tl.load(base + 2, mask=ok, other=float("-inf"))
    s_b = tl.load(base + 3, mask=ok, other=0.0)
    t = tl.load(base + 4, mask=ok, other=0.0)
    return m_a, s_a, m_b, s_b, t


@triton.jit
def _merge_chunks(m_a, s_a, m_b, s_b, t, scale):
    """Merge per-chunk stats [C] with the streaming update's rescale-and-shift rule.

    Returns (M_a, M_b, S_a, S_b, t_all, alpha, shift_a): the overall maxes (-inf replaced by 0), the merged sums and
    t, and each chunk's rescale factor and shift of a, for callers that merge more a-sums with the same rule.
    """
    M_a = _safe_max(tl.max(m_a, axis=0))
    M_b = _safe_max(tl.max(m_b, axis=0))
    alpha = tl.where(m_a == float("-inf"), 0.0, tl.exp2((m_a - M_a) * scale))
    gamma = tl.where(m_b == float("-inf"), 0.0, tl.exp2((m_b - M_b) * scale))
    shift_a = (_safe_max(m_a) - M_a) * scale
    shift = shift_a - (_safe_max(m_b) - M_b) * scale
    t_all = tl.sum(_rescale_t(t, alpha, s_a, shift), axis=0)
    return M_a, M_b, tl.sum(alpha * s_a, axis=0), tl.sum(gamma * s_b, axis=0), t_all, alpha, shift_a


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _token_kl_fwd_kernel(
    a_ptr,  # [N, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [N, V] logits of the text-only pass
    out_ptr,  # [N] float32 KL
    n_cols,  # V
    stride_a_row,
    stride_b_row,
    scale,  # log2(e) / temperature
    BLOCK_V: tl.constexpr,
):
    # widen the row id before multiplying by a stride: N * V can pass 2**31
    row = tl.program_id(0).to(tl.int64)
    m_a, s_a, m_b, s_b, t = _kl_stream(a_ptr + row * stride_a_row, b_ptr + row * stride_b_row, 0, n_cols, scale,
                                       BLOCK_V)
    tl.store(out_ptr + row, _kl_finish(s_a, s_b, t))


@triton.jit
def _token_kl_partial_kernel(
    a_ptr,  # [N, V]
    b_ptr,  # [N, V]
    part_ptr,  # [N, C, 5] float32 partial stats
    n_cols,
    stride_a_row,
    stride_b_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    n_chunks,  # C
    scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    m_a, s_a, m_b, s_b, t = _kl_stream(a_ptr + row * stride_a_row, b_ptr + row * stride_b_row, col_start, col_end,
                                       scale, BLOCK_V)
    base = part_ptr + (row * n_chunks + chunk) * 5
    tl.store(base + 0, m_a)
    tl.store(base + 1, s_a)
    tl.store(base + 2, m_b)
    tl.store(base + 3, s_b)
    tl.store(base + 4, t)


@triton.jit
def _token_kl_combine_kernel(
    part_ptr,  # [N, C, 5] float32
    out_ptr,  # [N] float32
    n_chunks,
    scale,  # log2(e) / temperature
    BLOCK_C: tl.constexpr,
):
    # merge C chunk stats with the same rescale-and-shift rule as the streaming update
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < n_chunks
    base = part_ptr + row * n_chunks * 5 + offs * 5
    m_a, s_a, m_b, s_b, t = _load_chunk_stats(base, ok)
    _, _, S_a, S_b, t_all, _, _ = _merge_chunks(m_a, s_a, m_b, s_b, t, scale)
    tl.store(out_ptr + row, _kl_finish(S_a, S_b, t_all))


# On a GPU the one-row-per-program kernel is autotuned over these (block, warps) pairs, keyed by V (the autotuner
# also keys on the input dtype); the heuristic below is one of them and is what the interpreter and the split path use.
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
]
_token_kl_fwd_kernel_autotuned = triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["n_cols"])(_token_kl_fwd_kernel)


def autotune_enabled(device: torch.device) -> bool:
    """Autotune only on a real GPU (never in the interpreter); PGPO_AUTOTUNE=0 turns it off."""
    return device.type == "cuda" and os.environ.get("PGPO_AUTOTUNE", "1") != "0"


@triton.jit
def _token_kl_bwd_kernel(
    a_ptr,  # [N, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [N, V] logits of the text-only pass
    grad_out_ptr,  # [N] upstream gradient dL/dKL
    grad_a_ptr,  # [N, V] dL/da, contiguous, the logits' dtype
    grad_b_ptr,  # [N, V] dL/db
    n_cols,  # V
    stride_a_row,
    stride_b_row,
    scale,  # log2(e) / temperature
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
):
    # With p = softmax(a / T), q = softmax(b / T):
    #     dKL/da_j = p_j ((log p_j - log q_j) - KL) / T,     dKL/db_j = (q_j - p_j) / T
    # 1. recompute the row's log-sum-exps and KL (one read of both rows: nothing [N, V] was saved in forward);
    # 2. stream the row again and write both gradients.
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_a_row
    b_row = b_ptr + row * stride_b_row
    m_a, s_a, m_b, s_b, t = _kl_stream(a_row, b_row, 0, n_cols, scale, BLOCK_V)
    kl = _LN2_C * (t / s_a - tl.log2(s_a) + tl.log2(s_b))  # unclamped: the clamp only hides rounding
    ma, log_sa = _safe_max(m_a), tl.log2(s_a)
    mb, log_sb = _safe_max(m_b), tl.log2(s_b)
    g = tl.load(grad_out_ptr + row).to(tl.float32) * inv_temp
    # an all -inf row of a has no distribution (KL is the constant 0): zero gradient; infinite KL: no derivative
    g = tl.where(s_a == 0.0, 0.0, g)
    g = tl.where((s_a > 0.0) & ((s_b == 0.0) | (kl == float("inf"))), float("nan"), g)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        in_row = cols < n_cols
        x = tl.load(a_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        lp = (x - ma) * scale - log_sa  # log2 p_j; the max is subtracted before scaling, as in the forward
        lq = (y - mb) * scale - log_sb
        p = tl.where(x == float("-inf"), 0.0, tl.exp2(lp))  # also covers lp = -inf - (-inf) on an all -inf row
        ga = tl.where(x == float("-inf"), 0.0, g * p * (_LN2_C * (lp - lq) - kl))
        gb = tl.where(s_a == 0.0, 0.0, g * (tl.exp2(lq) - p))
        tl.store(grad_a_ptr + row * n_cols + cols, ga.to(grad_a_ptr.dtype.element_ty), mask=in_row)
        tl.store(grad_b_ptr + row * n_cols + cols, gb.to(grad_b_ptr.dtype.element_ty), mask=in_row)


# %% launchers -----------------------------------------------------------------------------------------------------
def kl_launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) by vocab size: wide blocks for long rows, enough warps to keep the loads in flight."""
    block_v = min(MAX_BLOCK_V, next_power_of_2(n_cols))
    num_warps = 16 if block_v >= 4096 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


def split_chunks(n_rows: int, n_cols: int, block_v: int, n_sm: int) -> int:
    """How many vocab chunks each row is split into so the grid covers ~4 waves of SMs (1 = no split)."""
    if n_rows >= 2 * n_sm:
        return 1
    max_chunks = triton.cdiv(n_cols, block_v)
    return max(1, min(max_chunks, triton.cdiv(4 * n_sm, max(n_rows, 1))))


def chunk_layout(n_cols: int, n_chunks: int, block_v: int) -> tuple[int, int]:
    """(cols_per_chunk, n_chunks): the vocab split into about n_chunks chunks of whole BLOCK_V tiles, none empty."""
    n_chunks = max(1, min(int(n_chunks), triton.cdiv(n_cols, block_v)))
    cols_per_chunk = triton.cdiv(triton.cdiv(n_cols, n_chunks), block_v) * block_v
    return cols_per_chunk, triton.cdiv(n_cols, cols_per_chunk)  # no empty chunk after rounding up


def token_kl_forward(
    logits_vis: torch.Tensor, logits_txt: torch.Tensor, temperature: float = 1.0, n_chunks: int | None = None
) -> torch.Tensor:
    """Launch the token-KL kernels on [..., V] inputs (checked by the caller) -> [...] float32.

    n_chunks: vocab split per row; None picks it from the shape and the device's SM count.
    """
    lead = logits_vis.shape[:-1]
    a, b = as_rows(logits_vis), as_rows(logits_txt)
    n_rows, n_cols = a.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=a.device)
    if n_rows == 0:
        return out.reshape(lead)
    scale = LOG2E / float(temperature)
    block_v, num_warps = kl_launch_config(n_cols)
    if n_chunks is None:
        n_chunks = split_chunks(n_rows, n_cols, block_v, device_sm_count(a.device))
    cols_per_chunk, n_chunks = chunk_layout(n_cols, n_chunks, block_v)
    if n_chunks == 1 and autotune_enabled(a.device) and n_cols >= 1024:
        _token_kl_fwd_kernel_autotuned[(n_rows,)](a, b, out, n_cols, a.stride(0), b.stride(0), scale)
        return out.reshape(lead)
    if n_chunks == 1:
        _token_kl_fwd_kernel[(n_rows,)](
            a, b, out, n_cols, a.stride(0), b.stride(0), scale, BLOCK_V=block_v, num_warps=num_warps
        )
        return out.reshape(lead)
    part = torch.empty((n_rows, n_chunks, N_STATS), dtype=torch.float32, device=a.device)
    _token_kl_partial_kernel[(n_rows, n_chunks)](
        a, b, part, n_cols, a.stride(0), b.stride(0), cols_per_chunk, n_chunks, scale,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    _token_kl_combine_kernel[(n_rows,)](part, out, n_chunks, scale, BLOCK_C=next_power_of_2(n_chunks), num_warps=1)
    return out.reshape(lead)


def token_kl_backward(
    logits_vis: torch.Tensor, logits_txt: torch.Tensor, grad_out: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: [..., V] logits x2 and [...] dL/dKL -> (dL/dlogits_vis, dL/dlogits_txt).

    One program per row; each reads its two rows twice (stats, then gradients) and writes two gradient rows.
    """
    a, b = as_rows(logits_vis), as_rows(logits_txt)
    n_rows, n_cols = a.shape
    grad_a = torch.empty((n_rows, n_cols), dtype=a.dtype, device=a.device)
    grad_b = torch.empty((n_rows, n_cols), dtype=b.dtype, device=b.device)
    if n_rows > 0:
        g = grad_out.reshape(-1).contiguous()
        block_v, num_warps = kl_launch_config(n_cols)
        _token_kl_bwd_kernel[(n_rows,)](
            a, b, g, grad_a, grad_b, n_cols, a.stride(0), b.stride(0), LOG2E / float(temperature),
            1.0 / float(temperature), BLOCK_V=block_v, num_warps=num_warps,
        )
    return grad_a.reshape(logits_vis.shape), grad_b.reshape(logits_txt.shape)


# %% autograd ------------------------------------------------------------------------------------------------------
class TokenKLFunction(torch.autograd.Function):
    """token_kl with gradients to both logit tensors (for PAPO-style perception losses).

    Forward saves only references to the two inputs; backward recomputes both softmaxes from them. The torch
    backend keeps float64 inputs in float64 (out and grads), so torch.autograd.gradcheck can check it; every other
    dtype gives a float32 KL, as the forward kernels do.
    """

    @staticmethod
    def forward(ctx, logits_vis, logits_txt, temperature: float, backend: str):
        ctx.temperature = float(temperature)
        ctx.backend = backend
        ctx.save_for_backward(logits_vis, logits_txt)
        if backend == "torch":
            lead = logits_vis.shape[:-1]
            return token_kl_torch(as_rows(logits_vis), as_rows(logits_txt), temperature).reshape(lead)
        return token_kl_forward(logits_vis, logits_txt, temperature)

    @staticmethod
    def backward(ctx, grad_out):
        a, b = ctx.saved_tensors
        if ctx.backend == "torch":
            ga, gb = token_kl_backward_torch(as_rows(a), as_rows(b), grad_out.reshape(-1), ctx.temperature)
            ga, gb = ga.reshape(a.shape), gb.reshape(b.shape)
        else:
            ga, gb = token_kl_backward(a, b, grad_out, ctx.temperature)
        return (ga if ctx.needs_input_grad[0] else None), (gb if ctx.needs_input_grad[1] else None), None, None


# %% public functional ---------------------------------------------------------------------------------------------
def token_kl(
    logits_vis: torch.Tensor, logits_txt: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """Per-token visual dependency S_t = KL(softmax(vis / T) || softmax(txt / T)) (PGPO, arXiv 2604.01840, Eq. S_t).

    Args:
        logits_vis: [..., V] logits of the visual pass (bf16, fp16, fp32 or fp64).
        logits_txt: [..., V] logits of the text-only pass, same shape.
        temperature: softmax temperature T > 0.
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).

    Returns:
        [...] float32 KL in nats, >= 0 (+inf where vis puts mass on a token txt rules out with -inf). Differentiable
        in both inputs: backward recomputes the softmaxes from the logits (fused kernel on the triton backend).
    """
    check_logits_pair(logits_vis, logits_txt)
    check_temperature(temperature)
    backend = resolve_backend(backend, logits_vis, logits_txt)
    # differentiable in both inputs (TokenKLFunction); .float() keeps the float32 contract and passes gradients
    return TokenKLFunction.apply(logits_vis, logits_txt, float(temperature), backend).float()
