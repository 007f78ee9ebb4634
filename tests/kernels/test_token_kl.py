"""token_kl (Triton kernels under the interpreter, and the torch fallback) against the float64 reference."""

import importlib
import math

import pytest
import torch

from pgpo_kernels import token_kl
from pgpo_kernels.online_softmax import chunk_layout
from pgpo_kernels.online_softmax import split_chunks
from pgpo_kernels.reference import token_kl_ref
from pgpo_kernels.token_kl import kl_stream_config
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
    assert chunk_layout(1000, n_chunks, kl_stream_config(1000, 4)["BLOCK_V"])[1] == n_chunks
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


# %% non-finite inputs (NONFINITE rules 1-3) on the triton backend, whole row and split-vocab paths ---------------
_FP32_MAX = torch.finfo(torch.float32).max
_BF16_MAX = torch.finfo(torch.bfloat16).max
_FP16_MAX = torch.finfo(torch.float16).max


def _kl_triton(a, b, n_chunks, temperature=1.0):
    # n_chunks=None: whole rows; 3: the split path (V spans three 128-wide tiles at least, see _small_blocks)
    return token_kl_forward(a, b, temperature, n_chunks=n_chunks)


@pytest.fixture
def _small_blocks(monkeypatch):
    # 128-wide tiles, so a row of a few hundred columns has full tiles, a ragged tail and real vocab chunks
    monkeypatch.setattr(token_kl_module, "MAX_BLOCK_V", 128)


@pytest.mark.parametrize("n_chunks", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_pos_inf_give_nan_rows(dtype, n_chunks, _small_blocks):
    a, b = _logits((11, 333), dtype)
    nan, inf = float("nan"), float("inf")
    a[0, 5] = nan  # NaN in a
    b[1, 300] = nan  # NaN in b, in the ragged tail
    a[2, 130] = inf  # +inf in a
    b[3, 0] = inf  # +inf in b
    a[4] = NEG_INF  # a all -inf (would be 0) but b has a NaN: NaN wins
    b[4, 7] = nan
    a[5, 200] = nan  # a NaN while b is all -inf (would be +inf): NaN wins
    b[5] = NEG_INF
    a[6] = NEG_INF  # a all -inf, b has +inf: NaN
    b[6, 9] = inf
    a[7] = nan  # a whole NaN row
    a[8, 3] = inf  # +inf in a where b = -inf (would be +inf): NaN
    b[8, 3] = NEG_INF
    a[9, 100] = NEG_INF  # ordinary -inf rules next to the NaN rows (row 10 untouched)
    b[9, 250] = NEG_INF
    out = _kl_triton(a, b, n_chunks)
    assert torch.isnan(out[:9]).all(), out
    assert out[9].item() == float("inf")
    _close(out[10:], token_kl_ref(a[10:], b[10:]), 1e-5, 1e-5)  # other rows unaffected


@pytest.mark.parametrize("n_chunks", [None, 3])
def test_whole_neg_inf_rows(n_chunks, _small_blocks):
    a, b = _logits((4, 300), torch.float32)
    a[0] = NEG_INF  # no distribution: 0
    b[1] = NEG_INF  # b has no support: +inf
    a[2] = NEG_INF  # both: 0
    b[2] = NEG_INF
    a[3, :256] = NEG_INF  # two whole tiles of -inf in a, one chunk of it: finite
    out = _kl_triton(a, b, n_chunks)
    assert out[0].item() == 0.0 and out[1].item() == float("inf") and out[2].item() == 0.0
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)


def _huge_rows(big, dtype):
    """Rows with logits at +-big (a dtype's max): the true KL is finite, 0 or overflows fp32 (+inf)."""
    a, b = _logits((6, 300), torch.float32, 2.0)
    a[0, 0], a[0, 1], b[0, 0], b[0, 1] = big, -big, -big, big  # p on 0, q on 1: KL ~ 2 big, past fp32: +inf
    a[1, 0], a[1, 1], b[1, 0], b[1, 1] = big, -big, big, -big  # same huge support: KL 0
    a[2, 1], b[2, 1] = -40.0, -big  # p_1 = e^-40-ish where log q_1 ~ -big: a finite term ~ 4e-18 big
    a[3] -= big  # the whole row of a at -big (all finite), b ordinary: the true KL, finite
    b[4] += big  # the whole row of b at +big
    a[5, 150], b[5, 299] = big, -big  # a huge max mid-row, a huge negative b in the tail
    return a.to(dtype), b.to(dtype)


def _ref_shifted(a, b):
    """token_kl_ref of the rows shifted by their maxes, in float64: the same KL (shift invariance), without the
    cancellation of terms ~1e38 that loses every digit when a whole row sits near +-3e38."""
    def shift(x):
        x = x.double()
        m = x.max(-1, keepdim=True).values
        return x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return token_kl_ref(shift(a), shift(b))


@pytest.mark.parametrize("n_chunks", [None, 3])
@pytest.mark.parametrize("dtype, big", [(torch.float32, _FP32_MAX), (torch.float32, 3e38),
                                        (torch.bfloat16, _BF16_MAX), (torch.float16, _FP16_MAX)])
def test_huge_finite_logits_give_the_true_value(dtype, big, n_chunks, _small_blocks):
    a, b = _huge_rows(big, dtype)
    for x, y in ((a, b), (-a, -b)):
        out = _kl_triton(x, y, n_chunks)
        ref = _ref_shifted(x, y)
        assert not torch.isnan(out).any(), out
        overflow = ref > _FP32_MAX
        assert torch.equal(torch.isinf(out), overflow), (out, ref)
        _close(out[~overflow], ref[~overflow], 1e-5, 1e-5)


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
    import pgpo_kernels.torch_fallback.common as common

    a, b = _logits((5, 333), torch.bfloat16)
    monkeypatch.setattr(common, "CHUNK_ELEMS", 333)
    assert common.rows_per_chunk(333) == 1
    _close(token_kl(a, b, backend="torch"), token_kl_ref(a, b), 1e-5, 1e-5)


@pytest.mark.parametrize("n_chunks", [None, 1])
def test_qwen_vocab_152064(n_chunks):
    # the real Qwen2.5 vocab (37.1 blocks of 4096: a partial last block), one-row and split launches
    a, b = _logits((2, 152064), torch.bfloat16)
    a[1, 152000:] = NEG_INF
    out = token_kl_forward(a, b, 1.0, n_chunks=n_chunks)
    _close(out, token_kl_ref(a, b), 1e-5, 1e-5)


# %% launch heuristics -------------------------------------------------------------------------------------------------
def test_stream_config_is_one_16_byte_vector_per_thread():
    for itemsize, vec in ((2, 8), (4, 4)):
        cfg = kl_stream_config(152064, itemsize)
        assert cfg["VEC"] == vec and cfg["BLOCK_V"] == cfg["num_warps"] * 32 * vec
    small = kl_stream_config(100, 4)  # a short row gets a smaller block, still one vector per thread
    assert small["BLOCK_V"] >= 100 and small["BLOCK_V"] == small["num_warps"] * 32 * 4


@pytest.mark.parametrize("n_rows, sms, ctas, expect", [
    (4096, 132, 6, 1),  # 5.2 waves already
    (1024, 132, 6, 4),  # 1.3 waves -> 4 chunks: 4096 CTAs, 5.2 waves
    (16, 132, 6, 38),  # capped at 2 tiles per chunk: 152064 / 4096
    (3, 4, 1, 6),  # the interpreter's stand-in: 16 CTAs for 4 waves of 4 SMs x 1
])
def test_split_heuristic_counts_resident_ctas(n_rows, sms, ctas, expect):
    chunks = split_chunks(n_rows, 152064, 2048, sms, ctas, min_tiles=token_kl_module.MIN_TILES_PER_CHUNK)
    assert chunks == expect
    if chunks > 1:
        assert n_rows * chunks >= 4 * sms * ctas or chunks == 152064 // 4096 + 1
