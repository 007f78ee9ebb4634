"""Summarize the dapo-vs-pgpo benchmark runs (runs/bench-{algo}-s{seed}) into this folder.

Writes summary.jsonl (one line per run), {run}.metrics.jsonl copies, curves.png (all runs overlaid) and
curves_seed{N}.png. Usage: python benchmarks/results/train_dapo_vs_pgpo/summarize.py [RUNS_ROOT]
"""

import glob
import json
import os
import shutil
import statistics
import sys

from pgpo_train.plot import plot_runs
from pgpo_train.plot import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def summarize(run_dir: str) -> dict:
    rows = read_metrics(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    rl = [r for r in rows if r.get("phase") == "rl"]
    evals = [(r["step"], r["eval/acc"]) for r in rows if "eval/acc" in r]
    sft_end = [a for s, a in evals if s == cfg["sft_steps"]]
    last50 = rl[-50:]

    def mean(key, rs):
        xs = [r[key] for r in rs if key in r]
        return statistics.fmean(xs) if xs else None

    timing = {k: mean(k, rl) for k in sorted({k for r in rl for k in r if k.startswith("timing/")})}
    return {
        "run": os.path.basename(run_dir),
        "algo": cfg["algo"],
        "seed": cfg["seed"],
        "sft_steps": cfg["sft_steps"],
        "rl_steps": len(rl),
        "eval_acc_after_sft": sft_end[0] if sft_end else None,
        "eval_acc_final": evals[-1][1] if evals else None,
        "eval_acc_best": max(a for _, a in evals) if evals else None,
        "eval_acc_mean_last5": statistics.fmean(a for _, a in evals[-5:]) if evals else None,
        "train_reward_mean_last50": mean("reward/mean", last50),
        "train_acc_mean_last50": mean("reward/acc", last50),
        "train_reward_mean_first50": mean("reward/mean", rl[:50]),
        "kept_frac_mean": mean("data/kept_frac", rl),
        "entropy_last50": mean("actor/entropy", last50),
        "kl_mean_last50": mean("pgpo/kl_mean", last50),
        **{f"mean_{k.replace('/', '_')}_s": v for k, v in timing.items()},
    }


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "runs"
    runs = sorted(glob.glob(os.path.join(root, "bench-*-s*")))
    runs = [r for r in runs if os.path.isdir(r)]
    if not runs:
        raise SystemExit(f"no runs under {root}/bench-*-s*")
    with open(os.path.join(HERE, "summary.jsonl"), "w") as f:
        for r in runs:
            s = summarize(r)
            f.write(json.dumps(s) + "\n")
            print(json.dumps(s))
            shutil.copy(os.path.join(r, "metrics.jsonl"), os.path.join(HERE, f"{os.path.basename(r)}.metrics.jsonl"))
            shutil.copy(os.path.join(r, "config.json"), os.path.join(HERE, f"{os.path.basename(r)}.config.json"))
    plot_runs(runs, os.path.join(HERE, "curves.png"), smooth=15)
    for seed in sorted({r.rsplit("-s", 1)[1] for r in runs}):
        plot_runs([r for r in runs if r.endswith(f"-s{seed}")], os.path.join(HERE, f"curves_seed{seed}.png"), smooth=15)


if __name__ == "__main__":
    main()
