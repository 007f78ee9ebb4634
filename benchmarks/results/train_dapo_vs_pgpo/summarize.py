"""Summarize the dapo-vs-pgpo benchmark runs (runs/bench-{algo}-s{seed}) into this folder.

Writes summary.jsonl (one line per run), {run}.metrics.jsonl.gz copies, curves.png (per algo: every seed thin,
the seed mean thick) and curves_seed0.png (every logged metric of seed 0, both algos). Usage: python benchmarks/results/train_dapo_vs_pgpo/summarize.py [RUNS_ROOT]
"""

import glob
import gzip
import json
import os
import shutil
import statistics
import sys

from pgpo_train.run.plot import plot_runs
from pgpo_train.run.plot import read_metrics

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
            gz = os.path.join(HERE, f"{os.path.basename(r)}.metrics.jsonl.gz")
            with open(os.path.join(r, "metrics.jsonl"), "rb") as src, gzip.GzipFile(gz, "wb", mtime=0) as dst:
                shutil.copyfileobj(src, dst)
            shutil.copy(os.path.join(r, "config.json"), os.path.join(HERE, f"{os.path.basename(r)}.config.json"))
    plot_seed_means(runs, os.path.join(HERE, "curves.png"))
    plot_runs([r for r in runs if r.endswith("-s0")], os.path.join(HERE, "curves_seed0.png"), smooth=15)


def plot_seed_means(runs: list[str], out: str) -> None:
    """Eval accuracy, train reward (smoothed 25 steps) and seconds per step: each seed thin, the seed mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval/acc", "eval accuracy (greedy, 128 held-out)", 1),
        ("reward/mean", "train reward (smoothed)", 25),
        ("timing/step", "seconds per RL step (smoothed)", 25),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    colors = {"dapo": "tab:blue", "pgpo": "tab:orange", "grpo": "tab:green"}
    for ax, (key, title, k) in zip(axes, panels):
        for algo in sorted({os.path.basename(r).split("-")[1] for r in runs}):
            curves = []
            for r in [r for r in runs if os.path.basename(r).split("-")[1] == algo]:
                # eval/acc includes the eval at the end of the SFT warm-up; the other panels are RL steps only
                pts = [(x["step"], x[key]) for x in read_metrics(r) if key in x
                       and (key == "eval/acc" or x.get("phase") == "rl")]
                xs = [p[0] for p in pts]
                ys = [statistics.fmean([q[1] for q in pts[max(0, i - k + 1) : i + 1]]) for i in range(len(pts))]
                ax.plot(xs, ys, color=colors.get(algo), alpha=0.3, lw=1)
                curves.append((xs, ys))
            n = min(len(c[0]) for c in curves)
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
            ax.plot(
                curves[0][0][:n], mean, color=colors.get(algo), lw=2.5, label=f"{algo} (mean of {len(curves)} seeds)"
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (SFT warm-up ends at 300)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
