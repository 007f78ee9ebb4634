"""A kernel whose SASS structure is known, for tests/kernels/test_sass.py: one loop copying a row, 128-bit loads and stores.

With BLOCK = 1024 fp32 and 4 warps each thread moves 8 floats per iteration (two LDG.E.128, two STG.E.128), and
nothing crosses threads: no BAR, no SHFL.
"""

import triton
import triton.language as tl


@triton.jit
def copy_loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        cols = start + offs
        tl.store(y_ptr + cols, tl.load(x_ptr + cols, mask=cols < n), mask=cols < n)
