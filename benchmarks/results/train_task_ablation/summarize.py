"""Tables and curves of the ablation: per task, every variant's greedy eval accuracy over RL (seed mean with a
min-max band), paired differences vs DAPO (mean +- sd over seeds, sign count), the measured PGPO overhead share.

python benchmarks/results/train_task_ablation/summarize.py runs/ablation   # -> summary.json, curves_*.png, tables
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["grpo", "dapo", "pgpo", "pgpo-k3", "pgpo-beta0", "pgpo-tau0", "pgpo-spread"]


def rows(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def load(root):
    """{task: {seed: {"sft": acc, variant: {"evals": [(rl_step, acc)], "rl": [rows]}}}} of finished runs only."""
    out = {}
    for d in sorted(glob.glob(os.path.join(root, "*-s*"))):
        task, seed = os.path.basename(d).rsplit("-s", 1)
        sft = os.path.join(d, "sft", "summary.json")
        if not os.path.exists(sft):
            continue
        with open(sft) as f:
            s = json.load(f)
        entry = {"sft": s["eval/acc"], "sft_steps": s["sft_steps"]}
        for v in ORDER:
            vd = os.path.join(d, v)
            if not os.path.exists(os.path.join(vd, "summary.json")):
                continue
            r = rows(os.path.join(vd, "metrics.jsonl"))
            rl = [x for x in r if x.get("phase") == "rl"]
            entry[v] = {
                "evals": [(0, s["eval/acc"])] + [(x["step"], x["eval/acc"]) for x in rl if "eval/acc" in x],
                "rl": rl,
            }
        out.setdefault(task, {})[int(seed)] = entry
    return out


def msd(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def per_run(v):
    accs = [a for _, a in v["evals"][1:]]
    rl = v["rl"]
    share = [
        (x.get("timing/text_only", 0) + x.get("timing/kl_reshape", 0)) / x["timing/step"]
        for x in rl
        if "timing/text_only" in x
    ]
    return {
        "final": accs[-1],
        "last3": statistics.mean(accs[-3:]),
        "auc": statistics.mean(accs),  # mean eval accuracy over the RL evals: how fast it learned
        "train_reward": statistics.mean(x["reward/mean"] for x in rl[-20:]),
        "groups": statistics.mean(x.get("data/groups", 0) for x in rl),
        "refill_rounds": statistics.mean(x.get("data/refill_rounds", 0) for x in rl),
        "overhead_share": statistics.mean(share) if share else None,
        "step_s": statistics.mean(x["timing/step"] for x in rl),
    }


CHANCE_PLUS = 0.15  # a warm-up that ends below this eval accuracy never left chance (0.10 on grid-count)


def summarize(root):
    data = load(root)
    res = {}
    for task, seeds in data.items():
        failed = {s: e for s, e in seeds.items() if e["sft"] < CHANCE_PLUS}
        seeds = {s: e for s, e in seeds.items() if s not in failed}  # uninformative: every variant stays at chance
        res[f"{task}_warmup_failed"] = {
            s: {"sft_steps": e["sft_steps"], "sft": e["sft"], **{v: e[v]["evals"][-1][1] for v in ORDER if v in e}}
            for s, e in failed.items()
        }
        variants = [v for v in ORDER if any(v in e for e in seeds.values())]
        t = {
            "seeds": sorted(seeds),
            "sft": {s: e["sft"] for s, e in seeds.items()},
            "sft_steps": {s: e["sft_steps"] for s, e in seeds.items()},
            "variants": {},
        }
        for v in variants:
            runs = {s: per_run(e[v]) for s, e in seeds.items() if v in e}
            vt = {"n_seeds": len(runs), "per_seed": runs}
            for key in ("final", "last3", "auc", "train_reward", "groups", "refill_rounds", "step_s"):
                vt[key] = msd([r[key] for r in runs.values()])
            sh = [r["overhead_share"] for r in runs.values() if r["overhead_share"] is not None]
            vt["overhead_share"] = msd(sh) if sh else None
            vt["gain_over_sft"] = msd([runs[s]["final"] - seeds[s]["sft"] for s in runs])
            for ref in ("dapo", "pgpo"):  # paired differences against DAPO, and against PGPO for its ablations
                if v == ref or (ref == "pgpo" and not v.startswith("pgpo-")):
                    continue
                paired = [s for s in runs if ref in seeds[s]]
                base = {s: per_run(seeds[s][ref]) for s in paired}
                vt[f"vs_{ref}"] = {}
                for key in ("final", "last3", "auc"):
                    d = [runs[s][key] - base[s][key] for s in paired]
                    if d:
                        vt[f"vs_{ref}"][key] = {
                            "mean": statistics.mean(d),
                            "sd": msd(d)[1],
                            "n": len(d),
                            "wins": sum(x > 1e-9 for x in d),
                            "ties": sum(abs(x) <= 1e-9 for x in d),
                            "losses": sum(x < -1e-9 for x in d),
                        }
            t["variants"][v] = vt
        res[task] = t
        plot(task, seeds, variants)
    return res


def plot(task, seeds, variants):
    """Panel 1: every variant's seed mean; then one panel per variant: each seed thin, mean thick, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharey=True)
    axes = axes.flat
    for i, v in enumerate(variants):
        curves = [e[v]["evals"] for e in seeds.values() if v in e]
        n = min(len(c) for c in curves)
        xs = [curves[0][j][0] for j in range(n)]  # RL step of each eval (the variants run no SFT: step = RL step)
        ys = [[c[j][1] for c in curves] for j in range(n)]
        mean = [statistics.mean(y) for y in ys]
        c = f"C{i}"
        axes[0].plot(xs, mean, color=c, label=f"{v} ({len(curves)} seeds)", lw=2)
        ax = axes[i + 1]
        for cur in curves:
            ax.plot([p[0] for p in cur[:n]], [p[1] for p in cur[:n]], color=c, lw=0.7, alpha=0.5)
        ax.plot(xs, mean, color=c, lw=2.5)
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=c, alpha=0.12)
        ax.set_title(f"{v}: {len(curves)} seeds (thin), mean (thick)", fontsize=10)
    axes[0].set_title(f"{task}: seed means", fontsize=10)
    axes[0].legend(fontsize=8)
    for ax in list(axes)[len(variants) + 1 :]:
        ax.axis("off")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("RL step (0 = after the SFT warm-up)")
    fig.supylabel("greedy eval accuracy (256 prompts)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"curves_{task}.png"), dpi=100)
    plt.close(fig)


def _ms(x) -> str:
    return f"{x[0]:.3f} +- {x[1]:.3f}"


def _paired(d: dict, k: str) -> str:
    """Paired difference vs DAPO in points: mean +- sd (wins/ties/losses over seeds)."""
    if k not in d:
        return "-"
    x = d[k]
    return f"{100 * x['mean']:+.1f} +- {100 * x['sd']:.1f} ({x['wins']}/{x['ties']}/{x['losses']})"


def table(res):
    lines = []
    for task, t in res.items():
        if task.endswith("_warmup_failed"):
            if t:
                lines.append(f"\n{task} (excluded above; final eval per variant): {json.dumps(t)}")
            continue
        sft = list(t["sft"].values())
        lines.append(
            f"\n### {task} ({len(t['seeds'])} seeds: {t['seeds']}; eval after SFT {statistics.mean(sft):.3f}"
            f" mean, range {min(sft):.3f}-{max(sft):.3f})\n"
        )
        lines.append(
            "| variant | seeds | final acc | mean of last 3 evals | mean over RL evals | final - SFT | "
            "final vs DAPO: mean +- sd (W/T/L) | last-3 vs DAPO | RL-mean vs DAPO | groups/step | "
            "overhead share | last-3 vs PGPO |"
        )
        lines.append("|" + "---|" * 12)
        for v, vt in t["variants"].items():
            d = vt.get("vs_dapo", {})
            oh = f"{100 * vt['overhead_share'][0]:.1f}%" if vt["overhead_share"] else "-"
            lines.append(
                f"| {v} | {vt['n_seeds']} | {_ms(vt['final'])} | {_ms(vt['last3'])} | {_ms(vt['auc'])} | "
                f"{100 * vt['gain_over_sft'][0]:+.1f} +- {100 * vt['gain_over_sft'][1]:.1f} | {_paired(d, 'final')} | "
                f"{_paired(d, 'last3')} | {_paired(d, 'auc')} | {vt['groups'][0]:.2f} | {oh} | "
                f"{_paired(vt.get('vs_pgpo', {}), 'last3')} |"
            )
    return "\n".join(lines)


def variance_table(path: str) -> str:
    """grad_variance.py's lines: relative variance (tr Cov / ||mean||^2) of the mini-batch gradient per checkpoint."""
    with open(path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    lines = [
        (
            "| task, warm-up checkpoint, rollout pool seed | kept groups | DAPO rel. var | PGPO rel. var | PGPO / DAPO | PGPO / DAPO total var | "
            "flat share at min-spread 0.1 / 0.5 | PGPO+min-spread 0.1 rel. var |"
        ),
        "|" + "---|" * 8,
    ]
    for r in recs:
        lines.append(
            f"| {r['task']}, {os.path.basename(os.path.dirname(r['checkpoint']))}, pool seed {r['seed']} | {r['kept_groups']} | {r['dapo']['rel_var']:.3f} | {r['pgpo']['rel_var']:.3f}"
            f" | {r['rel_var_ratio_pgpo_over_dapo']:.3f} | {r['total_var_ratio_pgpo_over_dapo']:.1f} | "
            f"{r['flat_frac']['0.1']:.3f} / {r['flat_frac']['0.5']:.3f} | {r['pgpo-spread0.1']['rel_var']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = argv or sys.argv[1:] or ["runs/ablation"]
    root = args[0]
    if len(args) > 1:  # grad_variance.py's output
        shutil.copy(args[1], os.path.join(HERE, "grad_variance.jsonl"))
        print(variance_table(args[1]))
    res = summarize(root)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    # the raw per-step logs, compressed, so every number here can be recomputed
    logs = os.path.join(HERE, "logs")
    for path in glob.glob(os.path.join(root, "*-s*", "*", "metrics.jsonl")):
        rel = os.path.relpath(path, root).replace(os.sep, "__")
        os.makedirs(logs, exist_ok=True)
        with open(path, "rb") as src, gzip.open(os.path.join(logs, rel + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    print(table(res))


if __name__ == "__main__":
    main()
