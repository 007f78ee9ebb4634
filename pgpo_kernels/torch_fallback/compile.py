"""torch.compile for the torch fallback's per-chunk math, where it works; the caller's eager path otherwise.

PGPO_TORCH_COMPILE selects: "auto" (the default: compile from the second chunk of at least COMPILE_MIN_ELEMS logits
on, so a one-off call stays eager and a loop or a big multi-chunk call pays the compile once), "1" (always) or "0"
(never). Compiling costs ~10-20 s per process on a 2-core CPU (Inductor's disk cache helps later processes). A
function whose compile or compiled call fails (no C++ compiler on the CPU, no Triton on a GPU, an op inductor cannot
handle) is reported once with a RuntimeWarning and runs eagerly from then on: the eager path computes the same values
under the same rules.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

# our choice: below ~1M logits per chunk (a few ms eagerly) a compile (seconds) would not pay back in a short run
COMPILE_MIN_ELEMS = 1 << 20

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()
_large_calls: dict[Callable, int] = {}  # "auto": chunks of >= COMPILE_MIN_ELEMS seen per function


def compile_mode() -> str:
    """"auto", "always" or "never", from PGPO_TORCH_COMPILE (read at every call, so tests and users can switch)."""
    value = os.environ.get("PGPO_TORCH_COMPILE", "auto").strip().lower()
    if value in ("0", "false", "no", "off", "never"):
        return "never"
    if value in ("1", "true", "yes", "on", "always"):
        return "always"
    return "auto"


def wants_compile(fn: Callable, n_elems: int) -> bool:
    mode = compile_mode()
    if mode == "never" or torch.compiler.is_compiling():  # inside someone else's compiled region: stay plain
        return False
    if mode == "always":
        return True
    if n_elems < COMPILE_MIN_ELEMS:
        return False
    _large_calls[fn] = _large_calls.get(fn, 0) + 1
    return _large_calls[fn] >= 2  # the first large chunk runs eagerly: a one-off call never waits for a compile


def run_compiled(fn: Callable, n_elems: int, *args):
    """fn(*args) through torch.compile, or None when compiling is not wanted here or does not work (then the caller
    runs its eager path)."""
    if fn in _failed or not wants_compile(fn, n_elems):
        return None
    try:
        compiled = _compiled.get(fn)
        if compiled is None:
            compiled = _compiled[fn] = torch.compile(fn)
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path gives the same values
        _failed.add(fn)
        warnings.warn(f"torch.compile of pgpo_kernels' {fn.__name__} failed ({type(exc).__name__}: {exc}); running "
                      "it eagerly from now on (same results, slower)", RuntimeWarning, stacklevel=2)
        return None
