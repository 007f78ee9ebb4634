"""What a run writes beside its checkpoints: metrics.jsonl (and tensorboard), curves.png, the eval summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from pgpo_train.run.plot import plot_runs
from pgpo_train.run.rundir import repair_metrics


class Logger:
    """metrics.jsonl (one line per step) and tensorboard when installed."""

    def __init__(self, out_dir: str, tensorboard: bool, truncate_after: int | None, report_to: str = "none",
                 config: dict | None = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if truncate_after is not None and os.path.exists(self.path):
            # resume: drop lines written after the checkpoint, so the log matches an uninterrupted run, and a line
            # torn by a full disk or a kill
            n = repair_metrics(self.path, truncate_after)
            if n["torn"] or n["after"]:
                dropped = f"{n['torn']} torn row(s), {n['after']} after step {truncate_after}"
                print(f"pgpo-train: metrics.jsonl: dropped {dropped}")
        elif truncate_after is None and os.path.exists(self.path):
            os.remove(self.path)
        self.tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            print("pgpo-train: tensorboard is not installed: metrics go to metrics.jsonl only (--no-tensorboard)")
        elif tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        self.wandb = wandb_run(out_dir, config or {}) if report_to == "wandb" else None

    def log(self, step: int, metrics: dict) -> None:
        metrics = {
            k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v) for k, v in metrics.items()
        }
        rec = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run(out_dir: str, config: dict):
    """A Weights & Biases run for --report-to wandb: project $WANDB_PROJECT (default pgpo), named after the run dir,
    its id kept in RUN_DIR/wandb-id so a resumed run continues the same W&B run."""
    import uuid

    import wandb

    id_path = os.path.join(out_dir, "wandb-id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "pgpo"), name=os.path.basename(os.path.abspath(out_dir)),
                      id=run_id, resume="allow", dir=out_dir, config=config)


def eval_summary(metrics_path: str, sft_end: int, n_eval: int) -> dict:
    """Greedy eval accuracy after the warm-up (the eval at step sft_end) and at the last eval, each with its
    binomial standard error sqrt(p (1 - p) / n), read back from metrics.jsonl (so a resumed run reports both)."""
    if not n_eval or not os.path.exists(metrics_path):
        return {}
    with open(metrics_path) as f:
        evals = [(r["step"], r["eval/acc"]) for r in map(json.loads, filter(str.strip, f)) if "eval/acc" in r]
    out = {}
    for key, hit in (("sft", [a for s, a in evals if s == sft_end]), ("final", [a for _, a in evals[-1:]])):
        if hit:
            out[f"eval/acc_{key}"] = hit[0]
            out[f"eval/acc_{key}_se"] = math.sqrt(hit[0] * (1 - hit[0]) / n_eval)
    out["eval/n"] = n_eval
    return out


def write_curves(out_dir: str) -> str | None:
    """RUN_DIR/curves.png via pgpo-train plot's code; None when nothing was logged or (with a one-line notice)
    without matplotlib."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        print("pgpo-train: matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    return plot_runs([out_dir])


@contextmanager
def timed(times: dict, key: str):
    """Adds the wall-clock seconds of the block to times[key] (a step's `timing/*` metrics)."""
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0
