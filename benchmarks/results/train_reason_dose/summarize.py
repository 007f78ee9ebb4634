"""Tables and curves of the grid-reason dose-response benchmark: ../train_task_ablation/summarize.py's accuracy
tables and curves (reused, with this benchmark's variants), plus the dose table (PGPO vs DAPO and vs its controls per
filler setting), the weight diagnostics over training, and the checkpoint measurements (relative gradient variance,
KL by token role).

python benchmarks/results/train_reason_dose/summarize.py runs/reason   # -> summary.json, curves_*.png, tables
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "ablation_summarize", os.path.join(HERE, "..", "train_task_ablation", "summarize.py")
)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)
ab.ORDER = ["grpo", "dapo", "pgpo", "pgpo-shuffled", "pgpo-inverted"]
ab.HERE = HERE  # curves_<task>.png land here
REQUIRED = ("dapo", "pgpo", "pgpo-shuffled", "pgpo-inverted")
INCOMPLETE: dict = {}  # task -> seeds left out because a required variant had not finished (a sweep cut short)
_load = ab.load


def load_complete(root):
    """ab.load, keeping only the (filler, seed) units where every REQUIRED variant finished: every table is paired."""
    out = {}
    for task, seeds in _load(root).items():
        keep = {s: e for s, e in seeds.items() if all(v in e for v in REQUIRED)}
        INCOMPLETE[task] = sorted(set(seeds) - set(keep))
        out[task] = keep
    return out


ab.load = load_complete
DIAG = ("pgpo/frac_above_tau", "pgpo/weight_max", "pgpo/weight_gini", "pgpo/eff_token_ratio", "pgpo/top1_mass",
        "pgpo/top10_mass", "pgpo/kl_mean")  # fmt: skip


def filler_of(task: str) -> int:
    return int(task.rsplit("-f", 1)[1])


def diagnostics(root: str) -> dict:
    """{task: {variant: {metric: (mean, sd over seeds of the per-run mean over RL steps)}}}, plus first/last 5 steps."""
    out = {}
    for d in sorted(glob.glob(os.path.join(root, "grid-reason-f*-s*"))):
        task, seed = os.path.basename(d).rsplit("-s", 1)
        if int(seed) in INCOMPLETE.get(task, []):
            continue
        for v in ab.ORDER:
            path = os.path.join(d, v, "metrics.jsonl")
            if not v.startswith("pgpo") or not os.path.exists(os.path.join(d, v, "summary.json")):
                continue
            rl = [x for x in ab.rows(path) if x.get("phase") == "rl" and "pgpo/weight_gini" in x]
            if not rl:
                continue
            e = out.setdefault(task, {}).setdefault(v, {})
            for k in DIAG:
                e.setdefault(k, []).append(statistics.mean(x[k] for x in rl))
                e.setdefault(k + "@first5", []).append(statistics.mean(x[k] for x in rl[:5]))
                e.setdefault(k + "@last5", []).append(statistics.mean(x[k] for x in rl[-5:]))
    return {t: {v: {k: ab.msd(xs) for k, xs in e.items()} for v, e in vs.items()} for t, vs in out.items()}


def at_checkpoint(root: str) -> dict:
    """{task: {"rel_var_ratio_<v>_over_dapo": (mean, sd), "lower_than_dapo_<v>": count, "roles": {role: {k: mean}}}}"""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "*-s*", "at_checkpoint.json"))):
        task, seed = os.path.basename(os.path.dirname(path)).rsplit("-s", 1)
        if int(seed) in INCOMPLETE.get(task, []):
            continue
        with open(path) as f:
            r = json.load(f)
        out.setdefault(task, []).append(r)
    res = {}
    for task, runs in out.items():
        t = {"n": len(runs)}
        for v in ("pgpo", "pgpo-shuffled", "pgpo-inverted"):
            xs = [r[f"rel_var_ratio_{v}_over_dapo"] for r in runs if f"rel_var_ratio_{v}_over_dapo" in r]
            if xs:
                t[f"rel_var_ratio_{v}_over_dapo"] = ab.msd(xs)
                t[f"lower_than_dapo_{v}"] = sum(x < 1 for x in xs)
                t[f"n_{v}"] = len(xs)
        roles = {}
        for r in runs:
            for role, d in r["roles"].items():
                for k, x in d.items():
                    roles.setdefault(role, {}).setdefault(k, []).append(x)
        t["roles"] = {role: {k: statistics.mean(xs) for k, xs in d.items()} for role, d in roles.items()}
        res[task] = t
    return res


def dose_table(res: dict) -> list[str]:
    lines = [
        "\n### Dose response: PGPO minus each reference, paired over seeds, points: mean +- sd (W/T/L)\n",
        (
            "| filler words | seeds | SFT eval | DAPO last-3 | PGPO last-3 | PGPO - DAPO last-3 | PGPO - DAPO RL-mean | "
            "PGPO - shuffled last-3 | PGPO - shuffled RL-mean | PGPO - inverted last-3 | shuffled - DAPO last-3 | "
            "inverted - DAPO last-3 |"
        ),
        "|" + "---|" * 12,
    ]
    for task in sorted((t for t in res if not t.endswith("_warmup_failed")), key=filler_of):
        t = res[task]
        V = t["variants"]
        if "pgpo" not in V:
            continue

        def neg(d):  # vs_pgpo holds control - PGPO; the table wants PGPO - control
            return {**d, "mean": -d["mean"], "wins": d["losses"], "losses": d["wins"]}

        sh = {k: neg(d) for k, d in V.get("pgpo-shuffled", {}).get("vs_pgpo", {}).items()}
        inv = {k: neg(d) for k, d in V.get("pgpo-inverted", {}).get("vs_pgpo", {}).items()}
        sft = list(t["sft"].values())
        lines.append(
            f"| {filler_of(task)} | {V['pgpo']['n_seeds']} | {statistics.mean(sft):.3f} | "
            f"{ab._ms(V['dapo']['last3']) if 'dapo' in V else '-'} | {ab._ms(V['pgpo']['last3'])} | "
            f"{ab._paired(V['pgpo'].get('vs_dapo', {}), 'last3')} | {ab._paired(V['pgpo'].get('vs_dapo', {}), 'auc')} | "
            f"{ab._paired(sh, 'last3')} | {ab._paired(sh, 'auc')} | {ab._paired(inv, 'last3')} | "
            f"{ab._paired(V.get('pgpo-shuffled', {}).get('vs_dapo', {}), 'last3')} | "
            f"{ab._paired(V.get('pgpo-inverted', {}).get('vs_dapo', {}), 'last3')} |"
        )
    return lines


def diag_table(diag: dict) -> list[str]:
    lines = ["\n### Weight diagnostics over RL (mean over steps, then mean +- sd over seeds)\n"]
    keys = ("pgpo/frac_above_tau", "pgpo/weight_gini", "pgpo/eff_token_ratio", "pgpo/top1_mass", "pgpo/top10_mass",
            "pgpo/weight_max", "pgpo/kl_mean")  # fmt: skip
    lines.append(
        "| filler | variant | " + " | ".join(k.split("/")[1] for k in keys) + " | eff ratio first 5 -> last 5 |"
    )
    lines.append("|" + "---|" * (len(keys) + 3))
    for task in sorted(diag, key=filler_of):
        for v, e in diag[task].items():
            cells = " | ".join(f"{e[k][0]:.3f} +- {e[k][1]:.3f}" for k in keys)
            ef, el = e["pgpo/eff_token_ratio@first5"][0], e["pgpo/eff_token_ratio@last5"][0]
            lines.append(f"| {filler_of(task)} | {v} | {cells} | {ef:.3f} -> {el:.3f} |")
    return lines


def ckpt_tables(ck: dict) -> list[str]:
    lines = ["\n### At the warm-up checkpoint: relative gradient variance (tr Cov / ||mean||^2) over DAPO's\n",
             "| filler | checkpoints | PGPO / DAPO (lower in) | shuffled / DAPO (lower in) | inverted / DAPO (lower in) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for task in sorted(ck, key=filler_of):
        t = ck[task]
        cells = []
        for v in ("pgpo", "pgpo-shuffled", "pgpo-inverted"):
            k = f"rel_var_ratio_{v}_over_dapo"
            cells.append(f"{ab._ms(t[k])} ({t[f'lower_than_dapo_{v}']}/{t[f'n_{v}']})" if k in t else "-")
        lines.append(f"| {filler_of(task)} | {t['n']} | " + " | ".join(cells) + " |")
    lines += [("\n### At the warm-up checkpoint: token KL and PGPO weight by token role (sampled responses, mean over "
              "checkpoints)\n"), ("| filler | role | token share | KL mean | KL mass share | weight mean | "
              "weight mass share |"), "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in sorted(ck, key=filler_of):
        for role, d in ck[task]["roles"].items():
            lines.append(
                f"| {filler_of(task)} | {role} | {d['token_share']:.3f} | {d['kl_mean']:.3f} | "
                f"{d['kl_mass_share']:.3f} | {d['weight_mean']:.3f} | {d['weight_mass_share']:.3f} |"
            )
    return lines


def main(root: str) -> int:
    res = ab.summarize(root)
    diag, ck = diagnostics(root), at_checkpoint(root)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(
            {"accuracy": res, "incomplete_seeds_left_out": INCOMPLETE, "diagnostics": diag, "at_checkpoint": ck},
            f,
            indent=1,
        )
    # the raw per-step logs and checkpoint measurements, compressed, so every number here can be recomputed
    logs = os.path.join(HERE, "logs")
    os.makedirs(logs, exist_ok=True)
    paths = glob.glob(os.path.join(root, "*-s*", "*", "metrics.jsonl"))
    paths += glob.glob(os.path.join(root, "*-s*", "at_checkpoint.json")) + glob.glob(os.path.join(root, "*.log"))
    for path in paths:
        rel = os.path.relpath(path, root).replace(os.sep, "__")
        with open(path, "rb") as src, gzip.open(os.path.join(logs, rel + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    print(f"incomplete (filler, seed) units left out: {INCOMPLETE}")
    print("\n".join(dose_table(res) + [ab.table(res)] + diag_table(diag) + ckpt_tables(ck)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/reason"))
