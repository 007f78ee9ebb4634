"""--report-to wandb: refused at start when wandb is not installed; with it, every step's metrics.jsonl line goes to
the W&B run, whose id a resumed run reuses. W&B itself is stood in for by a recording module (no account, no
network): what is checked is pgpo-train's side of the calls, not the wandb package."""

import importlib.machinery
import importlib.util
import json
import sys
import types

from pgpo_train.cli import main
from pgpo_train.data.tasks import save_count_dataset


def _fake_wandb(calls: list):
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, metrics, step):
            calls.append(("log", step, metrics))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    mod.init = init
    return mod


def test_wandb_not_installed(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["--report-to", "wandb", "--out-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--report-to wandb: wandb is not installed" in capsys.readouterr().err


def test_metrics_go_to_wandb_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    data = save_count_dataset(tmp_path / "count", n_train=16, n_test=4, seed=0)
    run = tmp_path / "run"
    args = ["--dataset", data, "--prompt-template", "tiny", "--sft-steps", "1", "--sft-batch-size", "4",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0",
            "--save-every", "1", "--report-to", "wandb", "--out-dir", str(run), "--no-progress", "--no-tensorboard",
            "--no-export-model"]
    assert main([*args, "--steps", "1"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    init = calls[0][1]
    assert init["name"] == "run" and init["config"]["report_to"] == "wandb" and init["resume"] == "allow"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [x["step"] for x in lines] == [1, 2]
    assert logged[-1][2]["reward/mean"] == lines[-1]["reward/mean"]
    assert calls[-1] == ("finish",)
    calls.clear()
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert calls[0][1]["id"] == init["id"], "the resumed run logs to the same W&B run"
    assert [c[1] for c in calls if c[0] == "log"] == [3]


def _wandb_records(path):
    """The records of W&B's offline transaction log (run-ID.wandb: a 7-byte header, then LevelDB's log format,
    32 KiB blocks of chunks [crc32, length, type, data], type 1 = whole record, 2-4 = first/middle/last part)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:  # a block's zero padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def test_real_wandb_offline_gets_every_metrics_line(tmp_path, monkeypatch):
    """The real wandb package (offline: no account, no network): the run's W&B history holds every metrics.jsonl
    line at its step, values equal."""
    import pytest

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = save_count_dataset(tmp_path / "count", n_train=16, n_test=4, seed=0)
    run = tmp_path / "run"
    assert main(["--dataset", data, "--prompt-template", "tiny", "--sft-steps", "2", "--sft-batch-size", "4",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0",
                 "--steps", "2", "--report-to", "wandb", "--out-dir", str(run), "--no-progress", "--no-tensorboard",
                 "--no-export-model"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logs = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    history = []
    for r in _wandb_records(logs[0]):
        if r.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.history.item})
    assert [h["_step"] for h in history] == [x["step"] for x in lines] == [1, 2, 3, 4]
    for h, line in zip(history, lines):
        for k, v in line.items():
            if isinstance(v, float):
                assert h[k] == v or (v != v and h[k] != h[k]), (k, h[k], v)  # NaN stays NaN
