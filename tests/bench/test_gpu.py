"""pgpo-bench on CUDA (skipped without a GPU): our Triton kernels run compiled, peak memory is measured, targets judged.

Runs the CLI in a subprocess with TRITON_INTERPRET=0: conftest turns the interpreter on for the CPU tests, and a
kernel decorated under the interpreter stays interpreted for the life of the process.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _bench(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "pgpo_bench.cli", *args, "--device", "cuda", "--json", str(out), "--quiet",
           "--rep-ms", "20", "--warmup-ms", "5"]
    subprocess.run(cmd, check=True, env=env, cwd=root, timeout=300)
    return json.loads(out.read_text())


def test_kl_on_cuda(tmp_path):
    rep = _bench(tmp_path, "kl", "--tokens", "1", "1024", "--vocab", "32000",
                 "--backends", "pgpo-triton", "pgpo-torch", "torch-eager", "liger")
    assert rep["device"]["type"] == "cuda" and rep["copy_bandwidth"]["GBps"] > 100
    recs = {(r["tokens"], r["backend"]): r for r in rep["results"]}
    for n in (1, 1024):
        r = recs[(n, "pgpo-triton")]
        assert r["status"] == "ok", r["reason"]
        assert r["max_abs_err"] < 1e-3 and r["time_ms"]["timer"] == "triton.testing.do_bench"
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 4 * n  # at least its output
        assert math.isfinite(r["GBps"]) and 0 < r["copy_fraction"]
        eager = recs[(n, "torch-eager")]
        assert eager["status"] == "ok" and eager["peak_extra_bytes"] > r["peak_extra_bytes"]
        liger = recs[(n, "liger")]
        assert liger["status"] == "ok" or liger["reason"].startswith("liger-kernel")  # not installed / no import
    assert {t["target"] for t in rep["targets"]} >= {"kl_copy_fraction", "kl_extra_memory_bytes"}


def test_all_ops_on_cuda(tmp_path):
    rep = _bench(tmp_path, "all", "--tokens", "256", "--vocab", "4096", "--hidden", "128", "--seq-len", "64",
                 "--backends", "pgpo-triton", "pgpo-torch", "torch-eager", "lm_head+pgpo")
    for r in rep["results"]:
        assert r["status"] != "error", (r["op"], r["backend"], r["reason"])
        if r["status"] == "ok":
            assert r["max_abs_err"] < 5e-2, (r["op"], r["backend"], r["errors"])
