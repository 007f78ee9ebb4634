"""fused_linear_logp: log pi(target) and entropy from last hidden states and the lm_head, with a backward, never
writing [N, V] logits (the policy update's loss; the design of Apple's Cut Cross-Entropy, arXiv 2411.09009).

Forward, grid = (row block of BLOCK_N rows) x (vocab chunk), grouped for L2 reuse as in fused_linear.py:

    for each vocab tile of BLOCK_V columns in the chunk:
        x = (h[rows] @ W[cols]^T (+ bias)) / T        tl.dot over H in BLOCK_H steps, fp32 acc (m64n128 wgmma on sm_90)
        fold x into the row's online stats: max m, sum s = sum e^(x - m), t = sum e^(x - m) (x - m), target logit
    write [N, C, 4] fp32 partials; a few [N, C] torch ops combine them into lse and entropy

    entropy H = sum_c e^(m_c - lse) ((lse - m_c) s_c - t_c)       every term >= 0: no cancellation

Backward, grid = (row block) x (vocab tile), from the saved [N] lse and entropy, one recompute of each logit tile:

    p = e^(x - lse),  d = (g_logp (onehot - p) - g_ent p (x - lse + H)) / T            [BLOCK_N, BLOCK_V] on chip
    grad_h[rows] += d @ W[cols],  grad_W[cols] += d^T @ h[rows],  grad_b[cols] += sum_rows d     fp32 atomics

Why atomics (docs/design/fused_ops.md, "fused_linear_logp"): the alternative split reductions need either a [BLOCK_N, H]
accumulator per program (H = 3584: 900 KB, no register file holds it, so the logits would be recomputed H / BLOCK_H
times) or a [N, V_chunk] buffer of d per vocab chunk handed to cuBLAS (memory that grows with N x V_chunk). Atomics keep
each logit tile computed once and memory at the fp32 grads ([N, H] + [V, H]), at the price of non-deterministic
summation order (fp32 rounding only).

Entropy is differentiable (its term costs one multiply-add per element of the same tile). Ignored targets
(== ignore_index) give logp 0 and entropy 0, and no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgpo_kernels.online_softmax import LOG2E_C as LOG2E
from pgpo_kernels.online_softmax import chunk_layout
from pgpo_kernels.online_softmax import split_chunks
from pgpo_kernels.torch_fallback.fused_logp import default_logp_chunk_rows
from pgpo_kernels.torch_fallback.fused_logp import fused_linear_logp_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import check_chunk_size
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_lm_head_bias
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import interpreter_enabled
from pgpo_kernels.utils import resolve_backend

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
N_PART = 4  # per (row, chunk): m, s, t, target logit
N_PART_C = tl.constexpr(N_PART)
# our choice: tiles picked by the compiled code (registers, spills, MMA shape: `pgpo-bench sass`); not timed on a GPU
FWD_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3, "CHUNK_TILES": 16,
              "GROUP_N": 16}
FWD_BLOCKS_FP32 = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2, "CHUNK_TILES": 32,
                   "GROUP_N": 16}
# backward: 128 x 128 tiles cut the fp32 atomic traffic N H V (1/BLOCK_V + 1/BLOCK_N) by a third against 64 x 128
# (139 vs 209 GB at N = 4096, V = 152064, H = 3584), with 0 spills on sm_80 and sm_90, fewer hot-loop instructions
# per MAC and less shared memory (benchmarks/results/logp/bwd_tile_sweep.md: static, no GPU timing behind it)
BWD_BLOCKS = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3, "GROUP_N": 16}
BWD_BLOCKS_FP32 = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2, "GROUP_N": 16}
# the interpreter runs on numpy: small tiles (tl.dot needs every dim >= 16)
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "CHUNK_TILES": 2,
                      "GROUP_N": 2}


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(pid, n_rows, n_cols_blocks, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    # GROUP_N row blocks x all column blocks per group, row blocks fastest: programs in flight share W tiles in L2
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_N * n_cols_blocks
    first_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first_block, GROUP_N)
    return first_block + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _logit_tile(h_rows, row_ok, w_ptr, cols, col_ok, stride_w_row, n_hidden, bias_ptr, inv_temp,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr):
    # x = (h[rows] @ W[cols]^T + bias[cols]) / T as a [BLOCK_N, BLOCK_V] fp32 tile
    offs_h = tl.arange(0, BLOCK_H)
    w_cols = w_ptr + cols[None, :] * stride_w_row
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in tl.range(0, n_hidden, BLOCK_H, num_stages=NUM_STAGES):
        ks = k + offs_h
        k_ok = ks < n_hidden
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
        w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
        if DOT_FP32:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _logp_fwd_kernel(
    h_ptr,  # [N, H] hidden states, last dim contiguous
    w_ptr,  # [V, H] lm_head weight, last dim contiguous
    bias_ptr,  # [V] bias (unused without HAS_BIAS)
    target_ptr,  # [N] int64 ids in [0, V), or anything outside for ignored rows
    part_ptr,  # [N, C, 4] float32 partials (m, s, t, target logit)
    n_rows,
    n_cols,
    n_hidden,
    stride_h_row,
    stride_w_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    n_chunks,  # C
    inv_temp,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,  # exact fp32 dots (fp32 inputs; every dtype under the interpreter)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    row_block, chunk = _tile_coords(tl.program_id(0), n_rows, n_chunks, BLOCK_N, GROUP_N)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * H can pass 2**31
    row_ok = rows < n_rows
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    h_rows = h_ptr + rows[:, None] * stride_h_row
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    xt = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs_v.to(tl.int64)
        col_ok = cols < col_end
        x = _logit_tile(h_rows, row_ok, w_ptr, cols, col_ok, stride_w_row, n_hidden, bias_ptr, inv_temp, HAS_BIAS,
                        DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_H, NUM_STAGES)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        xt += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(s > 0, m - m_new, 0.0)  # first tile: nothing to rescale (never -inf * 0)
        alpha = tl.exp2(shift * LOG2E)
        xc = x - m_new[:, None]  # <= 0; -inf past the chunk
        e = tl.exp2(xc * LOG2E)
        if WITH_ENTROPY:  # t about the new max: e^shift (t + shift s) + sum e (x - m_new)
            t = alpha * (t + shift * s) + tl.sum(e * tl.where(col_ok[None, :], xc, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    base = part_ptr + (rows * n_chunks + chunk) * N_PART_C
    tl.store(base + 0, m, mask=row_ok)
    tl.store(base + 1, s, mask=row_ok)
    tl.store(base + 2, t, mask=row_ok)
    tl.store(base + 3, xt, mask=row_ok)


@triton.jit
def _logp_bwd_kernel(
    h_ptr,  # [N, H] hidden states, last dim contiguous
    w_ptr,  # [V, H] lm_head weight, last dim contiguous
    bias_ptr,  # [V] bias (unused without HAS_BIAS)
    target_ptr,  # [N] int64 ids
    stats_ptr,  # [N, 2] float32: lse (of x = logits / T), entropy
    grad_ptr,  # [N, 2] float32: grad of logp, grad of entropy (0 on ignored rows)
    grad_h_ptr,  # [N, H] float32, zeroed (unused without GRAD_H)
    grad_w_ptr,  # [V, H] float32, zeroed (unused without GRAD_W)
    grad_b_ptr,  # [V] float32, zeroed (unused without GRAD_B)
    skip_ptr,  # [1] int32: tiles skipped by the filter (unused without FILTER)
    n_rows,
    n_cols,
    n_hidden,  # also the row stride of grad_h and grad_w
    stride_h_row,
    stride_w_row,
    inv_temp,
    filter_eps,  # skip the tile when every |d| < filter_eps x its row's (|g_logp| + |g_ent|) / T (FILTER only)
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    FILTER: tl.constexpr,  # False: every tile computed, the code of the exact backward
    GRAD_H: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    row_block, col_block = _tile_coords(tl.program_id(0), n_rows, tl.cdiv(n_cols, BLOCK_V), BLOCK_N, GROUP_N)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_cols
    h_rows = h_ptr + rows[:, None] * stride_h_row
    x = _logit_tile(h_rows, row_ok, w_ptr, cols, col_ok, stride_w_row, n_hidden, bias_ptr, inv_temp, HAS_BIAS,
                    DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_H, NUM_STAGES)
    lse = tl.load(stats_ptr + rows * 2, mask=row_ok, other=0.0)
    g_lp = tl.load(grad_ptr + rows * 2, mask=row_ok, other=0.0)
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    logp = x - lse[:, None]
    p = tl.exp2(logp * LOG2E)
    coef = g_lp[:, None]
    g_scale = tl.abs(g_lp)
    if WITH_ENTROPY:
        ent = tl.load(stats_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
        g_ent = tl.load(grad_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
        coef = coef + g_ent[:, None] * (logp + ent[:, None])
        g_scale += tl.abs(g_ent)
    d = tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0) - p * coef
    d = tl.where(row_ok[:, None] & col_ok[None, :], d * inv_temp, 0.0)  # [BLOCK_N, BLOCK_V] dL/dlogits
    if FILTER:
        # gradient filtering (Cut Cross-Entropy): |d| measured per unit of its row's upstream gradient, as CCE
        # measures softmax - onehot before scaling by dOut (an absolute rule would drop every tile of a loss that
        # is a mean over many tokens); the target column counts; a NaN is never small; the tile skips both GEMMs
        # and every atomic. Each skipped |d_ij| < filter_eps (|g_logp_i| + |g_ent_i|) / T: the error bound of
        # fused_linear_logp's docstring follows from that alone
        small = (tl.abs(d) < filter_eps * (g_scale * inv_temp)[:, None]) | (d == 0.0)
        if tl.min(small.to(tl.int32)) == 1:
            tl.atomic_add(skip_ptr, 1, sem="relaxed")
            return
    # every atomic below is sem="relaxed": the sums are read only after the kernel ends, so none needs ordering;
    # Triton's default acq_rel put a GPU-wide fence and an L1 invalidate around each one (SASS: MEMBAR.ALL.GPU +
    # CCTL.IVALL per atomic); relaxed: REDG alone, sm_90 hot loop 401 -> 301 instructions (static, pgpo-bench sass)
    if GRAD_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(d, axis=0), mask=col_ok, sem="relaxed")
    if DOT_FP32:
        dd = d
    else:  # the tensor cores take 16-bit operands: d rounded to the input dtype, fp32 accumulation
        dd = d.to(h_ptr.dtype.element_ty)
    offs_h = tl.arange(0, BLOCK_H)
    for k in tl.range(0, n_hidden, BLOCK_H, num_stages=NUM_STAGES):
        ks = k + offs_h
        k_ok = ks < n_hidden
        if GRAD_H:
            w = tl.load(w_ptr + cols[:, None] * stride_w_row + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_V, BLOCK_H]
            if DOT_FP32:
                gh = tl.dot(dd, w.to(tl.float32), input_precision="ieee")
            else:
                gh = tl.dot(dd, w)
            tl.atomic_add(grad_h_ptr + rows[:, None] * n_hidden + ks[None, :], gh,
                          mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if GRAD_W:
            h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
            if DOT_FP32:
                gw = tl.dot(tl.trans(dd), h.to(tl.float32), input_precision="ieee")
            else:
                gw = tl.dot(tl.trans(dd), h)
            tl.atomic_add(grad_w_ptr + cols[:, None] * n_hidden + ks[None, :], gw,
                          mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


# %% launchers -----------------------------------------------------------------------------------------------------
def logp_launch_configs(dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """(forward, backward) tile sizes, warps and stages by where the kernels run and the input dtype."""
    if device.type != "cuda":
        return dict(INTERPRETER_BLOCKS), dict(INTERPRETER_BLOCKS)
    if dtype == torch.float32:
        return dict(FWD_BLOCKS_FP32), dict(BWD_BLOCKS_FP32)
    return dict(FWD_BLOCKS), dict(BWD_BLOCKS)


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    # exact fp32 dots for fp32 inputs; the interpreter's tl.dot misreads bf16, so there 16-bit tiles are upcast
    # first (exact: a 16-bit x 16-bit product fits an fp32 mantissa)
    return dtype == torch.float32 or (interpreter_enabled() and device.type != "cuda")


def logp_forward(hidden, weight, bias, target, temperature, with_entropy, config=None, n_chunks=None):
    """Forward kernels on [N, H], [V, H] (unit last strides), [V] | None, [N] int64 (ignored rows: any id outside
    [0, V)) -> (logp, entropy, lse), [N] float32 each; logp is x_target - lse, unmasked."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    cfg = config or logp_launch_configs(hidden.dtype, device)[0]
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(n_rows, block_n)
    c = n_chunks if n_chunks is not None else max(triton.cdiv(n_cols, cfg["CHUNK_TILES"] * block_v),
                                                  split_chunks(n_blocks, n_cols, block_v, device_sm_count(device)))
    cols_per_chunk, c = chunk_layout(n_cols, c, block_v)
    part = torch.empty((n_rows, c, N_PART), dtype=torch.float32, device=device)
    if n_rows:
        _logp_fwd_kernel[(n_blocks * c,)](
            hidden, weight, bias if bias is not None else part, target, part, n_rows, n_cols, n_hidden,
            hidden.stride(0), weight.stride(0), cols_per_chunk, c, 1.0 / float(temperature),
            HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, DOT_FP32=_dot_fp32(hidden.dtype, device),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"], NUM_STAGES=cfg["num_stages"],
            GROUP_N=cfg["GROUP_N"], num_warps=cfg["num_warps"],
        )
    m, s, t, xt = part.unbind(-1)  # [N, C] each: a few small torch ops combine the chunks
    big = m.amax(-1, keepdim=True)
    lse = big.squeeze(-1) + (s * (m - big).exp()).sum(-1).log()
    logp = xt.sum(-1) - lse
    ent = None
    if with_entropy:
        ent = ((m - lse[:, None]).exp() * ((lse[:, None] - m) * s - t)).sum(-1).clamp_min(0.0)
    return logp, ent, lse


def logp_backward(hidden, weight, bias, target, stats, grads, temperature, with_entropy, needs, config=None,
                  filter_eps=0.0, skip_counter=None):
    """Backward kernel: stats [N, 2] (lse, entropy), grads [N, 2] (of logp, of entropy) float32 ->
    (grad_hidden, grad_weight, grad_bias) in the inputs' dtypes (None where not needed).

    filter_eps > 0 skips the tiles whose every |d| is below filter_eps per unit of the row's upstream gradient
    (fused_linear_logp, "grad_filter"); 0 runs the exact kernel. skip_counter: an optional [1] int32 tensor on the
    device that the kernel adds its skipped tiles to (the launch has cdiv(N, BLOCK_N) x cdiv(V, BLOCK_V) tiles)."""
    n_rows, n_hidden = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    cfg = config or logp_launch_configs(hidden.dtype, device)[1]
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    gh = torch.zeros((n_rows, n_hidden), dtype=torch.float32, device=device) if need_h else None
    gw = torch.zeros((n_cols, n_hidden), dtype=torch.float32, device=device) if need_w else None
    gb = torch.zeros(n_cols, dtype=torch.float32, device=device) if need_b else None
    filtered = filter_eps > 0
    if skip_counter is not None and (skip_counter.shape != (1,) or skip_counter.dtype != torch.int32
                                     or skip_counter.device != device):
        raise ValueError(f"skip_counter must be a [1] int32 tensor on {device}, got {tuple(skip_counter.shape)} "
                         f"{skip_counter.dtype} on {skip_counter.device}")
    if n_rows and (need_h or need_w or need_b):
        dummy = stats
        if filtered and skip_counter is None:
            skip_counter = torch.zeros(1, dtype=torch.int32, device=device)
        grid = (triton.cdiv(n_rows, cfg["BLOCK_N"]) * triton.cdiv(n_cols, cfg["BLOCK_V"]),)
        _logp_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else dummy, target, stats, grads,
            gh if need_h else dummy, gw if need_w else dummy, gb if need_b else dummy,
            skip_counter if filtered else dummy,
            n_rows, n_cols, n_hidden, hidden.stride(0), weight.stride(0), 1.0 / float(temperature),
            float(filter_eps), HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, FILTER=filtered,
            GRAD_H=need_h, GRAD_W=need_w, GRAD_B=need_b,
            DOT_FP32=_dot_fp32(hidden.dtype, device), BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
            BLOCK_H=cfg["BLOCK_H"], NUM_STAGES=cfg["num_stages"], GROUP_N=cfg["GROUP_N"],
            num_warps=cfg["num_warps"],
        )
    return (None if gh is None else gh.to(hidden.dtype), None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype))


class FusedLinearLogpFunction(torch.autograd.Function):
    """Triton path: (hidden [N, H], weight [V, H], bias | None, target [N]) -> (logp [N], entropy [N]) float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temperature, with_entropy, ignore_index, grad_filter, config):
        valid = target != ignore_index
        logp, ent, lse = logp_forward(hidden, weight, bias, target, temperature, with_entropy,
                                      config and config[0])
        logp = torch.where(valid, logp, 0.0).clamp_max(0.0)
        ent = torch.where(valid, ent, 0.0) if with_entropy else torch.zeros_like(logp)
        ctx.save_for_backward(hidden, weight, bias, target, valid, torch.stack([lse, ent], -1))
        ctx.temperature, ctx.with_entropy, ctx.config = temperature, with_entropy, config and config[1]
        ctx.grad_filter = grad_filter
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, target, valid, stats = ctx.saved_tensors
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_lp = zero.expand(valid.shape) if g_logp is None else g_logp.float()
        with_entropy = ctx.with_entropy and g_ent is not None
        g_en = g_ent.float() if with_entropy else zero.expand(valid.shape)
        grads = torch.where(valid[:, None], torch.stack([g_lp, g_en], -1), zero).contiguous()
        gh, gw, gb = logp_backward(hidden, weight, bias, target, stats, grads, ctx.temperature, with_entropy,
                                   ctx.needs_input_grad[:3], ctx.config, filter_eps=ctx.grad_filter)
        return gh, gw, gb, None, None, None, None, None, None


# %% public functional ---------------------------------------------------------------------------------------------
def default_grad_filter(dtype: torch.dtype) -> float:
    """Cut Cross-Entropy's filter threshold for gradients of this dtype: finfo(dtype).eps / 32."""
    return torch.finfo(dtype).eps / 32


def resolve_grad_filter(grad_filter, dtype: torch.dtype) -> float:
    """None -> the dtype's default; otherwise a finite real in [0, 1) (relative |dL/dlogit| per unit upstream
    gradient: the target column's 1 - p reaches 1, so a threshold >= 1 would drop real gradient wholesale)."""
    if grad_filter is None:
        return default_grad_filter(dtype)
    if isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float)):
        raise TypeError(f"grad_filter must be a float in [0, 1) or None (finfo(dtype).eps / 32), got "
                        f"{type(grad_filter).__name__} {grad_filter!r}")
    if not (0.0 <= float(grad_filter) < 1.0):  # NaN fails too
        raise ValueError(f"grad_filter must be a float in [0, 1) or None (finfo(dtype).eps / 32), got {grad_filter!r}")
    return float(grad_filter)


def check_logp_args(hidden, weight, targets, bias, ignore_index, chunk_size) -> None:
    """[..., H] hidden, [V, H] weight, [...] integer targets in [0, V) or == ignore_index, optional [V] bias."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [N, H] or [B, T, H] with H >= 1, got {tuple(hidden.shape)}")
    n_hidden = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_hidden or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] = [V, {n_hidden}] with V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    check_lm_head_bias(bias, weight.shape[0], hidden, "hidden")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    check_chunk_size(chunk_size)
    lead = hidden.shape[:-1]
    n_cols = weight.shape[0]
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer torch.Tensor of shape {tuple(lead)}, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer (int32/int64) tensor of shape {tuple(lead)}, got {targets.dtype}")
    if targets.shape != lead:
        raise ValueError(f"targets must have hidden's leading shape {tuple(lead)} (hidden is [..., H]), got "
                         f"{tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    bad = ((targets < 0) | (targets >= n_cols)) & (targets != ignore_index)
    if targets.numel() and bool(bad.any()):  # host sync: a bad id would be read out of bounds
        raise ValueError(f"targets must lie in [0, V) = [0, {n_cols}) or equal ignore_index ({ignore_index})")


def fused_linear_logp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    grad_filter: float | None = None,
):
    """log softmax((hidden @ weight^T + bias) / T)[targets] (and the entropy) without building [N, V] logits.

    Differentiable w.r.t. hidden, weight and bias, the entropy included. Rows whose target equals ignore_index get
    logp 0 and entropy 0 and pass no gradient.

    Args:
        hidden: [N, H] or [B, T, H] last hidden states (bf16, fp16, fp32; fp64 on the torch backend), any strides.
        weight: [V, H] lm_head weight, same dtype. targets: [N] / [B, T] integer ids. bias: optional [V].
        temperature: softmax temperature T > 0. with_entropy: also return the entropy.
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).
        chunk_size: torch backend only, rows whose logits are built at a time (None: ~8 MiB of fp32 logits).
        grad_filter: Triton backward's gradient filtering (Cut Cross-Entropy's): a tile of BLOCK_N x BLOCK_V logits
            whose every |d_ij| = |dL/dlogit_ij| (the target column included) is below grad_filter x s_i, with
            s_i = (|dL/dlogp_i| + |dL/dentropy_i|) / T its row's upstream scale, skips both GEMMs and all its atomics.
            None: finfo(hidden.dtype).eps / 32 (CCE's rule: 2**-12 for bf16, 2**-15 fp16, 2**-28 fp32); 0: exact,
            every tile computed (the kernel without the filter's code). Per gradient element the skipped terms
            change the result (against exact math) by at most
                |d grad_hidden[i, k]| <= sum over skipped j of |d_ij| |W_jk| < grad_filter s_i n_i max_j |W_jk|
                |d grad_weight[j, k]| <= sum over skipped i of |d_ij| |h_ik| < grad_filter sum_i s_i |h_ik|
                |d grad_bias[j]|      < grad_filter sum over skipped i of s_i
            (n_i: skipped columns of row i); with logp alone a skipped non-target d_ij is -g_i p_ij / T, so the
            first is also <= |g_i| / T x (probability mass of row i's skipped columns) x max_j |W_jk|. The torch
            backend is exact at every grad_filter (error 0, within the same bound); the value is validated on both.

    Returns:
        logp [...] float32, or (logp, entropy) with with_entropy (float64 for float64 inputs on the torch backend).
    """
    check_logp_args(hidden, weight, targets, bias, ignore_index, chunk_size)
    check_temperature(temperature)
    grad_filter = resolve_grad_filter(grad_filter, hidden.dtype)
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy must be a bool, got {type(with_entropy).__name__} {with_entropy!r}")
    lead = hidden.shape[:-1]
    backend = resolve_backend(backend, hidden, weight, targets)
    if backend == "triton" and hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 hidden states, got {hidden.dtype}; "
                        "use backend='torch' for float64")
    target = targets.reshape(-1)
    if backend == "torch":
        chunk = chunk_size or default_logp_chunk_rows(weight.shape[0])
        logp, ent = fused_linear_logp_torch(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target, temperature,
                                            with_entropy, ignore_index, chunk)
    else:
        logp, ent = FusedLinearLogpFunction.apply(
            as_rows(hidden), as_rows(weight), None if bias is None else bias.contiguous(), target.long().contiguous(),
            float(temperature), with_entropy, ignore_index, grad_filter, None)
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if with_entropy else logp
