"""Per-token log pi(target), entropy and KL from the two passes' [N, V] logits, in one read of each.

The old-log-prob phase of an RL step needs log pi_vis(x_t) and the entropy of pi_vis anyway; PGPO's KL to the
text-only pass shares their log-sum-exp, so one streaming pass over the vocabulary yields all three. The running
stats are online_softmax's (fold, merge): s_a, s_b, t, u and hit relative to the maxes m_a, m_b, with logit
differences d in UNITs of 2^-21 and S = log2(e) / (T UNIT). In nats,

    KL = (t / s_a) / (T UNIT) + ln2 (log2 s_b - log2 s_a),   H = ln2 log2 s_a - (u / s_a) / (T UNIT),
    log pi_vis(x) = (a_x UNIT - m_a UNIT) / (T UNIT) - ln2 log2 s_a

Loop structure (docs/design/fused_ops.md has the compiled instruction counts): each program streams one row (or one
vocab chunk of it) as [threads, EPT] tiles, so every thread folds the EPT contiguous columns it loaded (one 16-byte
load per tensor) into its *own* running stats; nothing crosses threads inside the vocab loop, which is software
pipelined (tl.range num_stages). After the loop the threads' stats merge once. With one chunk per row the program
also finishes the row, reading the target's logits as two scalars (a[row, tgt], b[row, tgt]); with several chunks it
writes N_PART = 7 stats per (row, chunk) and a combine kernel merges them the same way and finishes.

Non-finite inputs (the project's rules): a NaN or +inf anywhere in a row of either input makes every output of that
row NaN (max is NaN-propagating, so NaN reaches every sum, and the finish checks the sums). Huge finite logits never
overflow an intermediate (online_softmax's UNITs).

Rows address a [B, T, V] view through a (batch, time) stride pair, so a slice such as logits[:, :-1] is read in
place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pgpo_kernels.defaults import ESTIMATOR
from pgpo_kernels.defaults import TEMPERATURE
from pgpo_kernels.k3 import check_estimator
from pgpo_kernels.k3 import k3_kl
from pgpo_kernels.online_softmax import LN2_C
from pgpo_kernels.online_softmax import LOG2E
from pgpo_kernels.online_softmax import N_PART
from pgpo_kernels.online_softmax import N_PART_C
from pgpo_kernels.online_softmax import NEG_MAX_C
from pgpo_kernels.online_softmax import UNIT
from pgpo_kernels.online_softmax import UNIT_C
from pgpo_kernels.online_softmax import chunk_layout
from pgpo_kernels.online_softmax import fold
from pgpo_kernels.online_softmax import init_stats
from pgpo_kernels.online_softmax import is_nan
from pgpo_kernels.online_softmax import merge
from pgpo_kernels.online_softmax import split_chunks
from pgpo_kernels.torch_fallback.token_stats import token_stats_torch
from pgpo_kernels.utils import as_rows
from pgpo_kernels.utils import autotune_enabled
from pgpo_kernels.utils import check_logits_pair
from pgpo_kernels.utils import check_temperature
from pgpo_kernels.utils import device_sm_count
from pgpo_kernels.utils import next_power_of_2
from pgpo_kernels.utils import resolve_backend
from pgpo_kernels.utils import row_view


class TokenStats(NamedTuple):
    """Per-token statistics of one RL step's two passes, each [...] float32.

    logp: log pi_vis(target) <= 0 (the old log-prob); entropy: H(pi_vis) in [0, log V] nats; kl: the visual
    dependency S_t (full: KL(pi_vis || pi_txt) >= 0; k3: the sampled-token estimate).
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


# %% device helpers ------------------------------------------------------------------------------------------------
@triton.jit
def _finish_kl(S_a, S_b, T, HIT, inv_tu):
    """KL in nats (T in UNITs: inv_tu = 1 / (temperature UNIT) converts); an all -inf row of a has no distribution
    (0); a finite a_i where b_i = -inf gives +inf."""
    kl = inv_tu * (T / S_a) + LN2_C * (tl.log2(S_b) - tl.log2(S_a))
    kl = tl.where(HIT > float("-inf"), float("inf"), kl)
    kl = tl.where(S_a == 0.0, 0.0, kl)
    kl = tl.where(kl < 0.0, 0.0, kl)  # tiny negative rounding; a where, not a max, so NaN survives
    return tl.where(is_nan(S_a) | is_nan(S_b) | is_nan(T), float("nan"), kl)


@triton.jit
def _finish_entropy(S_a, U, inv_tu):
    ent = LN2_C * tl.log2(S_a) - inv_tu * (U / S_a)
    ent = tl.where(S_a == 0.0, 0.0, ent)
    return tl.where(ent < 0.0, 0.0, ent)


@triton.jit
def _finish_logp(x_t, M, S, inv_tu):
    """log softmax at the target in nats: (x_t - M) / T in UNITs (no overflow), minus ln S; no distribution (S = 0)
    -> -inf."""
    lp = (x_t * UNIT_C - M * UNIT_C) * inv_tu - LN2_C * tl.log2(S)
    lp = tl.where(S == 0.0, float("-inf"), lp)
    return tl.where(lp > 0.0, 0.0, lp)  # clamp tiny positive rounding when p(target) ~ 1


@triton.jit
def _finish_row(M_a, S_a, M_b, S_b, T, U, HIT, x_t, y_t, row, kl_ptr, logp_ptr, logq_ptr, ent_ptr, scale_u,
                WITH_TARGET: tl.constexpr):
    """Write one row's outputs; a NaN anywhere in the row's stats (a NaN or +inf logit) makes all of them NaN."""
    bad = is_nan(S_a) | is_nan(S_b) | is_nan(T) | is_nan(U)
    inv_tu = scale_u * LN2_C  # 1 / (temperature UNIT)
    tl.store(kl_ptr + row, _finish_kl(S_a, S_b, T, HIT, inv_tu))
    if WITH_TARGET:
        tl.store(ent_ptr + row, tl.where(bad, float("nan"), _finish_entropy(S_a, U, inv_tu)))
        tl.store(logp_ptr + row, tl.where(bad, float("nan"), _finish_logp(x_t, M_a, S_a, inv_tu)))
        tl.store(logq_ptr + row, tl.where(bad, float("nan"), _finish_logp(y_t, M_b, S_b, inv_tu)))


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    """Element offset of a row of a [outer, inner, V] view (row ids int64: N * V can pass 2**31)."""
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


# %% kernels -------------------------------------------------------------------------------------------------------
@triton.jit
def _token_stats_kernel(
    a_ptr,  # [outer, inner, V] logits of the visual pass, last dim contiguous
    b_ptr,  # [outer, inner, V] logits of the text-only pass
    target_ptr,  # [N] int32/int64 target ids in [0, V) (unused without WITH_TARGET)
    part_ptr,  # SPLIT: [N, C, 7] float32 partial stats
    kl_ptr,  # not SPLIT: [N] float32 outputs
    logp_ptr,
    logq_ptr,
    ent_ptr,
    n_cols,  # V
    n_inner,  # rows per outer index (T of a [B, T, V] view)
    stride_a_outer,
    stride_a_inner,
    stride_b_outer,
    stride_b_inner,
    cols_per_chunk,  # a multiple of BLOCK_V (any value >= V without SPLIT)
    n_chunks,  # C
    scale_u,  # log2(e) / (temperature UNIT)
    WITH_TARGET: tl.constexpr,  # also entropy and the target's log-probs
    SPLIT: tl.constexpr,  # several vocab chunks per row: write partial stats for the combine kernel
    BLOCK_V: tl.constexpr,  # columns per tile = threads x EPT
    EPT: tl.constexpr,  # contiguous columns per thread per tile (one 16-byte load per tensor in bf16)
    NUM_STAGES: tl.constexpr,  # software-pipeline depth of the vocab loop
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    a_row = a_ptr + _row_offset(row, n_inner, stride_a_outer, stride_a_inner)
    b_row = b_ptr + _row_offset(row, n_inner, stride_b_outer, stride_b_inner)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, n_cols)
    NT: tl.constexpr = BLOCK_V // EPT
    offs = tl.arange(0, NT)[:, None] * EPT + tl.arange(0, EPT)[None, :]  # [NT, EPT]: a thread's columns in a row

    m_a, s_a, m_b, s_b, t, u, hit = init_stats(NT)
    full_end = col_start + (col_end - col_start) // BLOCK_V * BLOCK_V
    # whole tiles: unmasked 16-byte loads, fp32 whatever the input dtype
    for start in tl.range(col_start, full_end, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(a_row + start + offs).to(tl.float32)
        y = tl.load(b_row + start + offs).to(tl.float32)
        m_a, s_a, m_b, s_b, t, u, hit = fold(m_a, s_a, m_b, s_b, t, u, hit, x, y, scale_u, WITH_TARGET)
    if full_end < col_end:  # the ragged last tile: padded lanes are -inf, which contribute nothing
        ok = full_end + offs < col_end
        x = tl.load(a_row + full_end + offs, mask=ok, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row + full_end + offs, mask=ok, other=float("-inf")).to(tl.float32)
        m_a, s_a, m_b, s_b, t, u, hit = fold(m_a, s_a, m_b, s_b, t, u, hit, x, y, scale_u, WITH_TARGET)
    # the one cross-thread step: merge the threads' stats
    M_a, S_a, M_b, S_b, T, U, HIT = merge(m_a, s_a, m_b, s_b, t, u, hit, scale_u, WITH_TARGET)
    if SPLIT:
        base = part_ptr + (row * n_chunks + chunk) * N_PART_C
        tl.store(base + 0, M_a)
        tl.store(base + 1, S_a)
        tl.store(base + 2, M_b)
        tl.store(base + 3, S_b)
        tl.store(base + 4, T)
        tl.store(base + 5, U)
        tl.store(base + 6, HIT)
    else:
        x_t = 0.0
        y_t = 0.0
        if WITH_TARGET:  # the target's logits: two scalar loads
            tgt = tl.load(target_ptr + row).to(tl.int64)
            x_t = tl.load(a_row + tgt).to(tl.float32)
            y_t = tl.load(b_row + tgt).to(tl.float32)
        _finish_row(M_a, S_a, M_b, S_b, T, U, HIT, x_t, y_t, row, kl_ptr, logp_ptr, logq_ptr, ent_ptr, scale_u,
                    WITH_TARGET)


@triton.jit
def _token_stats_combine_kernel(
    part_ptr,  # [N, C, 7] float32 partial stats
    target_ptr,  # [N] int target ids (unused without WITH_TARGET)
    a_ptr,  # TARGET_LOGITS: [N, 2] float32 target logits (a_x, b_x); else the [outer, inner, V] logits of a
    b_ptr,  # the [outer, inner, V] logits of b (unused with TARGET_LOGITS)
    kl_ptr,  # [N] float32 KL
    logp_ptr,  # [N] float32 log pi_vis(target) (unused without WITH_TARGET)
    logq_ptr,  # [N] float32 log pi_txt(target)
    ent_ptr,  # [N] float32 entropy of pi_vis
    n_chunks,  # C
    n_inner,
    stride_a_outer,
    stride_a_inner,
    stride_b_outer,
    stride_b_inner,
    scale_u,  # log2(e) / (temperature UNIT)
    WITH_TARGET: tl.constexpr,
    TARGET_LOGITS: tl.constexpr,  # target logits given (fused_linear computes them from the hidden states)
    BLOCK_C: tl.constexpr,
):
    # merge C chunk stats with the streaming rule, then finish the row
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < n_chunks
    base = part_ptr + row * n_chunks * N_PART_C + offs * N_PART_C
    m_a = tl.load(base + 0, mask=ok, other=NEG_MAX_C)
    s_a = tl.load(base + 1, mask=ok, other=0.0)
    m_b = tl.load(base + 2, mask=ok, other=NEG_MAX_C)
    s_b = tl.load(base + 3, mask=ok, other=0.0)
    t = tl.load(base + 4, mask=ok, other=0.0)
    u = tl.load(base + 5, mask=ok, other=0.0)
    hit = tl.load(base + 6, mask=ok, other=float("-inf"))
    M_a, S_a, M_b, S_b, T, U, HIT = merge(m_a, s_a, m_b, s_b, t, u, hit, scale_u, WITH_TARGET)
    x_t = 0.0
    y_t = 0.0
    if WITH_TARGET:
        if TARGET_LOGITS:
            x_t = tl.load(a_ptr + row * 2)
            y_t = tl.load(a_ptr + row * 2 + 1)
        else:
            tgt = tl.load(target_ptr + row).to(tl.int64)
            x_t = tl.load(a_ptr + _row_offset(row, n_inner, stride_a_outer, stride_a_inner) + tgt).to(tl.float32)
            y_t = tl.load(b_ptr + _row_offset(row, n_inner, stride_b_outer, stride_b_inner) + tgt).to(tl.float32)
    _finish_row(M_a, S_a, M_b, S_b, T, U, HIT, x_t, y_t, row, kl_ptr, logp_ptr, logq_ptr, ent_ptr, scale_u,
                WITH_TARGET)


# %% launch configuration ------------------------------------------------------------------------------------------
def stats_launch_config(n_cols: int, itemsize: int) -> dict:
    """The heuristic config (what the interpreter, the split path and the AOT tests use): 16-byte loads per thread,
    16 warps on long rows, 2 pipeline stages."""
    ept = max(1, 16 // itemsize)
    block_v = min(4096, max(next_power_of_2(n_cols), 32 * ept))
    num_warps = max(1, min(16, block_v // (32 * ept)))
    return {"BLOCK_V": 32 * num_warps * ept, "EPT": ept, "NUM_STAGES": 2, "num_warps": num_warps}


# (EPT, warps, stages): 16-byte loads (EPT 8 in bf16/fp16, 4 in fp32) or 32-byte ones, 8 or 16 warps; EPT 4 runs
# 2 stages only (3 stages spend > 32 SASS per pair on the pipeline at 4 columns per thread, compiled for sm_90a)
AUTOTUNE_CONFIGS = [triton.Config({"BLOCK_V": 32 * w * e, "EPT": e, "NUM_STAGES": s}, num_warps=w)
                    for e in (4, 8, 16) for w in (8, 16) for s in ((2,) if e == 4 else (2, 3))]
_token_stats_kernel_autotuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["n_cols"])(_token_stats_kernel)


# %% launchers -----------------------------------------------------------------------------------------------------
def combine_stats(part: torch.Tensor, target: torch.Tensor | None, scale: float, target_logits=None, views=None):
    """Launch the combine on [N, C, 7] partial stats -> (kl, logp, logp_txt, entropy), [N] float32 each (the last
    three None without target). The target logits come from target_logits [N, 2] fp32 or from the two RowViews."""
    n_rows, n_chunks, _ = part.shape
    kl = torch.empty(n_rows, dtype=torch.float32, device=part.device)
    with_target = target is not None
    logp, logq, ent = (torch.empty_like(kl) for _ in range(3)) if with_target else (kl, kl, kl)
    given = target_logits is not None
    if given or not with_target:
        a_ptr, b_ptr, strides = (target_logits if given else kl), kl, (1, 0, 0, 0, 0)
    else:
        va, vb = views
        a_ptr, b_ptr = va.tensor, vb.tensor
        strides = (va.n_inner, va.stride_outer, va.stride_inner, vb.stride_outer, vb.stride_inner)
    _token_stats_combine_kernel[(n_rows,)](
        part, target if with_target else kl, a_ptr, b_ptr, kl, logp, logq, ent, n_chunks, *strides, scale / UNIT,
        WITH_TARGET=with_target, TARGET_LOGITS=given, BLOCK_C=next_power_of_2(n_chunks), num_warps=1,
    )
    if not with_target:
        return kl, None, None, None
    return kl, logp, logq, ent


def token_stats_forward(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    n_chunks: int | None = None,
):
    """Launch the stats kernels on [..., V] logits and [...] targets (checked by the caller).

    [B, T, V] views (e.g. logits[:, :-1]) are read in place through their strides. Returns (logp, logp_txt,
    entropy, kl), [N] float32 each. n_chunks: vocab split per row, None = from the shape and the SM count.
    """
    va, vb = row_view(logits_vis), row_view(logits_txt)
    if va.n_inner != vb.n_inner:  # different leading-dim merges: fall back to plain rows for both
        va, vb = row_view(as_rows(logits_vis)), row_view(as_rows(logits_txt))
    target = target_ids.reshape(-1).contiguous()
    n_rows, n_cols = va.n_rows, va.n_cols
    device = va.tensor.device
    outs = [torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(4)]
    if n_rows == 0:
        return tuple(outs)
    kl, logp, logq, ent = outs
    scale_u = LOG2E / (float(temperature) * UNIT)
    cfg = stats_launch_config(n_cols, va.tensor.element_size())
    if n_chunks is None:
        n_chunks = split_chunks(n_rows, n_cols, cfg["BLOCK_V"], device_sm_count(device))
    cols_per_chunk, n_chunks = chunk_layout(n_cols, n_chunks, cfg["BLOCK_V"])
    strides = (va.n_inner, va.stride_outer, va.stride_inner, vb.stride_outer, vb.stride_inner)
    if n_chunks == 1:
        args = (va.tensor, vb.tensor, target, kl, kl, logp, logq, ent, n_cols, *strides, n_cols, 1, scale_u)
        if autotune_enabled(device):
            _token_stats_kernel_autotuned[(n_rows, 1)](*args, WITH_TARGET=True, SPLIT=False)
        else:
            _token_stats_kernel[(n_rows, 1)](*args, WITH_TARGET=True, SPLIT=False, BLOCK_V=cfg["BLOCK_V"],
                                             EPT=cfg["EPT"], NUM_STAGES=cfg["NUM_STAGES"],
                                             num_warps=cfg["num_warps"])
        return logp, logq, ent, kl
    part = torch.empty((n_rows, n_chunks, N_PART), dtype=torch.float32, device=device)
    _token_stats_kernel[(n_rows, n_chunks)](
        va.tensor, vb.tensor, target, part, kl, kl, kl, kl, n_cols, *strides, cols_per_chunk, n_chunks, scale_u,
        WITH_TARGET=True, SPLIT=True, BLOCK_V=cfg["BLOCK_V"], EPT=cfg["EPT"], NUM_STAGES=cfg["NUM_STAGES"],
        num_warps=cfg["num_warps"],
    )
    kl, logp, logq, ent = combine_stats(part, target, LOG2E / float(temperature), views=(va, vb))
    return logp, logq, ent, kl


# %% public functional ---------------------------------------------------------------------------------------------
def check_target_ids(target_ids: torch.Tensor, lead_shape: torch.Size, n_cols: int, device: torch.device) -> None:
    """Integer [...] ids in [0, V) with the logits' leading shape. Reads min/max on the host: one small sync."""
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError(f"target_ids must be an integer torch.Tensor of shape {tuple(lead_shape)}, got "
                        f"{type(target_ids).__name__}")
    if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
        raise TypeError(f"target_ids must be an integer (int32/int64) tensor of shape {tuple(lead_shape)}, got "
                        f"{target_ids.dtype}")
    if target_ids.shape != lead_shape:
        raise ValueError(f"target_ids must have the logits' leading shape {tuple(lead_shape)} (logits are [..., V]), "
                         f"got {tuple(target_ids.shape)}")
    if target_ids.device != device:
        raise ValueError(f"target_ids must be on the logits' device {device}, got {target_ids.device}")
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= n_cols)).any()):  # host sync: a bad id would
        raise ValueError(f"target_ids must lie in [0, V) = [0, {n_cols}); mask ignored positions (e.g. -100) "
                         "to a valid id before the call")  # read out of bounds in the kernel


def _row_blocks(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor):
    """[..., V] x2 and [...] targets as [n, V] row blocks in order, views where possible: a [B, T, V] slice such as
    logits[:, :-1] goes batch row by batch row instead of being copied whole."""
    try:
        return [(a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1]), target.reshape(-1))]
    except RuntimeError:
        if a.dim() < 3:
            return [(as_rows(a), as_rows(b), target.reshape(-1))]
        return [blk for i in range(a.shape[0]) for blk in _row_blocks(a[i], b[i], target[i])]


def finish_stats(logp, logq, ent, kl, estimator: str, lead: torch.Size) -> TokenStats:
    """Pick the estimator for the kl field and restore the leading shape."""
    if estimator == "k3":
        kl = k3_kl(logp, logq)
    return TokenStats(logp.reshape(lead), ent.reshape(lead), kl.reshape(lead))


def token_stats(
    logits_vis: torch.Tensor,
    logits_txt: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    estimator: str = ESTIMATOR,
    backend: str = "auto",
) -> TokenStats:
    """log pi_vis(target), entropy of pi_vis and the visual dependency S_t, in one read of each logit tensor.

    PGPO (arXiv 2604.01840) weights tokens by S_t = KL(pi_vis || pi_txt); the old-log-prob phase of the RL step
    computes log pi_vis(x_t) (and often the entropy) from the same logits, so this op serves both.

    Args:
        logits_vis: [..., V] logits of the visual pass (bf16, fp16, fp32 or fp64).
        logits_txt: [..., V] logits of the text-only pass, same shape.
        target_ids: [...] integer ids of the sampled tokens, in [0, V).
        temperature: softmax temperature T > 0 (applied to both passes).
        estimator: "full" (exact KL over the vocabulary) or "k3" (the paper's appendix estimate from the sampled
            token: r = pi_txt(x) / pi_vis(x), S = r - 1 - log r).
        backend: "triton", "torch" or "auto" (triton on CUDA tensors, torch otherwise).

    Returns:
        TokenStats(logp, entropy, kl), each [...] float32, no gradient. A row whose visual logits are all -inf has
        no distribution: logp -inf, entropy 0, kl 0 (our choice). A NaN or +inf logit in a row of either input makes
        all three NaN for that row; huge finite logits give the true values.
    """
    check_logits_pair(logits_vis, logits_txt)
    check_temperature(temperature)
    check_estimator(estimator)
    lead = logits_vis.shape[:-1]
    check_target_ids(target_ids, lead, logits_vis.shape[-1], logits_vis.device)
    backend = resolve_backend(backend, logits_vis, logits_txt, target_ids)
    with torch.no_grad():  # weights, not a loss: no output carries a grad_fn on either backend
        if backend == "torch":
            parts = [token_stats_torch(a, b, t, temperature) for a, b, t in _row_blocks(logits_vis, logits_txt,
                                                                                          target_ids)]
            logp, logq, ent, kl = (torch.cat(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]
        else:
            logp, logq, ent, kl = token_stats_forward(logits_vis, logits_txt, target_ids, temperature)
        return finish_stats(logp, logq, ent, kl, estimator, lead)

