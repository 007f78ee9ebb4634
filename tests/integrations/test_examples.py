"""The examples run end to end on the tiny model (the defaults users try first)."""

import os
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _main(name):
    return runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")["main"]


def test_verl_example(capsys):
    _main("verl_pgpo.py")(["--prompts", "2", "--n", "3", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert "advantages now A x w~ on every valid token: True" in out
    assert "pgpo/kl_mean" in out


def test_trl_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    monkeypatch.setenv("PGPO_CACHE", str(tmp_path / "cache"))  # the synthetic dataset is generated here
    _main("trl_pgpo.py")(["--max-steps", "1", "--batch-size", "4", "--num-generations", "2",
                          "--max-completion-length", "4", "--max-samples", "8", "--backend", "torch",
                          "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "'pgpo/kl_mean'" in out and "'step': 1" in out
