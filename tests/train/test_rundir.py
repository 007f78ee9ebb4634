"""The run dir survives faults: one writer at a time, torn metrics and orphaned temporaries repaired on resume,
SIGINT/SIGTERM stop after the step with a checkpoint that resumes bit-exactly (SFT warm-up included), and a NaN
token advantage stops the run naming the step. Tiny embedded model, a handful of steps."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from pgpo_train.cli import main
from pgpo_train.recipe import train as train_mod
from pgpo_train.recipe.train import train
from pgpo_train.rl import core_algos
from pgpo_train.rl.nonfinite import NonFiniteError
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.checkpoint import read_trainer_state
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.signals import TrainingInterrupted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the embedded tiny model and task, a few small steps (~0.1 s each on one core)
FAST = {
    "sft_steps": 4,
    "sft_batch_size": 4,
    "steps": 2,
    "prompts_per_step": 2,
    "group_size": 4,
    "mini_batch_size": 8,
    "micro_batch_size": 8,
    "max_new_tokens": 8,
    "eval_every": 0,
    "save_every": 0,
    "tensorboard": False,
    "progress": False,
    "seed": 1,
    "dynamic_sampling": "off",
}


def _cfg(out, **kw):
    return TrainConfig(out_dir=str(out), **{**FAST, **kw})


def _argv(out, **kw):
    args = []
    for k, v in {**FAST, **kw}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag if v else f"--no-{flag[2:]}"] if isinstance(v, bool) else [flag, str(v)]
    return [*args, "--out-dir", str(out)]


def _lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("timing/")} for x in f]


def _final_params(run_dir):
    path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(_cfg(out))
    return out


# %% lock


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys; from pgpo_train.run.rundir import RunDirLock; "
        f"lock = RunDirLock({str(out)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"is in use by another run \\(pid {holder.pid}\\)"):
            train(_cfg(out))
        assert main(_argv(out)) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "pgpo-train" in ln]
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
        assert not os.path.exists(out / "metrics.jsonl")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    train(_cfg(out, sft_steps=1, steps=0))  # the lock went with its holder


# %% resume repairs the run dir


def test_resume_drops_a_torn_line_and_later_rows_and_removes_orphans(reference, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out, steps=1))  # "killed" after SFT + 1 RL step (its last checkpoint: step 5)
    ckpt = out / "checkpoints"
    assert read_trainer_state(latest_checkpoint(str(ckpt)))["step"] == 5
    with open(out / "metrics.jsonl", "a") as f:  # rows past the checkpoint, then a write torn by a full disk
        f.write(json.dumps({"step": 6, "phase": "rl", "reward/mean": 0.5}) + "\n")
        f.write('{"step": 7, "phase": "rl", "rew')
    (ckpt / ".tmp-step-00000006-4242").mkdir()  # a save killed half-way
    (ckpt / ".tmp-step-00000006-4242" / "state.pt").write_bytes(b"\0" * 1000)
    (ckpt / ".latest.tmp-4242").write_text("step-00000006")
    capsys.readouterr()
    train(_cfg(out, resume=True))
    log = capsys.readouterr().out
    assert "dropped 1 torn row(s), 1 after step 5" in log
    assert "removed 2 unfinished checkpoint temporaries" in log
    assert sorted(p for p in os.listdir(ckpt) if p.startswith(".")) == []
    steps = [x["step"] for x in _lines(out)]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # each step once
    assert _lines(out) == _lines(reference)
    assert _same(_final_params(out), _final_params(reference))
    # resuming with other settings would silently continue another run
    with pytest.raises(
        ValueError, match=r"settings differ .*: --algo 'dapo' \(the run's: 'pgpo'\), --seed 2 \(the run's: 1\);"
    ):
        train(_cfg(out, resume=True, steps=3, seed=2, algo="dapo"))


def test_disk_full_mid_run_is_one_line_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    """The issue's case: metrics.jsonl's append fails half-way (ENOSPC) -> one line, exit 1; after freeing space
    --resume drops the torn row and continues as if nothing happened."""
    import errno

    log = train_mod.Logger.log

    def log_until_disk_full(self, step, metrics):
        if step == 3:
            with open(self.path, "a") as f:
                f.write('{"step": 3, "phase": "sf')
            raise OSError(errno.ENOSPC, "No space left on device")
        log(self, step, metrics)

    monkeypatch.setattr(train_mod.Logger, "log", log_until_disk_full)
    out = tmp_path / "run"
    assert main(_argv(out, save_every=1)) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "pgpo-train" in ln]
    assert err == ["pgpo-train: error: [Errno 28] No space left on device (the run dir keeps its last checkpoint)"]
    monkeypatch.undo()
    assert main([*_argv(out, save_every=1), "--resume"]) == 0
    assert _lines(out) == _lines(reference)
    assert _same(_final_params(out), _final_params(reference))


def test_fresh_start_removes_orphans(tmp_path):
    from pgpo_train.run.rundir import open_run_dir

    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / ".tmp-step-00000003-1").mkdir()
    (ckpt / ".latest.tmp-1").write_text("x")
    with open_run_dir(str(tmp_path / "run"), resume=False, overwrite=False, log=lambda s: None):
        assert os.listdir(ckpt) == []


# %% signals


def test_interrupt_in_the_sft_warmup_checkpoints_and_resumes_exactly(reference, tmp_path, monkeypatch):
    """A SIGINT during SFT step 2 (of 4): the step finishes, a phase-"sft" checkpoint is written, resume is exact."""
    sft_step = train_mod.sft_step
    calls = []

    def sft_step_then_signal(*a, **k):
        out = sft_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod, "sft_step", sft_step_then_signal)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        train(_cfg(out))
    monkeypatch.undo()
    assert (e.value.step, e.value.exit_code) == (2, 130)
    st = read_trainer_state(e.value.checkpoint)
    assert (st["step"], st["phase"]) == (2, "sft")
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    train(_cfg(out, resume=True))
    assert _lines(out) == _lines(reference)
    assert _same(_final_params(out), _final_params(reference))


def _rows_written(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def reference_cli(tmp_path_factory):
    """The uninterrupted CLI run with a warm-up long enough (40 steps) for a signal to arrive mid-run."""
    out = tmp_path_factory.mktemp("ref_cli") / "run"
    assert main(_argv(out, sft_steps=40)) == 0
    return out


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_cli_saves_prints_resume_and_resumes_exactly(reference_cli, tmp_path, sig, code):
    out = tmp_path / "run"
    argv = _argv(out, sft_steps=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgpo_train", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _rows_written(out) < 3:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    step = read_trainer_state(latest_checkpoint(str(out / "checkpoints")))["step"]
    assert 3 <= step < 40
    assert f"stopped by {signal.Signals(sig).name} after step {step}" in stderr
    resume = [ln for ln in stdout.splitlines() if ln.startswith("pgpo-train: continue with: pgpo-train ")]
    assert len(resume) == 1, stdout
    cmd = shlex.split(resume[0].split("continue with: ", 1)[1])[1:]
    assert cmd[-1] == "--resume" and str(out) in cmd
    assert main(cmd) == 0
    assert _lines(out) == _lines(reference_cli)
    assert _same(_final_params(out), _final_params(reference_cli))


# %% non-finite


def test_nan_token_weight_stops_naming_the_step(tmp_path, monkeypatch):
    weights = core_algos.pgpo_weights

    def nan_in_one_response(scores, mask, **kw):
        w = weights(scores, mask, **kw)
        w[0] = float("nan")  # what the kernels give a response with a NaN logit (NONFINITE_RULES 2, 5)
        return w

    monkeypatch.setattr(core_algos, "pgpo_weights", nan_in_one_response)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 5: the PGPO token weights of 1 of 8 responses are not finite"):
        train(_cfg(out, sft_steps=4, steps=2))
    assert read_trainer_state(latest_checkpoint(str(out / "checkpoints")))["step"] == 4  # nothing NaN was saved
    assert main(_argv(tmp_path / "cli", sft_steps=0, steps=1)) == 1


def test_nan_gradient_norm_stops_before_saving(tmp_path, monkeypatch):
    sft_step = train_mod.sft_step
    calls = []

    def nan_at_step_3(*a, **k):
        m = sft_step(*a, **k)
        calls.append(1)
        return {**m, "sft/grad_norm": float("nan")} if len(calls) == 3 else m

    monkeypatch.setattr(train_mod, "sft_step", nan_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^step 3: sft/grad_norm = nan; stopping before the weights are saved"):
        train(_cfg(out, save_every=1))
    assert read_trainer_state(latest_checkpoint(str(out / "checkpoints")))["step"] == 2
