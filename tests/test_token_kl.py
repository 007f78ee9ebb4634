"""token_kl (Triton kernels under the interpreter, and the torch fallback) against the float64 reference."""

import importlib
import math

import pytest
import torch

from pgpo_kernels import token_kl
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.token_kl import chunk_layout
from pgpo_kernels.token_kl import kl_launch_config
from pgpo_kernels.token_kl import token_kl_forward

NEG_INF = float("-inf")

# (shape [..., V]) rows: one odd vocab, a 3-D batch, a vocab spanning several blocks, a single row
_SHAPE_PARAMS = [(3, 1271), (2, 5, 301), (4, 5000), (1, 7)]
# dtype, rtol, atol: the reference sees the same rounded inputs, so only fp32 accumulation error remains
_DTYPE_PARAMS = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-5), (torch.float16, 1e-5, 1e-5)]
_BACKENDS = ["triton", "torch"]
# the module, not the function of the same name that pgpo_kernels re-exports
token_kl_module = importlib.import_module("pgpo_kernels.token_kl")


def _logits(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype), (torch.randn(shape) * scale).to(dtype)


def _close(out, ref, rtol, atol):
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol, equal_nan=False)


@pytest.mark.parametrize("shape", _SHAPE_PARAMS)
@pytest.mark.parametrize("dtype, rtol, atol", _DTYPE_PARAMS)
@pytest.mark.parametrize("backend", _BACKENDS)
def test_matches_reference(shape, dtype, rtol, atol, backend):
    a, b = _logits(shape, dtype)
    out = token_kl(a, b, backend=backend)
    ref = token_kl_ref(a, b)
    _close(out, ref, rtol, atol)
    assert (out >= 0).all()


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 64])
def test_split_vocab_path(n_chunks):
    # few rows: the vocab is split across programs and combined; any chunk count gives the same answer
    a, b = _logits((3, 9001), torch.bfloat16)
    out = token_kl_forward(a, b, 1.0, n_chunks=n_chunks)
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_neg_inf_entries(backend, n_chunks, monkeypatch):
    # 128-wide blocks so that n_chunks=3 really splits V = 1000 (one 1024 block would leave a single chunk): chunk 0
    # of row 0 is all -inf in a, its last chunk is partial
    monkeypatch.setattr(token_kl_module, "MAX_BLOCK_V", 128)
    assert chunk_layout(1000, n_chunks, kl_launch_config(1000)[0])[1] == n_chunks
    a, b = _logits((6, 1000), torch.float32)
    a[0, :500] = NEG_INF  # a = -inf: p = 0, contributes nothing, even where b = -inf too
    b[0, 400:450] = NEG_INF
    a[1] = NEG_INF  # no distribution at all: our choice, KL 0
    b[2, 777] = NEG_INF  # a finite where b = -inf: +inf
    a[3, ::2] = NEG_INF  # interleaved holes, b identical holes: finite
    b[3, ::2] = NEG_INF
    b[4] = NEG_INF  # b has no support: +inf
    a[5, 990:] = NEG_INF  # holes only in the last (partial) block
    if backend == "triton":
        out = token_kl_forward(a, b, 1.0, n_chunks=n_chunks)
    else:
        out = token_kl(a, b, backend=backend)
    ref = token_kl_ref(a, b)
    assert out[1].item() == 0.0
    assert math.isinf(out[2].item()) and math.isinf(out[4].item())
    _close(out, ref, 1e-5, 1e-5)


def _infinite_kl_rows():
    """Rows whose KL is +inf although the p-weighted term underflows or is rescaled away in fp32."""
    a, b = _logits((3, 9000), torch.float32)
    b[0, 10] = NEG_INF  # infinite term in the first block, then the max of a jumps: the rescale factor underflows
    a[0, 5000] = 500.0
    a[1, 10] = -300.0  # p underflows to 0 where q = 0: still +inf, never 0 * inf
    b[1, 10] = NEG_INF
    a[2, 4096:8192] -= 300.0  # a whole vocab chunk far below the max holds the infinite term
    b[2, 5000] = NEG_INF
    return a, b


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_infinite_kl_survives_underflow(backend, n_chunks):
    a, b = _infinite_kl_rows()
    if backend == "triton":
        out = token_kl_forward(a, b, 1.0, n_chunks=n_chunks)
    else:
        out = token_kl(a, b, backend=backend)
    assert torch.isinf(token_kl_ref(a, b)).all()
    assert torch.isinf(out).all() and (out > 0).all(), out


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("offset_a, offset_b, scale", [(1e4, -3e3, 3.0), (0.0, 0.0, 1e20), (1e30, -1e30, 1e29)])
def test_huge_magnitudes(backend, offset_a, offset_b, scale):
    a, b = _logits((4, 1500), torch.float32, scale)
    a, b = a + offset_a, b + offset_b
    out = token_kl(a, b, backend=backend)
    ref = token_kl_ref(a, b)
    assert torch.isfinite(out).all()
    _close(out, ref, 1e-5, 1e-4)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_shift_invariance_and_identity(backend):
    a, b = _logits((5, 777), torch.float32)
    base = token_kl(a, b, backend=backend)
    shifted = token_kl(a + 123.5, b - 77.25, backend=backend)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    same = token_kl(a, a.clone(), backend=backend)
    assert same.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", _BACKENDS)
def test_temperature(backend):
    a, b = _logits((3, 500), torch.bfloat16)
    out = token_kl(a, b, temperature=0.7, backend=backend)
    _close(out, token_kl_ref(a, b, 0.7), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_strided_and_noncontiguous_inputs(backend):
    wide_a, wide_b = _logits((4, 2100), torch.bfloat16)
    a, b = wide_a[:, 50:1350], wide_b[:, 7:1307]  # row stride 2100, last dim contiguous: no copy needed
    out = token_kl(a, b, backend=backend)
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)
    at, bt = _logits((700, 3), torch.float32)
    out_t = token_kl(at.t(), bt.t(), backend=backend)  # last dim strided: copied
    _close(out_t, token_kl_ref(at.t(), bt.t()), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50)])
def test_empty_inputs(backend, shape):
    a, b = torch.randn(shape), torch.randn(shape)
    out = token_kl(a, b, backend=backend)
    assert out.shape == shape[:-1] and out.dtype == torch.float32


@pytest.mark.parametrize("backend", _BACKENDS)
def test_row_offsets_beyond_int32(backend):
    # rows that start past 2**31 elements: pointer offsets must be int64. The storage is only reserved (untouched
    # pages of an empty tensor), the rows read are small.
    n_cols, stride = 1031, 2**31 + 97
    store_a = torch.empty(stride + n_cols, dtype=torch.bfloat16)
    store_b = torch.empty(stride + n_cols, dtype=torch.bfloat16)
    a = store_a.as_strided((2, n_cols), (stride, 1))
    b = store_b.as_strided((2, n_cols), (stride, 1))
    src_a, src_b = _logits((2, n_cols), torch.bfloat16)
    a.copy_(src_a)
    b.copy_(src_b)
    assert a.stride(0) * (a.shape[0] - 1) > 2**31
    out = token_kl(a, b, backend=backend)
    _close(out, token_kl_ref(src_a, src_b), 1e-5, 1e-5)


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    import sys

    mod = sys.modules["pgpo_kernels.token_kl"]  # the package attribute of that name is the function
    called = []
    monkeypatch.setattr(mod, "token_kl_forward", lambda *a, **k: called.append(1))
    a, b = _logits((2, 33), torch.float32)
    out = token_kl(a, b)  # auto on CPU tensors -> the torch fallback, never the kernel launcher
    assert not called
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)


def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b = _logits((2, 33), torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        token_kl(a, b, backend="triton")


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: (torch.randn(2, 5), torch.randn(2, 6)), ValueError, "logits_txt must have the shape"),
        (lambda: (torch.randint(0, 3, (2, 5)), torch.randn(2, 5)), TypeError, "logits_vis must be a floating"),
        (lambda: (torch.randn(2, 5), torch.randint(0, 3, (2, 5))), TypeError, "logits_txt must be a floating"),
        (lambda: (torch.randn(2, 0), torch.randn(2, 0)), ValueError, "non-empty vocab"),
        (lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"\[\.\.\., V\]"),
        (lambda: (torch.randn(2, 5).numpy(), torch.randn(2, 5)), TypeError, "logits_vis must be a torch.Tensor"),
    ],
)
def test_bad_input_errors(make, err, match):
    a, b = make()
    with pytest.raises(err, match=match):
        token_kl(a, b, backend="triton")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        token_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=temperature)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        token_kl(torch.randn(2, 5), torch.randn(2, 5), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_rows", [1, 64, 4096])
def test_gpu_vocab_152064(n_rows):
    a, b = _logits((n_rows, 152064), torch.bfloat16)
    a, b = a.cuda(), b.cuda()
    out = token_kl(a, b)
    rows = torch.arange(0, n_rows, max(1, n_rows // 16))
    ref = token_kl_ref(a[rows].cpu(), b[rows].cpu())
    _close(out[rows].cpu(), ref, 1e-5, 1e-4)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0])  # at 1.0 the fp32 fallback skips the scaling copy
def test_inputs_untouched(backend, dtype, temperature):
    a, b = _logits((3, 100), dtype)
    a0, b0 = a.clone(), b.clone()
    token_kl(a, b, temperature=temperature, backend=backend)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_torch_fallback_chunks_rows(monkeypatch):
    # the fallback holds only [chunk, V] fp32 buffers: force one row per chunk and check nothing changes
    import pgpo_kernels.torch_ops as torch_ops

    a, b = _logits((5, 333), torch.bfloat16)
    monkeypatch.setattr(torch_ops, "_CHUNK_ELEMS", 333)
    assert torch_ops._rows_per_chunk(333) == 1
    _close(token_kl(a, b, backend="torch"), token_kl_ref(a, b), 1e-5, 1e-5)


@pytest.mark.parametrize("n_chunks", [None, 1])
def test_qwen_vocab_152064(n_chunks):
    # the real Qwen2.5 vocab (37.1 blocks of 4096: a partial last block), one-row and split launches
    a, b = _logits((2, 152064), torch.bfloat16)
    a[1, 152000:] = NEG_INF
    out = token_kl_forward(a, b, 1.0, n_chunks=n_chunks)
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)
