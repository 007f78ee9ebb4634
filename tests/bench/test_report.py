"""pgpo-bench reports: targets judged from records (they can fail), JSON without invalid tokens, markdown, plot."""

import copy
import json
import math

import pytest
import torch

from pgpo_bench import cli
from pgpo_bench.cases import build_case
from pgpo_bench.report import evaluate_targets
from pgpo_bench.report import markdown_table
from pgpo_bench.report import plot
from pgpo_bench.report import write_json
from pgpo_bench.runner import run_backend


def _rec(op, tokens, backend, median_ms, copy_fraction=None, peak=None, status="ok"):
    return {"op": op, "tokens": tokens, "backend": backend, "status": status, "time_ms": {"median": median_ms},
            "copy_fraction": copy_fraction, "peak_extra_bytes": peak}


def test_targets_met_and_not_met():
    recs = [
        _rec("kl", 1024, "pgpo-triton", 1.0, copy_fraction=0.93, peak=4096),
        _rec("kl", 1024, "torch-eager", 5.0),
        _rec("kl", 1024, "liger", 3.0),
        _rec("kl", 4096, "pgpo-triton", 4.0, copy_fraction=0.85, peak=10 << 30),  # misses two targets
        _rec("kl", 4096, "torch-compile", 3.5),
        _rec("kl", 4096, "liger", None, status="unavailable"),
        _rec("kl", 16, "pgpo-triton", 0.01, copy_fraction=0.2, peak=0),  # below 1024 tokens: no bandwidth target
        _rec("reshape", 1024, "pgpo-triton", 0.01),
        _rec("reshape", 4096, "pgpo-triton", 0.2),
    ]
    got = {(t["target"], t["tokens"]): t for t in evaluate_targets(recs)}
    assert got[("kl_copy_fraction", 1024)]["met"] and not got[("kl_copy_fraction", 4096)]["met"]
    assert ("kl_copy_fraction", 16) not in got
    assert got[("kl_extra_memory_bytes", 1024)]["met"] and not got[("kl_extra_memory_bytes", 4096)]["met"]
    assert got[("kl_time_over_best_baseline", 1024)]["best_baseline"] == "liger"
    assert got[("kl_time_over_best_baseline", 1024)]["met"]
    assert not got[("kl_time_over_best_baseline", 4096)]["met"]
    assert got[("reshape_over_kl_time", 1024)]["value"] == pytest.approx(0.01)
    assert got[("reshape_over_kl_time", 1024)]["met"] and not got[("reshape_over_kl_time", 4096)]["met"]
    assert evaluate_targets([r for r in recs if r["backend"] != "pgpo-triton"]) == []


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "r.json"
    assert cli.main(["weights", "--tokens", "4", "16", "--vocab", "50", "--seq-len", "4", "--device", "cpu",
                     "--backends", "pgpo-torch", "torch-eager", "liger", "--warmup-ms", "1", "--rep-ms", "5",
                     "--no-copy-bandwidth", "--quiet", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_has_no_invalid_tokens_and_markdown_reads_it(report, tmp_path):
    rep = copy.deepcopy(report)
    rep["results"][0]["max_abs_err"] = math.inf  # a broken backend's error must survive the round trip
    path = tmp_path / "inf.json"
    write_json(rep, str(path))
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    md = markdown_table(json.loads(text))
    assert "| weights | 4 | pgpo-torch |" in md and "| inf |" in md
    assert "CPU run" in md and "unavailable: Liger-Kernel" in md


def test_json_write_cut_short_keeps_the_previous_file(report, tmp_path, monkeypatch):
    from pgpo_bench import report as report_mod

    path = tmp_path / "r.json"
    write_json(report, str(path))
    before = path.read_text()

    def dump_half_then_die(obj, f, **kwargs):
        f.write(json.dumps(obj)[:100])
        raise KeyboardInterrupt  # stands in for a time limit killing the process mid-write

    monkeypatch.setattr(report_mod.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_json({**report, "results": []}, str(path))
    assert path.read_text() == before and json.loads(before)["results"]


def test_plot_writes_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.png"
    plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_compile_backend_on_cpu():
    # the only compile in the suite: a tiny shape, ~10 s of Inductor codegen on 2 cores
    case = build_case("kl", 4, vocab=64, hidden=1, seq_len=1, dtype=torch.float32, device=torch.device("cpu"))
    rec = run_backend(case, "torch-compile", copy_gbps=None, warmup_ms=1, rep_ms=5)
    if rec["status"] == "error" and "compiler" in (rec["reason"] or "").lower():
        pytest.skip(f"no C++ compiler for Inductor here: {rec['reason']}")
    assert rec["status"] == "ok", rec["reason"]
    assert rec["max_abs_err"] < 1e-5 and rec["first_call_ms"] > rec["time_ms"]["median"]


def test_plain_table_without_rich(report, monkeypatch, capsys):
    import sys

    from pgpo_bench.report import print_table

    monkeypatch.setitem(sys.modules, "rich.console", None)  # as where the bench extra is not installed
    print_table(report)
    out = capsys.readouterr().out
    assert out.startswith("pgpo-bench on CPU:") and "CPU run" in out
    assert "weights | 16 | pgpo-torch |" in out and "peak extra memory: not measured on CPU" in out


def test_liger_missing_is_unavailable(monkeypatch):
    import sys

    from pgpo_bench.providers import Unavailable
    from pgpo_bench.providers import liger_kl_function

    monkeypatch.setitem(sys.modules, "liger_kernel.ops.kl_div", None)
    with pytest.raises(Unavailable, match="liger-kernel not installed"):
        liger_kl_function()


@pytest.mark.parametrize("columns", [100, 160])
def test_rich_table_uses_the_terminal_width(report, monkeypatch, capsys, columns):
    import os
    import shutil

    from pgpo_bench.report import print_table

    pytest.importorskip("rich")
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((columns, 24)))
    print_table(report)
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= columns  # fits the terminal, whatever its width
    assert max(len(line) for line in table) > columns - 20  # and it uses the width it has
