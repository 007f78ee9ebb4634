"""The backends a case is run on, side by side. Each builds a no-argument callable for a case, or says why it can't.

    pgpo-triton    our Triton kernels (CUDA only; on the CPU they run only in Triton's interpreter, never timed)
    pgpo-torch     our torch fallback (chunked over rows, memory-frugal)
    torch-eager    what a trainer writes by hand: log_softmax of both in fp32, sum p * (log p - log q)
    torch-compile  torch.compile of that same function (compile time is excluded from the timing, kept separately)
    liger          Liger-Kernel's KL-div fed the log-softmaxes it needs (their cost counts); CUDA only
    lm_head+pgpo   linear op only: lm_head matmul of both passes, then our token_kl

A backend that cannot run raises Unavailable with the reason; the report lists it instead of dropping it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pgpo_kernels import fused_linear_token_kl
from pgpo_kernels import pgpo_token_weights
from pgpo_kernels import reshape_weights
from pgpo_kernels import token_kl
from pgpo_kernels import token_stats
from pgpo_kernels.torch_fallback.reshape import reshape_weights_torch
from pgpo_kernels.utils import interpreter_enabled

from .cases import BETA
from .cases import EPS
from .cases import TAU
from .cases import Case

BACKENDS = ("pgpo-triton", "pgpo-torch", "torch-eager", "torch-compile", "liger", "lm_head+pgpo")
OP_BACKENDS = {
    "kl": BACKENDS[:5],
    "reshape": BACKENDS[:5],
    "weights": BACKENDS[:5],
    "stats": BACKENDS[:5],
    "linear": BACKENDS,
}

TRITON_CPU_REASON = ("Triton kernels need a CUDA device; on the CPU they run only in Triton's interpreter "
                     "(TRITON_INTERPRET=1), whose timings say nothing about kernel speed")
TRITON_INTERPRET_REASON = ("TRITON_INTERPRET=1 is set, so the kernels would run in the interpreter; unset it to "
                           "time the compiled kernels")
LIGER_CPU_REASON = "Liger-Kernel's ops are Triton GPU kernels with no CPU path"


class Unavailable(Exception):
    """A backend that cannot run a case here; str(exc) is the reason listed in the report."""


# %% baselines written as a trainer would ---------------------------------------------------------------------------
def eager_token_kl(logits_vis: torch.Tensor, logits_txt: torch.Tensor) -> torch.Tensor:
    """KL(softmax(a) || softmax(b)) per row the plain way: two [..., V] fp32 log-softmaxes, then sum over V."""
    # our choice: upcast before log_softmax, as trainers do (bf16 log-probs are too coarse for a KL)
    logp = torch.log_softmax(logits_vis.float(), dim=-1)  # [..., V] fp32
    logq = torch.log_softmax(logits_txt.float(), dim=-1)  # [..., V] fp32
    return (logp.exp() * (logp - logq)).sum(-1)  # [...]


def eager_token_stats(logits_vis: torch.Tensor, logits_txt: torch.Tensor, target_ids: torch.Tensor) -> dict:
    """log p(target), entropy of p and KL(p || q) per row, from fp32 log-softmaxes: -> dict of [N] tensors."""
    logp = torch.log_softmax(logits_vis.float(), dim=-1)  # [N, V]
    logq = torch.log_softmax(logits_txt.float(), dim=-1)  # [N, V]
    p = logp.exp()
    return {
        "logp": logp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1),
        "entropy": -(p * logp).sum(-1),
        "kl": (p * (logp - logq)).sum(-1),
    }


def eager_reshape_loop(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The PGPO reshape as written from the paper: a Python loop over sequences, fp32. [B, T] -> [B, T]."""
    out = torch.zeros_like(scores, dtype=torch.float32)
    for i in range(scores.shape[0]):
        s = torch.log1p(scores[i][mask[i]].float())  # valid tokens only
        m, M = s.min(), s.max()
        I = (s - m) / (M - m + EPS)
        w = torch.where(I < TAU, I / (TAU + EPS), 1.0 + BETA * (I - TAU) / (1.0 - TAU + EPS))
        # degenerate sequences (all-equal, one token) get weight 1, as pgpo does; no host sync
        w = torch.where(M > m, w * s.numel() / w.sum().clamp_min(1e-30), torch.ones_like(w))
        out[i, mask[i]] = w
    return out


def _lm_head_eager_kl(hidden_vis, hidden_txt, weight):
    return eager_token_kl(torch.nn.functional.linear(hidden_vis, weight), torch.nn.functional.linear(hidden_txt, weight))


def _eager_weights(logits_vis, logits_txt, mask):
    kl = eager_token_kl(logits_vis, logits_txt)  # [B, T]
    return eager_reshape_loop(kl, mask), kl


def _compilable_weights(logits_vis, logits_txt, mask):
    # the loop's boolean indexing has data-dependent shapes; compile the vectorized torch reshape instead
    kl = eager_token_kl(logits_vis, logits_txt)
    return reshape_weights_torch(kl, mask, None, TAU, BETA, EPS, True), kl


def _compilable_reshape(scores, mask):
    return reshape_weights_torch(scores, mask, None, TAU, BETA, EPS, True)


_COMPILE_TARGETS = {
    "kl": eager_token_kl,
    "reshape": _compilable_reshape,
    "weights": _compilable_weights,
    "linear": _lm_head_eager_kl,
    "stats": eager_token_stats,
}
_compiled: dict[str, Callable] = {}  # one compiled function per op, reused across a sweep


# %% Liger, imported lazily (the bench extra) ------------------------------------------------------------------------
def liger_kl_function():
    """Liger's autograd KL-div Function, or Unavailable with the reason."""
    try:
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not installed (pip install 'pgpo[bench]'): {exc}") from exc
    except Exception as exc:  # e.g. a liger release that does not import beside this torch/triton
        raise Unavailable(f"liger-kernel failed to import: {type(exc).__name__}: {exc}") from exc
    return LigerKLDivLossFunction


def liger_token_kl(logits_vis: torch.Tensor, logits_txt: torch.Tensor) -> torch.Tensor:
    """Liger KL-div per row: fed fp32 log-softmaxes (their cost counts), reduction='none' [N, V], then sum over V.

    Liger's public API has no per-row reduction: "none" returns the [N, V] elementwise terms and "sum" a scalar.
    y_pred = log q (text-only), y_true = log p (visual) with log_target=True gives sum_i p_i (log p_i - log q_i).
    """
    fn = liger_kl_function()
    shape = logits_vis.shape[:-1]
    logp = torch.log_softmax(logits_vis.float(), dim=-1).reshape(-1, logits_vis.shape[-1])  # [N, V]
    logq = torch.log_softmax(logits_txt.float(), dim=-1).reshape(-1, logits_txt.shape[-1])  # [N, V]
    return fn.apply(logq, logp, "none", True, 1e-10).sum(-1).reshape(shape)


def _liger_weights(logits_vis, logits_txt, mask):
    # Liger has no reshape: its KL, then our reshape on the same device (a small share of the time)
    kl = liger_token_kl(logits_vis, logits_txt)  # [B, T]
    return reshape_weights(kl, mask, tau=TAU, beta=BETA, eps=EPS), kl


# %% building a backend's callable for a case -----------------------------------------------------------------------
def _pgpo(case: Case, backend: str) -> Callable[[], Any]:
    x = case.inputs
    if case.op == "kl":
        return lambda: token_kl(x["logits_vis"], x["logits_txt"], backend=backend)
    if case.op == "reshape":
        return lambda: reshape_weights(x["scores"], x["mask"], tau=TAU, beta=BETA, eps=EPS, backend=backend)
    if case.op == "weights":
        return lambda: pgpo_token_weights(x["logits_vis"], x["logits_txt"], x["mask"], tau=TAU, beta=BETA, eps=EPS,
                                          backend=backend)
    if case.op == "linear":
        return lambda: fused_linear_token_kl(x["hidden_vis"], x["hidden_txt"], x["lm_head_weight"], backend=backend)
    return lambda: token_stats(x["logits_vis"], x["logits_txt"], x["target_ids"], backend=backend)


def _eager(case: Case) -> Callable[[], Any]:
    x = case.inputs
    if case.op == "kl":
        return lambda: eager_token_kl(x["logits_vis"], x["logits_txt"])
    if case.op == "reshape":
        return lambda: eager_reshape_loop(x["scores"], x["mask"])
    if case.op == "weights":
        return lambda: _eager_weights(x["logits_vis"], x["logits_txt"], x["mask"])
    if case.op == "linear":
        return lambda: _lm_head_eager_kl(x["hidden_vis"], x["hidden_txt"], x["lm_head_weight"])
    return lambda: eager_token_stats(x["logits_vis"], x["logits_txt"], x["target_ids"])


def _compile(case: Case) -> Callable[[], Any]:
    if case.op not in _compiled:
        _compiled[case.op] = torch.compile(_COMPILE_TARGETS[case.op])
    f = _compiled[case.op]
    args = tuple(case.inputs.values())  # every target takes the case's inputs in their build order
    for t in args:
        # our choice: the row (or sequence) count is dynamic, so a token sweep does not compile once per size; it still
        # compiles a few times (torch specializes a size of 1, and reshape/weights change T too while N < seq_len)
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return lambda: f(*args)


def _liger(case: Case) -> Callable[[], Any]:
    if case.device.type != "cuda":
        raise Unavailable(LIGER_CPU_REASON)
    x = case.inputs
    if case.op == "kl":
        liger_kl_function()  # fail here, not inside the timed call, when liger is missing
        return lambda: liger_token_kl(x["logits_vis"], x["logits_txt"])
    if case.op == "weights":
        liger_kl_function()
        return lambda: _liger_weights(x["logits_vis"], x["logits_txt"], x["mask"])
    if case.op == "reshape":
        raise Unavailable("Liger-Kernel has no PGPO reshape op")
    if case.op == "linear":
        raise Unavailable("Liger's fused linear KL (liger_fused_linear_kl_div) takes the teacher as a full [N, V] "
                          "tensor and returns only a scalar loss, no per-token KL")
    raise Unavailable("Liger-Kernel has no op giving log p(target), entropy and KL per token")


def _lm_head_pgpo(case: Case) -> Callable[[], Any]:
    if case.op != "linear":
        raise Unavailable("applies to the linear op only")
    x = case.inputs
    lin = torch.nn.functional.linear
    return lambda: token_kl(lin(x["hidden_vis"], x["lm_head_weight"]), lin(x["hidden_txt"], x["lm_head_weight"]))


def build(backend: str, case: Case) -> Callable[[], Any]:
    """A no-argument callable that runs `case` on `backend`; raises Unavailable (with the reason) if it can't."""
    if backend == "pgpo-triton":
        if case.device.type != "cuda":
            raise Unavailable(TRITON_CPU_REASON)
        if interpreter_enabled():
            raise Unavailable(TRITON_INTERPRET_REASON)
        return _pgpo(case, "triton")
    if backend == "pgpo-torch":
        return _pgpo(case, "torch")
    if backend == "torch-eager":
        return _eager(case)
    if backend == "torch-compile":
        return _compile(case)
    if backend == "liger":
        return _liger(case)
    if backend == "lm_head+pgpo":
        return _lm_head_pgpo(case)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
