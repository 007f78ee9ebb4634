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


def run_colours(n_runs: int) -> list:
    """One colour per run, fixed across every panel (matplotlib's default cycle, repeated past its length)."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    return [cycle[i % len(cycle)] for i in range(n_runs)]


def build_figure(runs: list[tuple[str, list[dict]]], smooth: int = 5):
    """The figure of every PANELS metric any run logged: run i has colour i in every panel, whether or not it logged
    that panel's metric, and the legend lists every run (not only those of the first panel)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = run_colours(len(runs))
    panels = [(k, t) for k, t in PANELS if any(k in r for _, rows in runs for r in rows)]
    ncols = 3
    nrows = max(1, (len(panels) + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for (label, rows), colour in zip(runs, colours):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            k = 1 if key.startswith(("eval/", "sft/")) else smooth
            ax.plot(xs, _smooth(list(ys), k), label=label, color=colour,
                    marker="o" if key.startswith("eval/") else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if runs:
        handles = [Line2D([], [], color=c, label=label) for (label, _), c in zip(runs, colours)]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 3), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def plot_runs(run_dirs: list[str], out: str | None = None, smooth: int = 5) -> str:
    """Draws every PANELS metric any run logged; returns the PNG path (default RUN_DIR/curves.png)."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("pgpo-train plot needs matplotlib: pip install matplotlib (or the [bench] extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = build_figure([(run_label(d), read_metrics(d)) for d in run_dirs], smooth)
    out = out or os.path.join(run_dirs[0], "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
