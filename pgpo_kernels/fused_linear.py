"""Token KL (and log-prob / entropy) straight from last hidden states and the lm_head, never building [N, V] logits.

At Qwen2.5-VL scale (V = 152064) the logits are the memory problem: 8192 tokens x V is 2.5 GB per pass in bf16, and
trainers that fuse the lm_head (Liger, cut-cross-entropy) never build them. This kernel computes logit tiles on chip
and folds them into the online log-sum-exp stats of online_softmax.py (as token_stats does) right away:

    for each (row block of BLOCK_N rows, vocab chunk of CHUNK_TILES tiles):   grid = cdiv(N, BLOCK_N) x C, grouped
        for each vocab tile of BLOCK_V columns in the chunk:
            [A; B] = [h_vis[rows]; h_txt[rows]] @ W[cols]^T     one tl.dot over H in BLOCK_H steps on a stacked
                                                                2 BLOCK_N-row A tile (m64n128 wgmma), fp32 acc
            (+ bias), split into A and B, fold both into (m_a, s_a, m_b, s_b, t[, u], hit) of each row
        write the row block's 7 stats for this chunk                     [N, C, 7] fp32
    target logits h . W[target] (+ bias) of each row, once                [N, 2] fp32 (a small kernel)
    combine the C chunks per row and finish                              (token_stats' combine kernel)

Both passes share each W tile, loaded once for one dot of twice the rows; the launcher stacks each row block's two
passes into one contiguous [2 BLOCK_N, H] slab (stack_row_blocks) so the A tile streams like any matmul operand.
Memory: one stacked copy of the hidden states [2 N, H] (per launch chunk) + [N, C, 7] + [N, 2] fp32, nothing
V-sized. Traffic: program ids are grouped as in the matmul tutorial (GROUP_N row blocks x all chunks per group, row
blocks fastest), so the programs in flight cover a few row blocks x a few chunks: their hidden blocks stay in L2
while the chunks advance, and each W tile is fetched from HBM about once per group (docs/design/fused_ops.md has the
numbers, and the static comparison with the chunked cuBLAS matmul + token_stats alternative).

Non-finite values follow token_stats: a NaN or +inf logit (from NaN/inf hidden states or weights) makes that row's
outputs NaN; huge finite logits give the true values.

The torch fallback (torch_fallback/fused_linear.py) builds logits for `chunk_size` rows at a time: O(chunk x V)
extra memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgpo_kernels.defaults import ESTIMATOR
from pgpo_kernels.defaults import TEMPERATURE
from pgpo_kernels.k3 import check_estimator
from pgpo_kernels.online_softmax import LOG2E
from pgpo_kernels.online_softmax import N_PART
from pgpo_kernels.online_softmax import N_PART_C
from pgpo_kernels.online_softmax import UNIT
from pgpo_kernels.online_softmax import chunk_layout
from pgpo_kernels.online_softmax import fold
from pgpo_kernels.online_softmax import init_stats
from pgpo_kernels.online_softmax import split_chunks
from pgpo_kernels.token_stats import TokenStats
from pgpo_kernels.token_stats import check_target_ids
from pgpo_kernels.token_stats import combine_stats
from pgpo_kernels.token_stats import finish_stats
from pgpo_kernels.torch_fallback.fused_linear import default_chunk_rows
from pgpo_kernels.torch_fallback.fused_linear import fused_linear_token_kl_torch
from pgpo_kernels.torch_fallback.fused_linear import fused_linear_token_stats_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import check_chunk_size
from pgpo_kernels.utils import check_float
from pgpo_kernels.utils import check_lm_head_bias
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import interpreter_enabled
from pgpo_kernels.utils import resolve_backend

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# our choice: tile sizes for sm_80 / sm_90, picked by the compiled code (docs/design/fused_ops.md: registers, spills,
# MMA shape); not timed on hardware yet. BLOCK_N rows of each pass stack into a 2 BLOCK_N-row A tile.
# CHUNK_TILES: vocab tiles per chunk (one program's sweep); GROUP_N: row blocks scheduled side by side (L2 reuse)
GPU_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3, "CHUNK_TILES": 16,
              "GROUP_N": 16}
GPU_BLOCKS_FP32 = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2, "CHUNK_TILES": 32,
                   "GROUP_N": 16}
# the interpreter runs on numpy: small tiles (tl.dot needs every dim >= 16)
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "CHUNK_TILES": 4,
                      "GROUP_N": 2}


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_stats_partial_kernel(
    h_ptr,  # [cdiv(N, BLOCK_N), 2, BLOCK_N, H] hidden states, contiguous: per row block the visual pass's rows,
    #          then the text-only pass's (zero rows pad the last block)
    w_ptr,  # [V, H] lm_head weight, last dim contiguous
    bias_ptr,  # [V] lm_head bias (unused without HAS_BIAS)
    part_ptr,  # [N, C, N_PART] float32 partial stats (online_softmax's layout)
    n_rows,  # N
    n_cols,  # V
    n_hidden,  # H (also the row stride of h)
    stride_w_row,
    cols_per_chunk,  # a multiple of BLOCK_V
    n_chunks,  # C
    scale_u,  # log2(e) / (temperature UNIT)
    HAS_BIAS: tl.constexpr,
    WITH_TARGET: tl.constexpr,  # also the entropy sum
    DOT_FP32: tl.constexpr,  # upcast tiles and dot in exact fp32 (fp32 inputs; bf16 under the interpreter)
    BLOCK_N: tl.constexpr,  # rows per pass; the A tile stacks both passes: 2 BLOCK_N rows
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipeline depth of the loads feeding tl.dot
    GROUP_N: tl.constexpr,  # row blocks per launch group
):
    # -- map the program to (row block, vocab chunk), grouped as in the matmul tutorial: consecutive programs take
    # -- GROUP_N row blocks x a few chunks, so the programs in flight share their hidden blocks and W tiles in L2 ---
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_N * n_chunks
    first_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first_block, GROUP_N)
    row_block = first_block + (pid % per_group) % group_rows
    chunk = (pid % per_group) // group_rows
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    # -- the A tile: a contiguous [2 BLOCK_N, H] slab, rows 0..BLOCK_N-1 the visual pass and BLOCK_N..2 BLOCK_N-1 the
    # -- text-only pass of the same tokens, so one tl.dot per H step issues a 2 BLOCK_N-row MMA (m64n128 wgmma) -----
    slab = row_block.to(tl.int64) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # int64: N * H can pass 2**31
    h_rows = h_ptr + slab[:, None] * n_hidden
    offs_v = tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)

    m_a, s_a, m_b, s_b, t, u, hit = init_stats(BLOCK_N)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs_v.to(tl.int64)
        col_ok = cols < col_end
        w_cols = w_ptr + cols[None, :] * stride_w_row  # [1, BLOCK_V]
        acc = tl.zeros((2 * BLOCK_N, BLOCK_V), tl.float32)  # fp32 logits of both passes
        for k in tl.range(0, n_hidden, BLOCK_H, num_stages=NUM_STAGES):
            ks = k + offs_h
            k_ok = ks < n_hidden
            h = tl.load(h_rows + ks[None, :], mask=k_ok[None, :], other=0.0)  # [2 BLOCK_N, BLOCK_H]
            w = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
            if DOT_FP32:
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # columns past the chunk are -inf: they contribute nothing to any sum
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        # split the stacked tile into the two passes' [BLOCK_N, BLOCK_V] logits, row by row aligned
        x, y = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_V)), (1, 2, 0)))
        m_a, s_a, m_b, s_b, t, u, hit = fold(m_a, s_a, m_b, s_b, t, u, hit, x, y, scale_u, WITH_TARGET)
    rows_a = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_a = rows_a < n_rows
    base = part_ptr + (rows_a * n_chunks + chunk) * N_PART_C
    tl.store(base + 0, m_a, mask=ok_a)
    tl.store(base + 1, s_a, mask=ok_a)
    tl.store(base + 2, m_b, mask=ok_a)
    tl.store(base + 3, s_b, mask=ok_a)
    tl.store(base + 4, t, mask=ok_a)
    tl.store(base + 5, u, mask=ok_a)
    tl.store(base + 6, hit, mask=ok_a)


@triton.jit
def _target_logits_kernel(
    hv_ptr,  # [N, H] hidden states of the visual pass
    ht_ptr,  # [N, H] of the text-only pass
    w_ptr,  # [V, H] lm_head weight
    bias_ptr,  # [V] bias (unused without HAS_BIAS)
    target_ptr,  # [N] int target ids in [0, V)
    out_ptr,  # [N, 2] float32: the target's logits (a_x, b_x)
    n_rows,
    n_hidden,
    stride_hv_row,
    stride_ht_row,
    stride_w_row,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # the target logit h . W[target] of each row, once, outside the vocab loop (fp32 sums of exact products)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tgt = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    acc_a = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    for k in range(0, n_hidden, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (ks < n_hidden)[None, :]
        w = tl.load(w_ptr + tgt[:, None] * stride_w_row + ks[None, :], mask=ok, other=0.0).to(tl.float32)
        acc_a += tl.load(hv_ptr + rows[:, None] * stride_hv_row + ks[None, :], mask=ok, other=0.0).to(tl.float32) * w
        acc_b += tl.load(ht_ptr + rows[:, None] * stride_ht_row + ks[None, :], mask=ok, other=0.0).to(tl.float32) * w
    x_t = tl.sum(acc_a, axis=1)
    y_t = tl.sum(acc_b, axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + tgt, mask=row_ok, other=0.0).to(tl.float32)
        x_t += bias
        y_t += bias
    tl.store(out_ptr + rows * 2, x_t, mask=row_ok)
    tl.store(out_ptr + rows * 2 + 1, y_t, mask=row_ok)


# %% launchers -----------------------------------------------------------------------------------------------------
def stack_row_blocks(hv: torch.Tensor, ht: torch.Tensor, block_n: int) -> torch.Tensor:
    """[R, H] x2 -> [cdiv(R, block_n), 2, block_n, H] contiguous: each row block's visual rows then its text-only rows
    (zeros pad the last block), so the kernel's stacked A tile is one contiguous slab that the pipeliner streams like
    any matmul operand. One copy of the hidden states (2 R H elements, per launch chunk), nothing V-sized."""
    n_rows, n_hidden = hv.shape
    n_blocks = triton.cdiv(n_rows, block_n)
    h = hv.new_zeros((n_blocks, 2, block_n, n_hidden))
    full = n_rows // block_n
    for p, src in enumerate((hv, ht)):
        h[:full, p] = src[: full * block_n].reshape(full, block_n, n_hidden)
        if full < n_blocks:
            h[full, p, : n_rows - full * block_n] = src[full * block_n:]
    return h


def fused_linear_launch_config(dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, warps and pipeline stages by where the kernel runs and the input dtype."""
    if device.type != "cuda":
        return dict(INTERPRETER_BLOCKS)
    return dict(GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS)


def fused_linear_forward(
    hidden_vis: torch.Tensor,
    hidden_txt: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    n_chunks: int | None = None,
    config: dict | None = None,
):
    """Launch the fused-linear kernels on [N, H] x2, [V, H] (checked by the caller).

    Args:
        target: [N] ids for log-probs and entropy, or None for the KL alone.
        chunk_rows: rows per launch (None = all): bounds the [rows, C, 7] partial buffer.
        n_chunks: vocab split per row block, None = from the shape and the SM count.
        config: override of fused_linear_launch_config (tests use it to force several tiles and chunks).

    Returns:
        (kl, logp, logp_txt, entropy), [N] float32 each; the last three are None without target.
    """
    n_rows, n_hidden = hidden_vis.shape
    n_cols = weight.shape[0]
    device = hidden_vis.device
    cfg = config or fused_linear_launch_config(hidden_vis.dtype, device)
    block_n, block_v, block_h = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_H"]
    with_target = target is not None
    # exact fp32 dots for fp32 inputs; the interpreter's tl.dot misreads bf16 (multiplies the raw bits), so there
    # bf16 tiles are upcast first, which is exact too: a bf16 x bf16 product fits an fp32 mantissa
    dot_fp32 = hidden_vis.dtype == torch.float32 or (interpreter_enabled() and device.type != "cuda")
    scale = LOG2E / float(temperature)
    outs = [torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(4 if with_target else 1)]
    step = n_rows if chunk_rows is None else max(1, int(chunk_rows))
    for lo in range(0, n_rows, max(step, 1)):
        hi = min(lo + step, n_rows)
        rows = hi - lo
        n_blocks = triton.cdiv(rows, block_n)
        # our choice: chunks of CHUNK_TILES vocab tiles (partial stats stay small: [rows, V / (CHUNK_TILES BLOCK_V), 7]
        # fp32, 17 MiB at 8192 x 152064) and never fewer chunks than it takes to fill the SMs
        c = n_chunks if n_chunks is not None else max(triton.cdiv(n_cols, cfg["CHUNK_TILES"] * block_v),
                                                      split_chunks(n_blocks, n_cols, block_v,
                                                                   device_sm_count(device)))
        cols_per_chunk, c = chunk_layout(n_cols, c, block_v)
        part = torch.empty((rows, c, N_PART), dtype=torch.float32, device=device)
        hv, ht = hidden_vis[lo:hi], hidden_txt[lo:hi]
        _fused_linear_stats_partial_kernel[(n_blocks * c,)](
            stack_row_blocks(hv, ht, block_n), weight, bias if bias is not None else part, part,
            rows, n_cols, n_hidden, weight.stride(0), cols_per_chunk, c, scale / UNIT,
            HAS_BIAS=bias is not None, WITH_TARGET=with_target, DOT_FP32=dot_fp32,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, NUM_STAGES=cfg["num_stages"], GROUP_N=cfg["GROUP_N"],
            num_warps=cfg["num_warps"],
        )
        tgt, tgt_logits = None, None
        if with_target:
            tgt = target[lo:hi]
            tgt_logits = torch.empty((rows, 2), dtype=torch.float32, device=device)
            _target_logits_kernel[(triton.cdiv(rows, 16),)](
                hv, ht, weight, bias if bias is not None else part, tgt, tgt_logits, rows, n_hidden,
                hv.stride(0), ht.stride(0), weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=16,
                BLOCK_H=min(256, max(16, triton.next_power_of_2(n_hidden))), num_warps=4,
            )
        for out, val in zip(outs, combine_stats(part, tgt, scale, target_logits=tgt_logits)):
            out[lo:hi] = val
    if not with_target:
        return outs[0], None, None, None
    return tuple(outs)


# %% public functional ---------------------------------------------------------------------------------------------
def check_fused_linear_args(hidden_vis, hidden_txt, weight, bias, chunk_size) -> None:
    """[..., H] hidden states x2, [V, H] weight, optional [V] bias, one dtype and device; chunk_size None or > 0."""
    check_float("hidden_vis", hidden_vis)
    check_float("hidden_txt", hidden_txt)
    check_float("lm_head_weight", weight)
    if hidden_vis.dim() < 1 or hidden_vis.shape[-1] == 0:
        raise ValueError(f"hidden_vis must have shape [..., H] with H >= 1, got {tuple(hidden_vis.shape)}")
    if hidden_txt.shape != hidden_vis.shape:
        raise ValueError(f"hidden_txt must have the shape of hidden_vis [..., H] = {tuple(hidden_vis.shape)}, "
                         f"got {tuple(hidden_txt.shape)}")
    n_hidden = hidden_vis.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_hidden or weight.shape[0] == 0:
        raise ValueError(f"lm_head_weight must have shape [V, H] = [V, {n_hidden}] with V >= 1, got "
                         f"{tuple(weight.shape)}")
    for name, t in (("hidden_txt", hidden_txt), ("lm_head_weight", weight)):
        if t.dtype != hidden_vis.dtype:
            raise TypeError(f"{name} must have hidden_vis's dtype {hidden_vis.dtype}, got {t.dtype}")
        if t.device != hidden_vis.device:
            raise ValueError(f"{name} must be on hidden_vis's device {hidden_vis.device}, got {t.device}")
    check_lm_head_bias(bias, weight.shape[0], hidden_vis, "hidden_vis")
    check_chunk_size(chunk_size)


def _prepare(hidden_vis, hidden_txt, weight, bias, backend, extra=()):
    """Resolve the backend, refuse what Triton cannot do, flatten to rows."""
    backend = resolve_backend(backend, hidden_vis, hidden_txt, weight, *extra)
    if backend == "triton" and hidden_vis.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 hidden states, got "
                        f"{hidden_vis.dtype}; use backend='torch' for float64")
    if backend == "torch":  # F.linear takes any strides
        n_hidden = hidden_vis.shape[-1]
        return backend, hidden_vis.reshape(-1, n_hidden), hidden_txt.reshape(-1, n_hidden), weight, bias
    # the kernel needs unit last strides
    bias = None if bias is None else bias.contiguous()
    return backend, as_rows(hidden_vis), as_rows(hidden_txt), as_rows(weight), bias


def fused_linear_token_kl(
    hidden_vis: torch.Tensor,
    hidden_txt: torch.Tensor,
    lm_head_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = TEMPERATURE,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """PGPO's S_t = KL(softmax(h_vis W^T / T) || softmax(h_txt W^T / T)) without building the [N, V] logits.

    (arXiv 2604.01840, S_t; the tiling follows cut-cross-entropy's online log-sum-exp over vocab tiles.) A weight,
    not a loss: no gradient flows (docs/method.md#visual-dependency).

    Args:
        hidden_vis: [..., H] last hidden states of the visual pass (bf16, fp16, fp32; fp64 on the torch backend).
        hidden_txt: [..., H] last hidden states of the text-only pass, same shape and dtype.
        lm_head_weight: [V, H] output projection, same dtype.
        bias: optional [V] lm_head bias.
        temperature: softmax temperature T > 0.
        chunk_size: rows per chunk. torch backend: logits are built for this many rows at a time (peak extra memory
            ~ chunk x V x (2 itemsize + 16) bytes); None picks it from free memory. triton backend: rows per launch
            (the kernel never builds logits; None = all rows).
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).

    Returns:
        [...] float32 KL in nats, >= 0.
    """
    check_fused_linear_args(hidden_vis, hidden_txt, lm_head_weight, bias, chunk_size)
    check_temperature(temperature)
    lead = hidden_vis.shape[:-1]
    backend, hv, ht, weight, bias = _prepare(hidden_vis, hidden_txt, lm_head_weight, bias, backend)
    with torch.no_grad():
        if backend == "torch":
            chunk = chunk_size or default_chunk_rows(weight.shape[0], weight.element_size(), weight.device)
            kl = fused_linear_token_kl_torch(hv, ht, weight, bias, temperature, chunk)
        else:
            kl = fused_linear_forward(hv, ht, weight, bias, None, temperature, chunk_size)[0]
    return kl.reshape(lead)


def fused_linear_token_stats(
    hidden_vis: torch.Tensor,
    hidden_txt: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = TEMPERATURE,
    chunk_size: int | None = None,
    estimator: str = ESTIMATOR,
    backend: str = "auto",
) -> TokenStats:
    """token_stats from hidden states: (log pi_vis(target), entropy of pi_vis, S_t) without the [N, V] logits.

    Args:
        hidden_vis, hidden_txt, lm_head_weight, bias, temperature, chunk_size, backend: as in fused_linear_token_kl.
        target_ids: [...] integer ids of the sampled tokens in [0, V), the hidden states' leading shape.
        estimator: "full" (exact KL) or "k3" (the paper's sampled-token estimate).

    Returns:
        TokenStats(logp, entropy, kl), each [...] float32 (no gradient).
    """
    check_fused_linear_args(hidden_vis, hidden_txt, lm_head_weight, bias, chunk_size)
    check_temperature(temperature)
    check_estimator(estimator)
    lead = hidden_vis.shape[:-1]
    check_target_ids(target_ids, lead, lm_head_weight.shape[0], hidden_vis.device)
    backend, hv, ht, weight, bias = _prepare(hidden_vis, hidden_txt, lm_head_weight, bias, backend, (target_ids,))
    target = target_ids.reshape(-1).contiguous()
    with torch.no_grad():
        if backend == "torch":
            chunk = chunk_size or default_chunk_rows(weight.shape[0], weight.element_size(), weight.device)
            logp, logq, ent, kl = fused_linear_token_stats_torch(hv, ht, weight, target, bias, temperature, chunk)
        else:
            kl, logp, logq, ent = fused_linear_forward(hv, ht, weight, bias, target, temperature, chunk_size)
    return finish_stats(logp, logq, ent, kl, estimator, lead)
