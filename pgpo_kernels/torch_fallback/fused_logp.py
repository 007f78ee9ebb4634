"""Torch fallback of fused_linear_logp: log pi(target) (+ entropy) from hidden states, chunked over rows.

Forward and backward each build the logits of `chunk_rows` rows at a time and free them before the next chunk, so
the extra memory is a few [chunk, V] buffers plus the [N] row stats the backward reads (log-sum-exp, entropy), never
[N, V]. The backward recomputes each chunk's logits (as the Triton kernel does tile by tile):

    d = g_logp (onehot - p) / T  -  g_ent p (log p + H) / T        [chunk, V], the gradient w.r.t. the logits
    grad_hidden[chunk] = d @ W,   grad_W += d^T @ hidden[chunk],   grad_bias += d.sum(0)

Logits are computed in the input dtype (as an unfused lm_head) and then in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgpo_kernels.torch_fallback.common import compute_dtype

# our choice: one [chunk, V] fp32 buffer of at most this many bytes (a pass holds a few of them): 13 rows at
# V = 152064. Measured on this CPU (H = 64, N = 1024, fwd + bwd, peak RSS): 52 MB extra with 8 MiB chunks (39 MB of it
# the fp32 weight gradient), 100 MB with 16 MiB, 265 MB with 32 MiB (more than the buffers add up to; the cause, the
# allocator or BLAS packing, is not pinned down); 8 MiB chunks were not slower than 32 MiB ones
CHUNK_BYTES = 8 << 20


def default_logp_chunk_rows(n_cols: int) -> int:
    """Rows per chunk so one fp32 [chunk, V] buffer stays under CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(n_cols, 1)))


def _chunk_logits(h, weight, bias, dt, temperature):
    z = F.linear(h, weight, bias).to(dt)  # [c, V]; a new tensor unless dt is the input dtype
    return z.div_(temperature) if temperature != 1.0 else z


class ChunkedLinearLogp(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, target [N]) -> (logp [N], entropy [N]) in the compute dtype.

    Ignored rows (target == ignore_index) get logp 0, entropy 0 and no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temperature, with_entropy, ignore_index, chunk_rows):
        n_rows = hidden.shape[0]
        dt = compute_dtype(hidden.dtype)
        valid = target != ignore_index
        safe = torch.where(valid, target, 0).long()
        logp = torch.zeros(n_rows, dtype=dt, device=hidden.device)
        ent = torch.zeros(n_rows, dtype=dt, device=hidden.device)
        lse = torch.zeros(n_rows, dtype=dt, device=hidden.device)
        with torch.no_grad():
            for lo in range(0, n_rows, chunk_rows):
                hi = min(lo + chunk_rows, n_rows)
                z = _chunk_logits(hidden[lo:hi], weight, bias, dt, temperature)
                lse_c = torch.logsumexp(z, -1)
                lse[lo:hi] = lse_c
                logp[lo:hi] = z.gather(-1, safe[lo:hi, None]).squeeze(-1) - lse_c
                if with_entropy:  # H = lse - sum p z
                    p = z.sub(lse_c[:, None]).exp_()
                    ent[lo:hi] = lse_c - (p * z).sum(-1)
                    del p
                del z
        logp = torch.where(valid, logp, 0.0)
        ent = torch.where(valid, ent, 0.0).clamp_min(0.0) if with_entropy else ent
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, ent)
        ctx.temperature, ctx.with_entropy, ctx.chunk_rows = temperature, with_entropy, chunk_rows
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, safe, valid, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        dt = lse.dtype
        n_rows = hidden.shape[0]
        zero = torch.zeros((), dtype=dt, device=hidden.device)
        g_logp = torch.where(valid, g_logp.to(dt), zero) if g_logp is not None else torch.zeros_like(lse)
        g_ent = torch.where(valid, g_ent.to(dt), zero) if (g_ent is not None and ctx.with_entropy) else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if need_b else None
        w_dt = weight.to(dt) if need_h else None  # a copy only for 16-bit weights: [V, H], not N-sized
        with torch.no_grad():
            for lo in range(0, n_rows, chunk_rows):
                hi = min(lo + chunk_rows, n_rows)
                logp = _chunk_logits(hidden[lo:hi], weight, bias, dt, temperature).sub_(lse[lo:hi, None])
                d = logp.exp()  # p
                if g_ent is not None:  # d = -p (g_logp + g_ent (log p + H)), built in logp's buffer
                    d = logp.add_(ent[lo:hi, None]).mul_(g_ent[lo:hi, None]).add_(g_logp[lo:hi, None]).mul_(d).neg_()
                else:
                    d.mul_(-g_logp[lo:hi, None])
                del logp
                d.scatter_add_(-1, safe[lo:hi, None], g_logp[lo:hi, None])
                if temperature != 1.0:
                    d.div_(temperature)
                if need_h:
                    grad_h[lo:hi] = (d @ w_dt).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(d.T, hidden[lo:hi].to(dt))
                if need_b:
                    grad_b += d.sum(0)
                del d
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_logp_torch(hidden, weight, bias, target, temperature, with_entropy, ignore_index, chunk_rows):
    """[N, H], [V, H], [V] | None, [N] -> (logp, entropy) [N] each (fp32; fp64 for fp64 inputs)."""
    logp, ent = ChunkedLinearLogp.apply(hidden, weight, bias, target, float(temperature), bool(with_entropy),
                                        int(ignore_index), int(chunk_rows))
    return logp, ent
