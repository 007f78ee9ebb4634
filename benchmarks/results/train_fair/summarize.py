"""Tables of the fair comparison (issue 28) from pgpo_bench.paired_runs' run directories: accuracy per variant, PGPO minus
each reference paired by seed, gradient norms and clipping, weight concentration over RL, the warm-up (both kinds
of rows) and the token-role table at the warm-up checkpoints beside the P = 0 one of ../train_reason_dose.

python benchmarks/results/train_fair/summarize.py runs/fair --split test > tables.md   (also writes summary.json)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

ORDER = ["dapo", "pgpo", "pgpo-shuffled", "pgpo-dev", "dapo-noclip", "pgpo-noclip"]
# (variant, reference) pairs reported as variant - reference
PAIRS = [("pgpo", "dapo"), ("pgpo", "pgpo-shuffled"), ("pgpo", "pgpo-dev"), ("pgpo-dev", "dapo"),
         ("pgpo-shuffled", "dapo"), ("pgpo-noclip", "dapo-noclip"), ("pgpo-noclip", "pgpo"), ("dapo-noclip", "dapo")]
GRAD = ["actor/grad_norm", "actor/grad_norm_post_clip", "actor/grad_clip_frac"]
WEIGHT = ["pgpo/eff_token_ratio", "pgpo/top10_mass", "pgpo/top1_mass", "pgpo/weight_gini", "pgpo/frac_above_tau"]


def _lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.3f} +- {sd:.3f}"


# two-sided 95% Student t quantiles by degrees of freedom (a paired t interval over the seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}


def _paired(a: dict, b: dict) -> tuple[str, list]:
    """a - b over the seeds both have, in points: mean +- sd (W/T/L, n) and the paired 95% t interval."""
    seeds = sorted(set(a) & set(b))
    d = [100 * (a[s] - b[s]) for s in seeds]
    if not d:
        return "-", []
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    w, t = sum(x > 0 for x in d), sum(x == 0 for x in d)
    m = statistics.mean(d)
    half = T95.get(len(d) - 1, 1.96) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{m:+.1f} +- {sd:.1f} ({w}/{t}/{len(d) - w - t}, n={len(d)}) | [{m - half:+.1f}, {m + half:+.1f}]", d


def param_shift(start: str, run: str) -> float | None:
    """||theta_final - theta_warm-up|| over every parameter: how far RL moved the policy (the step size the clip and
    the learning rate allow, summed over the run)."""
    import torch
    from safetensors.torch import load_file

    ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*", "state.pt")))
    if not ckpts or not os.path.exists(os.path.join(start, "model.safetensors")):
        return None
    a = load_file(os.path.join(start, "model.safetensors"))
    b = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["model"]
    b = {k.removeprefix("model.language_model.").removeprefix("model."): v for k, v in b.items()}
    a = {k.removeprefix("model.language_model.").removeprefix("model."): v for k, v in a.items()}
    if a.keys() != b.keys():
        return None
    return float(sum(((b[k].double() - a[k].double()) ** 2).sum() for k in a) ** 0.5)


def collect(root: str, split: str) -> dict:
    units = {}
    for base in sorted(glob.glob(os.path.join(root, "*f*-p*-s*"))):
        m = re.search(r"f(\d+)-p([\d.]+)-s(\d+)$", base)
        if not m or not os.path.isdir(os.path.join(base, split)):  # the selection seeds' units have no test runs
            continue
        seed = int(m.group(3))
        u = {"runs": {}}
        sft = os.path.join(base, "sft", "metrics.jsonl")
        if os.path.exists(sft):
            lines = [x for x in _lines(sft) if x.get("phase") == "sft"]
            if lines:
                last = lines[-1]
                u["sft"] = {"steps": last["step"], "eval": last.get("eval/acc"),
                            **{k: statistics.mean(x[k] for x in lines[-3:] if k in x)
                               for k in ("sft/visual_seq_acc", "sft/text_seq_acc", "sft/visual_loss", "sft/text_loss")
                               if k in last}}
        roles = os.path.join(base, "roles.json")
        if os.path.exists(roles):
            with open(roles) as f:
                u["roles"] = json.load(f)["roles"]
        for run in sorted(glob.glob(os.path.join(base, split, "*-lr*"))):
            if not os.path.exists(os.path.join(run, "summary.json")):
                continue
            name, lr = re.match(r"(.+)-lr(.+)$", os.path.basename(run)).groups()
            lines = [x for x in _lines(os.path.join(run, "metrics.jsonl")) if x.get("phase") == "rl"]
            evals = [x["eval/acc"] for x in lines if "eval/acc" in x]
            upd = [x for x in lines if "actor/grad_norm" in x]
            r = {"lr": float(lr), "final": evals[-1] if evals else None, "evals": evals, "steps": len(lines),
                 "wall_s": json.load(open(os.path.join(run, "summary.json"))).get("wall_s")}
            for k in GRAD + WEIGHT:
                xs = [x[k] for x in upd if k in x and x[k] is not None and math.isfinite(x[k])]
                r[k] = statistics.mean(xs) if xs else None
                if k in ("pgpo/eff_token_ratio", "pgpo/top10_mass") and len(xs) >= 10:
                    r[k + "/first5"], r[k + "/last5"] = statistics.mean(xs[:5]), statistics.mean(xs[-5:])
            r["param_shift"] = param_shift(os.path.join(base, "sft-model"), run)
            u["runs"][name] = r
        units[seed] = u
    return units


def tables(units: dict, dose_summary: str | None) -> tuple[str, dict]:
    out, res = [], {}
    seeds = sorted(units)
    acc = {v: {s: units[s]["runs"][v]["final"] for s in seeds if v in units[s]["runs"]} for v in ORDER}
    sft_eval = [units[s]["sft"]["eval"] for s in seeds if units[s].get("sft", {}).get("eval") is not None]
    out.append(f"### Final test accuracy after RL ({len(seeds)} warm-up seeds: {seeds}; eval after the warm-up "
               f"{_ms(sft_eval)})\n")
    out.append("| variant | seeds | final acc | final - SFT (points) | pre-clip grad norm | post-clip | clip frac | "
               "param shift |")
    out.append("|---|---|---|---|---|---|---|---|")
    for v in ORDER:
        if not acc[v]:
            continue
        gain = [100 * (acc[v][s] - units[s]["sft"]["eval"]) for s in acc[v] if units[s].get("sft", {}).get("eval")
                is not None]
        g = {k: [units[s]["runs"][v][k] for s in acc[v] if units[s]["runs"][v][k] is not None] for k in GRAD}
        out.append(f"| {v} | {len(acc[v])} | {_ms(list(acc[v].values()))} | "
                   f"{statistics.mean(gain):+.1f} | {_ms(g[GRAD[0]])} | {_ms(g[GRAD[1]])} | {_ms(g[GRAD[2]])} | "
                   f"{_ms([units[s]['runs'][v]['param_shift'] for s in acc[v] if units[s]['runs'][v]['param_shift'] is not None])} |")
        res[v] = {"final": acc[v], "grad": {k: g[k] for k in GRAD}}
    out.append("\n### Final test accuracy per seed (each variant at its chosen learning rate)\n")
    shown = [v for v in ORDER if acc[v]]
    out.append("| seed | after warm-up | " + " | ".join(f"{v} ({units[seeds[0]]['runs'][v]['lr']:g})" for v in shown)
               + " |")
    out.append("|---|---|" + "---|" * len(shown))
    for s in seeds:
        w = units[s].get("sft", {}).get("eval")
        out.append(f"| {s} | {'-' if w is None else f'{w:.3f}'} | "
                   + " | ".join(f"{acc[v][s]:.3f}" if s in acc[v] else "-" for v in shown) + " |")
    out.append("\n### Paired differences (final test accuracy, points): mean +- sd (W/T/L, n), paired 95% t "
               "interval\n")
    out.append("| comparison | difference | 95% interval |")
    out.append("|---|---|---|")
    res["paired"] = {}
    for a, b in PAIRS:
        txt, d = _paired(acc[a], acc[b])
        if d:
            out.append(f"| {a} - {b} | {txt} |")
            res["paired"][f"{a} - {b}"] = d
    out.append("\n### PGPO weight concentration over RL (mean over update steps, then over seeds)\n")
    out.append("| variant | " + " | ".join(k.split("/")[1] for k in WEIGHT) + " | eff ratio first 5 -> last 5 |")
    out.append("|---|" + "---|" * (len(WEIGHT) + 1))
    for v in ORDER:
        rs = [units[s]["runs"][v] for s in seeds if v in units[s]["runs"]]
        if not rs or rs[0].get("pgpo/eff_token_ratio") is None:
            continue
        cols = [_ms([r[k] for r in rs if r.get(k) is not None]) for k in WEIGHT]
        fl = [(r.get("pgpo/eff_token_ratio/first5"), r.get("pgpo/eff_token_ratio/last5")) for r in rs]
        fl = [x for x in fl if x[0] is not None]
        trend = f"{statistics.mean(x[0] for x in fl):.3f} -> {statistics.mean(x[1] for x in fl):.3f}" if fl else "-"
        out.append(f"| {v} | " + " | ".join(cols) + f" | {trend} |")
    out.append("\n### The warm-up: both kinds of rows (mean of its last 3 batches; eval on the test split)\n")
    out.append("| seed | SFT steps | visual seq acc | text-only seq acc | visual loss | text-only loss | eval |")
    out.append("|---|---|---|---|---|---|---|")
    for s in seeds:
        w = units[s].get("sft")
        if w:
            f = {k: (f"{w[k]:.3f}" if isinstance(w.get(k), float) else "-") for k in
                 ("sft/visual_seq_acc", "sft/text_seq_acc", "sft/visual_loss", "sft/text_loss", "eval")}
            out.append(f"| {s} | {w['steps']} | {f['sft/visual_seq_acc']} | {f['sft/text_seq_acc']} | "
                       f"{f['sft/visual_loss']} | {f['sft/text_loss']} | {f['eval']} |")
    roles = [units[s]["roles"] for s in seeds if "roles" in units[s]]
    base = None
    if dose_summary and os.path.exists(dose_summary):
        with open(dose_summary) as f:
            base = json.load(f)["at_checkpoint"].get("grid-reason-f24", {}).get("roles")
    if roles:
        out.append(f"\n### Token KL and PGPO weight by token role at the warm-up checkpoints ({len(roles)} "
                   "checkpoints, 32 prompts x 4 sampled responses each; P = 0: ../train_reason_dose, 8 checkpoints "
                   "x 64 prompts)\n")
        out.append("| role | token share | KL mean | KL mass share | weight mean | P = 0: KL mean | P = 0: KL mass "
                   "share | P = 0: weight mean |")
        out.append("|---|---|---|---|---|---|---|---|")
        names = sorted({r for t in roles for r in t}, key=lambda r: -statistics.mean(
            t.get(r, {}).get("kl_mass_share", 0.0) for t in roles))
        res["roles"] = {}
        for r in names:
            m = {k: statistics.mean(t[r][k] for t in roles if r in t) for k in
                 ("token_share", "kl_mean", "kl_mass_share", "weight_mean")}
            res["roles"][r] = m
            b = (base or {}).get(r, {})
            bs = [f"{b[k]:.3f}" if k in b else "-" for k in ("kl_mean", "kl_mass_share", "weight_mean")]
            out.append(f"| {r} | {m['token_share']:.3f} | {m['kl_mean']:.3f} | {m['kl_mass_share']:.3f} | "
                       f"{m['weight_mean']:.3f} | " + " | ".join(bs) + " |")
    return "\n".join(out) + "\n", res


def choose_rates(root: str) -> tuple[dict, str]:
    """The validation split's choice: per variant, the learning rate with the best mean final accuracy over the
    selection seeds; and the table it came from."""
    acc = {}
    for run in glob.glob(os.path.join(root, "*f*-p*-s*", "validation", "*-lr*", "metrics.jsonl")):
        name, lr = re.match(r"(.+)-lr(.+)$", os.path.basename(os.path.dirname(run))).groups()
        if not os.path.exists(os.path.join(os.path.dirname(run), "summary.json")):
            continue
        evals = [x["eval/acc"] for x in _lines(run) if x.get("phase") == "rl" and "eval/acc" in x]
        if evals:
            acc.setdefault(name, {}).setdefault(lr, []).append(evals[-1])
    best, rows = {}, ["| variant | " + " | ".join(["lr: mean final validation acc (seeds)"]) + " | chosen |", "|---|---|---|"]
    for name in [v for v in ORDER if v in acc]:
        by = acc[name]
        best[name] = max(by, key=lambda lr: statistics.mean(by[lr]))
        cells = ", ".join(f"{lr}: {statistics.mean(xs):.3f} ({len(xs)})" for lr, xs in sorted(by.items(),
                                                                                            key=lambda t: float(t[0])))
        rows.append(f"| {name} | {cells} | {best[name]} |")
    return best, "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--split", default="test")
    p.add_argument("--choose", action="store_true", help="print variant@lr chosen on the validation split and exit")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "summary.json"))
    a = p.parse_args(argv)
    if a.choose:
        best, md = choose_rates(a.root)
        print(md, file=sys.stderr)
        print(",".join(f"{v}@{lr}" for v, lr in best.items()))
        return 0
    units = collect(a.root, a.split)
    dose = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_reason_dose", "summary.json")
    md, res = tables(units, dose)
    best, lr_md = choose_rates(a.root)
    print("### Learning rates chosen on the validation split (mean final validation accuracy over the selection "
          "seeds)\n\n" + lr_md)
    print(md)
    res["chosen_lr"] = best
    with open(a.json, "w") as f:
        json.dump({"units": units, "tables": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
