"""Count the bytes a Triton kernel loads, stores and adds atomically, by running it in Triton's interpreter.

The interpreter executes every tl.load / tl.store / tl.atomic_* through one builder object; wrapping its three
memory methods counts each element whose mask is on, times its element size. Those are the bytes the kernel asks
the memory system for (what the traffic model calls "issued"), whatever a GPU's caches then make of them. Only
meaningful with TRITON_INTERPRET=1 set before triton is imported (tests run that way; see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np


@dataclass
class MemCounts:
    read: int = 0  # bytes loaded (masked-off elements excluded)
    written: int = 0  # bytes stored
    atomic: int = 0  # bytes of atomic read-modify-writes (their values' size)
    loads: int = 0  # load calls (vector ops, each on a tile)
    stores: int = 0
    atomics: int = 0


def _elem_bytes(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _on(mask) -> int:
    return int(np.count_nonzero(mask.data)) if mask is not None else 0


@contextlib.contextmanager
def count_memory():
    """Inside the block, every interpreted Triton kernel's memory traffic is added to the yielded MemCounts."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts = MemCounts()
    real_load = InterpreterBuilder.create_masked_load
    real_store = InterpreterBuilder.create_masked_store
    real_rmw = InterpreterBuilder.create_atomic_rmw

    def load(self, ptrs, mask, other, *a, **k):
        counts.read += _on(mask) * _elem_bytes(ptrs)
        counts.loads += 1
        return real_load(self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        counts.written += _on(mask) * _elem_bytes(ptrs)
        counts.stores += 1
        return real_store(self, ptrs, value, mask, *a, **k)

    def rmw(self, op, ptr, val, mask, *a, **k):
        counts.atomic += _on(mask) * _elem_bytes(ptr)
        counts.atomics += 1
        return real_rmw(self, op, ptr, val, mask, *a, **k)

    InterpreterBuilder.create_masked_load = load
    InterpreterBuilder.create_masked_store = store
    InterpreterBuilder.create_atomic_rmw = rmw
    try:
        yield counts
    finally:
        InterpreterBuilder.create_masked_load = real_load
        InterpreterBuilder.create_masked_store = real_store
        InterpreterBuilder.create_atomic_rmw = real_rmw
