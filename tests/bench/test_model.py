"""pgpo-bench model: its byte formulas against what the Triton interpreter actually loads, stores and adds.

Each kernel runs in the interpreter at a small ragged shape with the model's tiles (the interpreter's), and the
counted bytes (pgpo_bench/interp_count.py: every masked-on element of every tl.load / tl.store / tl.atomic_add) must
equal the model's issued figures exactly; then the modeled times at Liger's shape are checked for their arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pgpo_bench.model as bm
import pgpo_kernels.fused_logp as fl
from pgpo_bench.interp_count import count_memory
from pgpo_kernels import fused_linear_token_kl
from pgpo_kernels import token_kl
from pgpo_kernels import token_stats
from pgpo_kernels.utils import device_sm_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, H, V = 40, 48, 300  # ragged against the interpreter's 16 x 32 tiles and 16-wide H steps


def _data(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) * 0.3).to(dtype),
            torch.randint(0, V, (N,), generator=g))


def _same(counts, model):
    assert (counts.read, counts.written, counts.atomic) == (model.read, model.written, model.atomic), (counts, model)


def test_logp_forward_and_exact_backward_bytes():
    h, w, t = _data()
    cfg = dict(fl.INTERPRETER_BLOCKS)
    with count_memory() as c:
        _, ent, lse = fl.logp_forward(h, w, None, t, 1.0, True)
    _same(c, bm.logp_forward(N, V, H, "bfloat16", cfg, n_sm=device_sm_count(torch.device("cpu"))))
    stats, grads = torch.stack([lse, ent], -1), torch.ones(N, 2)
    for with_entropy in (False, True):
        with count_memory() as c:
            fl.logp_backward(h, w, None, t, stats, grads, 1.0, with_entropy, (True, True, False))
        _same(c, bm.logp_backward(N, V, H, "bfloat16", 0.0, with_entropy, cfg))


def test_logp_backward_bytes_with_skipped_tiles():
    """Whole tiles (N, V multiples of 16, 32): the model's aggregate form is exact at the kernel's own skip count."""
    n, v = 48, 256
    g = torch.Generator().manual_seed(2)
    h = torch.randn(n, H, generator=g)
    w = torch.randn(v, H, generator=g) * 8.0  # peaked: most non-target tiles fall under the threshold
    x = h @ w.T
    t = x.argmax(-1)
    stats = torch.stack([torch.logsumexp(x, -1), torch.zeros(n)], -1)
    counter = torch.zeros(1, dtype=torch.int32)
    with count_memory() as c:
        fl.logp_backward(h, w, None, t, stats, torch.ones(n, 2), 1.0, False, (True, True, False), filter_eps=1e-2,
                         skip_counter=counter)
    tiles = (n // 16) * (v // 32)
    skip = int(counter.item()) / tiles
    assert 0 < skip < 1
    model = bm.logp_backward(n, v, H, "float32", skip, False, dict(fl.INTERPRETER_BLOCKS))
    assert (c.read, c.atomic) == (pytest.approx(model.read), pytest.approx(model.atomic))


def test_streaming_kernels_bytes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(N, V, generator=g).bfloat16(), torch.randn(N, V, generator=g).bfloat16()
    t = torch.randint(0, V, (N,), generator=g)
    with count_memory() as c:
        token_kl(a, b, backend="triton")
    _same(c, bm.token_kl_forward(N, V))
    with count_memory() as c:
        token_stats(a, b, t, backend="triton")
    _same(c, bm.token_stats(N, V))
    a.requires_grad_()
    b.requires_grad_()
    kl = token_kl(a, b, backend="triton")
    with count_memory() as c:
        kl.sum().backward()
    _same(c, bm.token_kl_backward(N, V))


def test_fused_linear_bytes():
    h, w, _ = _data()
    cfg = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "CHUNK_TILES": 4, "GROUP_N": 2}
    with count_memory() as c:
        fused_linear_token_kl(h, h, w, backend="triton")
    _same(c, bm.fused_linear(N, V, H, "bfloat16", n_sm=device_sm_count(torch.device("cpu")), cfg=cfg))


def test_liger_shape_arithmetic_and_cli(tmp_path):
    """At N = 8192, H = 4096, V = 131072 with 128 x 128 backward tiles: 275 GB of fp32 atomics unfiltered (the
    figure of the issue), 6 N V H FLOPs; filtering at f scales both gradient GEMMs and the atomics by 1 - f."""
    n, h, v = bm.LIGER_SHAPE
    full = bm.logp_backward(n, v, h, skip=0.0)
    assert full.atomic == pytest.approx(4 * h * (n * v / 128 + v * n / 128))
    assert 270e9 < full.atomic < 280e9
    assert full.flops == 6.0 * n * v * h
    half = bm.logp_backward(n, v, h, skip=0.5)
    assert half.flops == pytest.approx(4.0 * n * v * h)
    lo, hi = full.times_ms("H100")
    assert lo == pytest.approx(1e3 * full.flops / 989e12)  # compute-bound once the atomics stay in L2
    assert hi == pytest.approx(1e3 * (full.hbm + full.atomic) / 3.35e12)
    assert full.times_ms("H200")[1] < hi
    with pytest.raises(ValueError, match="skip"):
        bm.logp_backward(n, v, h, skip=1.5)
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "pgpo_bench.cli", "model", "--tokens", "1024", "--liger", "--json",
                           str(out)], capture_output=True, text=True, check=False, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert "fused_logp_bwd" in proc.stdout and "Modeled (not measured)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "pgpo_bench.cli", "model", "--skip", "2"], capture_output=True,
                          text=True, check=False, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and "--skip" in proc.stderr


def test_logp_bench_skip_fraction_is_the_kernels_count():
    """pgpo-bench logp's skipped-tile column (the ours_triton row on a GPU) is the kernel's own counter: here in the
    interpreter it equals the torch rule's count on peaked logits, and is 0 with the filter off."""
    from pgpo_bench.logp import triton_skip_fraction
    from pgpo_kernels.logp_filter import filter_tiles

    g = torch.Generator().manual_seed(5)
    h = torch.randn(32, H, generator=g)
    w = torch.randn(256, H, generator=g) * 6.0
    t = (h @ w.T).argmax(-1)
    t[::7] = -100
    got = triton_skip_fraction(h, w, t, 1.0, grad_filter=1e-2)
    ref = filter_tiles(h, w, t, grad_logp=(t != -100).double(), grad_entropy=0.01 * (t != -100).double(),
                       grad_filter=1e-2, block_n=16, block_v=32)
    assert 0 < got == ref.fraction
    assert triton_skip_fraction(h, w, t, 1.0, grad_filter=0.0) == 0.0
