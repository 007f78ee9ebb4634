"""pgpo-bench on the CPU at tiny sizes: the CLI, its JSON schema, the listing of baselines that cannot run, finite
numbers and small errors against the float64 reference. torch.compile is left out (its compile takes ~15 s on CPU)."""

import json
import math

import pytest
import torch

from pgpo_bench import cli
from pgpo_bench.cases import OPS
from pgpo_bench.cases import build_case
from pgpo_bench.cases import max_abs_errors
from pgpo_bench.providers import build
from pgpo_bench.providers import eager_reshape_loop
from pgpo_bench.report import RECORD_KEYS
from pgpo_bench.report import REPORT_KEYS
from pgpo_bench.report import SCHEMA
from pgpo_bench.report import STATUSES
from pgpo_kernels.reference import reshape_weights_ref

FAST = ["--warmup-ms", "1", "--rep-ms", "5", "--quiet"]
NO_COMPILE = ["pgpo-triton", "pgpo-torch", "torch-eager", "liger", "lm_head+pgpo"]


def run_cli(tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    assert cli.main([*args, "--device", "cpu", "--json", str(out), *FAST]) == 0
    assert torch.get_num_threads() == threads  # the CLI's one-thread default does not leak into the caller
    rep = json.loads(out.read_text())
    assert rep["device"]["threads"] == 1
    return rep


def test_kl_cli_schema_and_finite_numbers(tmp_path, capsys):
    rep = run_cli(tmp_path, "kl", "--tokens", "1,7", "--vocab", "300", "--dtype", "fp32", "--backends", *NO_COMPILE)
    assert tuple(rep) == REPORT_KEYS
    assert rep["schema"] == SCHEMA
    assert rep["device"]["type"] == "cpu" and rep["device"]["name"].startswith("CPU: ")
    assert rep["command"].startswith("pgpo-bench kl --tokens 1,7")
    assert rep["versions"]["torch"] == torch.__version__ and rep["versions"]["triton"]
    assert rep["config"]["complete"] is True
    assert rep["copy_bandwidth"]["GBps"] > 0 and math.isfinite(rep["copy_bandwidth"]["GBps"])
    # lm_head+pgpo applies to the linear op only: not a row of kl
    assert [(r["tokens"], r["backend"]) for r in rep["results"]] == [(n, b) for n in (1, 7) for b in NO_COMPILE[:4]]
    for r in rep["results"]:
        assert tuple(r) == RECORD_KEYS and r["status"] in STATUSES
        assert r["bytes"] == 2 * r["tokens"] * 300 * 4 + 4 * r["tokens"]
        if r["status"] != "ok":
            continue
        t = r["time_ms"]
        assert 0 < t["p20"] <= t["median"] <= t["p80"] and t["n"] >= 5 and t["timer"] == "time.perf_counter"
        for key in ("GBps", "copy_fraction", "max_abs_err", "first_call_ms"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert r["max_abs_err"] < 1e-5  # fp32 inputs, fp32 accumulation, against float64
        assert r["peak_extra_bytes"] is None  # not measured on the CPU, and said so
    assert "not measured on CPU" in rep["peak_memory_method"]
    assert "CPU run" in capsys.readouterr().out  # the table is labelled as a CPU run


def test_baselines_that_cannot_run_are_listed_with_reason(tmp_path):
    assert cli._backends("kl", None) == ["pgpo-triton", "pgpo-torch", "torch-eager", "torch-compile", "liger"]
    rep = run_cli(tmp_path, "kl", "--tokens", "4", "--vocab", "64", "--no-copy-bandwidth", "--backends", *NO_COMPILE)
    by_backend = {r["backend"]: r for r in rep["results"]}
    assert list(by_backend) == ["pgpo-triton", "pgpo-torch", "torch-eager", "liger"]
    triton, liger = by_backend["pgpo-triton"], by_backend["liger"]
    assert triton["status"] == "unavailable" and "interpreter" in triton["reason"] and triton["time_ms"] is None
    assert liger["status"] == "unavailable" and "no CPU path" in liger["reason"]
    assert rep["targets"] == []  # no Triton run, nothing to judge
    assert rep["copy_bandwidth"] is None


@pytest.mark.parametrize("op", [op for op in OPS if op != "kl"])
def test_every_op_runs_on_cpu(tmp_path, op):
    rep = run_cli(tmp_path, op, "--tokens", "8", "--vocab", "96", "--hidden", "16", "--seq-len", "4",
                  "--no-copy-bandwidth", "--backends", *NO_COMPILE)
    recs = {r["backend"]: r for r in rep["results"]}
    assert recs["torch-eager"]["status"] == "ok"
    assert recs["torch-eager"]["max_abs_err"] < 1e-2  # bf16 inputs; the float64 reference reads the same values
    if op in ("reshape", "weights"):
        assert recs["pgpo-torch"]["shape"] == {"N": 8, "B": 2, "T": 4, **({"V": 96} if op == "weights" else {})}
    assert recs["pgpo-torch"]["status"] == "ok", recs["pgpo-torch"]["reason"]
    if op == "linear":
        assert recs["lm_head+pgpo"]["status"] == "ok" and recs["lm_head+pgpo"]["flops"] == 2 * 2 * 8 * 16 * 96
        assert math.isfinite(recs["lm_head+pgpo"]["TFLOPs"])
    for r in rep["results"]:
        assert r["status"] != "error", r["reason"]
        if r["status"] == "ok":
            assert math.isfinite(r["GBps"]) and math.isfinite(r["max_abs_err"])


def test_failing_backend_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
    from pgpo_bench import runner

    def broken(backend, case):
        if backend == "torch-eager":  # fails when called
            return lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        if backend == "torch-compile":  # fails while being set up
            raise AttributeError("no such thing")
        return build(backend, case)

    monkeypatch.setattr(runner, "build", broken)
    rep = run_cli(tmp_path, "kl", "--tokens", "2", "4", "--vocab", "32", "--no-copy-bandwidth",
                  "--backends", "torch-eager", "torch-compile", "pgpo-torch")
    assert [(r["backend"], r["status"]) for r in rep["results"]] == [
        ("torch-eager", "error"), ("torch-compile", "error"), ("pgpo-torch", "ok")] * 2
    assert rep["results"][0]["reason"] == "RuntimeError: boom"
    assert rep["results"][1]["reason"] == "AttributeError: no such thing"


def test_partial_json_survives_a_cut_short_run(tmp_path, monkeypatch):
    real, calls = cli.run_case, []

    def run_then_die(case, *args, **kwargs):
        calls.append(case.tokens)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a time limit hitting the second case
        return real(case, *args, **kwargs)

    monkeypatch.setattr(cli, "run_case", run_then_die)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["kl", "--tokens", "2", "4", "--vocab", "16", "--device", "cpu", "--backends", "torch-eager",
                  "--no-copy-bandwidth", "--json", str(out), *FAST])
    rep = json.loads(out.read_text())
    assert rep["config"]["complete"] is False
    assert [(r["tokens"], r["status"]) for r in rep["results"]] == [(2, "ok")]


def test_error_check_catches_a_wrong_result():
    case = build_case("kl", 5, vocab=40, hidden=1, seq_len=1, dtype=torch.float32, device=torch.device("cpu"))
    good = build("pgpo-torch", case)()
    assert max_abs_errors(case, good)["kl"] < 1e-5
    assert max_abs_errors(case, good + 0.1)["kl"] == pytest.approx(0.1, rel=1e-4)
    assert max_abs_errors(case, good * float("nan"))["kl"] == math.inf


def test_eager_reshape_loop_matches_reference():
    case = build_case("reshape", 64, vocab=1, hidden=1, seq_len=16, dtype=torch.float32, device=torch.device("cpu"))
    s, m = case.inputs["scores"], case.inputs["mask"]
    torch.testing.assert_close(eager_reshape_loop(s, m).double(), reshape_weights_ref(s, m), atol=1e-5, rtol=1e-5)


def test_parse_tokens():
    assert cli.parse_tokens(["1..16"]) == [1, 2, 4, 8, 16]
    assert cli.parse_tokens(["3..20", "5,7", "7"]) == [4, 5, 7, 8, 16]
    assert cli.parse_tokens(["4096"]) == [4096]


@pytest.mark.parametrize("args, needle", [
    (["kl", "--tokens", "0"], "--tokens"),
    (["kl", "--tokens", "a"], "--tokens"),
    (["kl", "--vocab", "0"], "--vocab"),
    (["kl", "--backends", "cublas"], "--backends"),
    (["kl", "--dtype", "int8"], "--dtype"),
])
def test_bad_arguments_are_refused(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--device", "cpu"])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["kl", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_bandwidth_accounting_copy_and_op_counted_alike(monkeypatch):
    # a copy of n bytes moves 2n (read + write); an op's GB/s is its least bytes (reads + writes) over the same
    # kind of median, so the copy fraction compares like with like
    from pgpo_bench import roofline
    from pgpo_bench import runner
    from pgpo_bench.timing import TimeStats

    fixed = TimeStats(2.0, 1.5, 2.5, 5, "fake")  # every call "takes" 2 ms
    monkeypatch.setattr(roofline, "time_fn", lambda *a, **k: fixed)
    monkeypatch.setattr(runner, "time_fn", lambda *a, **k: fixed)
    copy = roofline.measure_copy_bandwidth(torch.device("cpu"), n_bytes=1 << 20)
    assert copy["GBps"] == pytest.approx(2 * (1 << 20) / 2e-3 / 1e9)
    case = build_case("kl", 3, vocab=10, hidden=1, seq_len=1, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert case.bytes_moved == 2 * 3 * 10 * 2 + 3 * 4  # both bf16 [N, V] inputs read once, fp32 [N] written once
    rec = runner.run_backend(case, "pgpo-torch", copy_gbps=copy["GBps"], warmup_ms=1, rep_ms=1)
    assert rec["GBps"] == pytest.approx(case.bytes_moved / 2e-3 / 1e9)
    assert rec["copy_fraction"] == pytest.approx(case.bytes_moved / (2 * (1 << 20)))


def test_peak_memory_counts_only_what_the_call_adds(monkeypatch):
    # a fake CUDA allocator: the inputs (1000 B) are live before the call, and an earlier peak (5000 B) must not count
    from pgpo_bench import timing

    state = {"cur": 1000, "peak": 5000}

    def reset(device=None):
        state["peak"] = state["cur"]

    def fn():
        state["cur"] += 300  # output + a temporary
        state["peak"] = max(state["peak"], state["cur"])
        state["cur"] -= 200  # the temporary is freed, the output stays
        return "out"

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["cur"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    assert timing.call_with_peak_memory(fn, torch.device("cuda")) == ("out", 300)
