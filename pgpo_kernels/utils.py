"""Shared helpers: argument checks, backend choice, launch heuristics.

Every public op validates its arguments here, before any kernel launch, and raises a ValueError/TypeError that names
the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreter_enabled() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1, set before triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken on this platform
        return False
    return True


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map "auto" to "triton" on CUDA tensors and "torch" otherwise; check that "triton" can run where asked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                "backend='triton' got CPU tensors: move them to CUDA, or set TRITON_INTERPRET=1 before importing "
                "triton to run the kernels in the (slow) interpreter, or use backend='torch'"
            )
    return backend


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")



def check_lm_head_bias(bias: torch.Tensor | None, n_vocab: int, like: torch.Tensor, like_name: str) -> None:
    """Optional [V] lm_head bias: float, `like`'s dtype and device (the fused-linear ops' shared check)."""
    if bias is None:
        return
    check_float("bias", bias)
    if bias.dtype != like.dtype:
        raise TypeError(f"bias must have {like_name}'s dtype {like.dtype}, got {bias.dtype}")
    if bias.shape != (n_vocab,):
        raise ValueError(f"bias must have shape [V] = [{n_vocab}], got {tuple(bias.shape)}")
    if bias.device != like.device:
        raise ValueError(f"bias must be on {like_name}'s device {like.device}, got {bias.device}")


def check_chunk_size(chunk_size) -> None:
    """None or a positive int (rows per torch-fallback chunk)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")

def check_logits_pair(logits_vis: torch.Tensor, logits_txt: torch.Tensor) -> None:
    """Both [..., V] floating tensors of the same shape and device, V >= 1."""
    check_float("logits_vis", logits_vis)
    check_float("logits_txt", logits_txt)
    if logits_vis.dim() < 1:
        raise ValueError("logits_vis must have shape [..., V] with at least one dimension, got a 0-d tensor")
    if logits_vis.shape != logits_txt.shape:
        raise ValueError(
            f"logits_txt must have the shape of logits_vis [..., V] = {tuple(logits_vis.shape)}, "
            f"got {tuple(logits_txt.shape)}"
        )
    if logits_vis.shape[-1] == 0:
        raise ValueError("logits_vis must have a non-empty vocab dimension V, got V = 0")
    if logits_vis.device != logits_txt.device:
        raise ValueError(f"logits_vis and logits_txt must be on one device, got {logits_vis.device} and "
                         f"{logits_txt.device}")


def check_real(name: str, value) -> float:
    """A finite real number (int, float or a numpy scalar; not bool, not str, not a tensor) -> float, else
    TypeError/ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_temperature(temperature: float) -> None:
    """temperature: a finite real number > 0 (NONFINITE rule 4)."""
    if not check_real("temperature", temperature) > 0.0:
        raise ValueError(f"temperature must be a positive number (> 0), got {temperature!r}")


def check_reshape_params(tau: float, beta: float, eps: float, renormalize: bool = True) -> None:
    """tau in [0, 1], beta >= 0, eps > 0, all finite real numbers; renormalize a bool (NONFINITE rule 6)."""
    if not 0.0 <= check_real("tau", tau) <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
    if not check_real("beta", beta) >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if not check_real("eps", eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool (True or False), got {type(renormalize).__name__} "
                        f"{renormalize!r}")


def check_mask(mask: torch.Tensor | None, shape: torch.Size, name: str = "mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool (or integer 0/1) tensor of shape {tuple(shape)}, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the scores' shape [B, T]), got {tuple(mask.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """int32/int64 [B + 1], starting at 0, non-decreasing, ending at the packed length. Reads it on the host once."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor of shape [B + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64) of shape [B + 1], got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape [B + 1] with B >= 0, got {tuple(cu_seqlens.shape)}")
    c = cu_seqlens.detach().to("cpu", torch.int64)  # host sync: validation needs the values
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(c[0])}")
    if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing (monotone sequence offsets)")
    if int(c[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] must equal the packed length of scores ({total}), got {int(c[-1])}")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View [..., V] as [N, V] with a unit last stride; copies only when no such view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def autotune_enabled(device: torch.device) -> bool:
    """Autotune only on a real GPU (never in the interpreter); PGPO_AUTOTUNE=0 turns it off."""
    return device.type == "cuda" and os.environ.get("PGPO_AUTOTUNE", "1") != "0"


def device_sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors, or a stand-in when not on CUDA (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


from typing import NamedTuple  # noqa: E402 - kept with its only user


class RowView(NamedTuple):
    """[..., V] logits addressed as N rows without a copy: row r = (r // n_inner, r % n_inner) starts at element
    (r // n_inner) * stride_outer + (r % n_inner) * stride_inner of `tensor`; the last stride is 1."""

    tensor: torch.Tensor
    n_rows: int
    n_cols: int
    n_inner: int
    stride_outer: int
    stride_inner: int


def row_view(x: torch.Tensor) -> RowView:
    """Rows of [..., V] as an (outer, inner) stride pair, so a [B, T, V] slice such as logits[:, :-1] is read in place.

    Copies only when the last stride is not 1 or the leading dims other than the last cannot be merged by a view.
    """
    n_cols = x.shape[-1]
    x3 = x.reshape(1, 1, n_cols) if x.dim() == 1 else x.unsqueeze(0) if x.dim() == 2 else x
    if x3.dim() > 3:
        try:
            x3 = x3.view(-1, *x3.shape[-2:])
        except RuntimeError:  # the outer dims do not merge: one copy
            x3 = x3.reshape(-1, *x3.shape[-2:]).contiguous()
    if n_cols > 1 and x3.stride(-1) != 1:
        x3 = x3.contiguous()
    n_inner = x3.shape[1]
    return RowView(x3, x3.shape[0] * n_inner, n_cols, max(n_inner, 1), x3.stride(0), x3.stride(1))
