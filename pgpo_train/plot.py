"""`pgpo-train plot RUN_DIR...`: training curves from metrics.jsonl to one PNG (runs overlaid)."""

from __future__ import annotations

import json
import os

# (metric key, panel title); panels whose key no run logged are left out
PANELS = [
    ("reward/mean", "reward (train rollouts)"),
    ("reward/acc", "accuracy (train rollouts)"),
    ("eval/acc", "eval accuracy (greedy)"),
    ("response/length_mean", "response length"),
    ("actor/entropy", "entropy"),
    ("actor/clip_frac", "clip fraction"),
    ("pgpo/kl_mean", "token KL(vis || txt) mean"),
    ("pgpo/frac_above_tau", "fraction of tokens with I >= tau"),
    ("pgpo/weight_std", "PGPO weight std"),
    ("data/kept_frac", "dynamic sampling: kept fraction"),
    ("sft/loss", "SFT warm-up loss"),
    ("timing/step", "seconds per step"),
]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a pgpo-train run directory")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_label(run_dir: str) -> str:
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        label = cfg.get("algo", "")
        if label == "pgpo":
            p = cfg.get("pgpo", {})
            label += f" ({p.get('estimator')}, tau={p.get('tau')}, beta={p.get('beta')})"
        return f"{label} [{os.path.basename(os.path.normpath(run_dir))}]"
    return os.path.basename(os.path.normpath(run_dir))


def _smooth(ys: list[float], k: int) -> list[float]:
    if k <= 1:
        return ys
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(run_dirs: list[str], out: str | None = None, smooth: int = 5) -> str:
    """Draws every PANELS metric any run logged; returns the PNG path (default RUN_DIR/curves.png)."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("pgpo-train plot needs matplotlib: pip install matplotlib (or the [bench] extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_label(d), read_metrics(d)) for d in run_dirs]
    panels = [(k, t) for k, t in PANELS if any(k in r for _, rows in runs for r in rows)]
    ncols = 3
    nrows = max(1, (len(panels) + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for label, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            k = 1 if key.startswith(("eval/", "sft/")) else smooth
            ax.plot(xs, _smooth(list(ys), k), label=label, marker="o" if key.startswith("eval/") else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 3), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = out or os.path.join(run_dirs[0], "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
