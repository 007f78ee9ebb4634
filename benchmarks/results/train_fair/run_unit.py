"""One unit of the fair PGPO comparison (issue 28): a grid-reason warm-up for (filler, seed, text-only share), the
token-role table at that checkpoint, then RL from it for each requested (variant, learning rate), evaluated on one
split ("validation" picks the rates, "test" reports).

Every RL run of a unit starts from the same checkpoint and sees the same prompts in the same order, so differences
between variants are paired by seed. Each run is a plain `pgpo_train.train.train` call. The evaluation splits:
"test" is the embedded task's test split (data seed 0); "validation" is the test split of the same task generated
with data seed 1 (a disjoint draw), so the rates are never chosen on the reported split.

  python benchmarks/results/train_fair/run_unit.py --seed 0 --split test --runs dapo@1e-4,pgpo@3e-4
  python benchmarks/results/train_fair/run_unit.py --seed 100 --split validation --runs pgpo@3e-5,pgpo@1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.tasks import grid_reason_max_tokens
from pgpo_train.models.tiny import save_tiny_checkpoint
from pgpo_train.recipe.train import train
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "train_reason_dose"))
from grad_at_checkpoint import measure  # noqa: E402  (the role table: KL and weight per token role)

# variant -> (algo, PGPOWeightsConfig overrides, gradient clip)
VARIANTS = {
    "dapo": ("dapo", {}, 1.0),
    "pgpo": ("pgpo", {}, 1.0),  # the paper's formula: full token KL, tau 0.4, beta 2
    "pgpo-shuffled": ("pgpo", {"control": "shuffled"}, 1.0),
    "pgpo-dev": ("pgpo", {"preset": "dev-easyr1"}, 1.0),  # the authors' development variant (second-hand)
    "dapo-noclip": ("dapo", {}, 0.0),
    "pgpo-noclip": ("pgpo", {}, 0.0),
}


def split_dataset(filler: int, cache: str) -> str:
    """A dataset folder with train / test (data seed 0, the embedded task's) and validation (data seed 1's test)."""
    out = os.path.join(cache, f"grid-reason-f{filler}-fair")
    if not os.path.exists(os.path.join(out, "validation.parquet")):
        os.makedirs(out, exist_ok=True)
        d0 = tiny_dataset_path(seed=0, task="grid-reason", filler=filler)
        d1 = tiny_dataset_path(seed=1, task="grid-reason", filler=filler)
        for name, src in (("train", d0), ("test", d0), ("validation", d1)):
            path = os.path.join(out, f"{name}.parquet")
            if not os.path.exists(path):
                os.symlink(os.path.join(src, f"{'test' if name == 'validation' else name}.parquet"), path)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--filler", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-prob", type=float, default=0.3, help="--sft-text-only-prob of the warm-up")
    p.add_argument("--out", default="runs/fair")
    p.add_argument("--split", choices=["validation", "test"], default="test")
    p.add_argument("--runs", default="dapo@1e-4,pgpo@1e-4", help="comma list of variant@lr")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--sft-steps", type=int, default=-1, help="warm-up cap; -1 = pgpo-train's default (smoke tests)")
    p.add_argument("--roles", type=int, default=64, help="prompts for the role table at the checkpoint (0: skip)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = [r.split("@") for r in a.runs.split(",") if r]
    for r in runs:
        if len(r) != 2 or r[0] not in VARIANTS:
            raise SystemExit(f"--runs: each entry is variant@lr with variant in {sorted(VARIANTS)}, got {'@'.join(r)}")
    base = os.path.join(a.out, f"f{a.filler}-p{a.text_prob:g}-s{a.seed}")
    ckpt = os.path.join(base, "sft-model")
    common = {"seed": a.seed, "tensorboard": False, "progress": False, "overwrite": True}
    tag = f"[f{a.filler} p{a.text_prob:g} s{a.seed}]"
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        warm = train(TrainConfig(task="grid-reason", task_filler=a.filler, steps=0, out_dir=os.path.join(base, "sft"),
                                 eval_every=1, eval_size=a.eval_size, sft_steps=None if a.sft_steps < 0 else a.sft_steps,
                                 sft_text_only_prob=a.text_prob, **common))
        save_tiny_checkpoint(ckpt, model=warm["model"], processor=warm["processor"])
        print(f"{tag} sft: {warm['sft_steps']} steps, test eval {warm.get('eval/acc')}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    data = split_dataset(a.filler, os.path.join(a.out, "data"))
    max_new = grid_reason_max_tokens(a.filler)
    roles = os.path.join(base, "roles.json")
    if a.roles and not os.path.exists(roles):
        t0 = time.perf_counter()
        res = measure(ckpt, tiny_dataset_path(seed=0, task="grid-reason", filler=a.filler), max_new, a.seed,
                      a.filler, pool=a.roles, draws=0)
        with open(roles, "w") as f:
            json.dump(res, f)
        print(f"{tag} role table: {time.perf_counter() - t0:.0f}s", flush=True)
    for name, lr in runs:
        out = os.path.join(base, a.split, f"{name}-lr{lr}")
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        algo, over, clip = VARIANTS[name]
        cfg = TrainConfig(model=ckpt, dataset=data, eval_split=a.split, prompt_template="tiny", max_new_tokens=max_new,
                          sft_steps=0, lr=float(lr), grad_clip=clip, algo=algo, steps=a.rl_steps,
                          eval_every=a.eval_every, eval_size=a.eval_size, out_dir=out, save_every=0,
                          keep_checkpoints=1, pgpo=dataclasses.replace(PGPOWeightsConfig(), **over), **common)
        t0 = time.perf_counter()
        s = train(cfg)
        print(f"{tag} {a.split} {name}@{lr}: eval {s.get('eval/acc')}, {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
