"""One (task, seed) of the ablation: the default SFT warm-up once, saved, then every variant's RL from it.

All variants of a seed start RL from the same checkpoint and see the same prompts in the same order (same seed), so
their differences are paired. Each variant is a plain `pgpo_train.recipe.train.train` call, the code `pgpo-train` runs, with
model = the warm-up checkpoint, dataset = the generated task, and the embedded defaults made explicit (prompt
template "tiny", 24 new tokens, lr 1e-4, no further SFT).

python benchmarks/results/train_task_ablation/run_seed.py --task grid-count --seed 0 --out runs/ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.models.tiny import save_tiny_checkpoint
from pgpo_train.recipe.train import train
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig

# variant -> (algo, PGPOWeightsConfig overrides)
VARIANTS = {
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "pgpo": ("pgpo", {}),  # full token KL, tau 0.4, beta 2.0 (the paper's best)
    "pgpo-k3": ("pgpo", {"estimator": "k3"}),
    "pgpo-beta0": ("pgpo", {"beta": 0.0}),  # suppression only: tokens below tau scaled down, none boosted
    "pgpo-tau0": ("pgpo", {"tau": 0.0}),  # boosting only: every token is above the gate
    "pgpo-spread": ("pgpo", {"min_spread": 0.1}),  # the --pgpo.min-spread guard
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="grid-count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--variants", default="grpo,dapo,pgpo,pgpo-k3,pgpo-beta0,pgpo-tau0")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.0, help="RL learning rate; 0 = pgpo-train's embedded default")
    p.add_argument("--sft-stop-acc", type=float, default=-1.0, help="-1 = pgpo-train's default for the task")
    p.add_argument("--min-spread", type=float, default=0.1, help="pgpo-spread's --pgpo.min-spread")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = os.path.join(a.out, f"{a.task}-s{a.seed}")
    sft_dir, ckpt = os.path.join(base, "sft"), os.path.join(base, "sft-model")
    common = {"seed": a.seed, "eval_size": a.eval_size, "tensorboard": False, "progress": False, "overwrite": True}
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        warm = train(
            TrainConfig(task=a.task, steps=0, out_dir=sft_dir, eval_every=1, sft_stop_acc=a.sft_stop_acc, **common)
        )
        save_tiny_checkpoint(ckpt, model=warm["model"], processor=warm["processor"])
        print(
            f"[{a.task} s{a.seed}] sft: {warm['sft_steps']} steps, eval {warm.get('eval/acc')}, "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    data = tiny_dataset_path(seed=0, task=a.task)
    lr = a.lr or TrainConfig(task=a.task, out_dir=base).resolved().lr  # the embedded run's RL learning rate
    for name in a.variants.split(","):
        out = os.path.join(base, name)
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        algo, over = VARIANTS[name]
        if name == "pgpo-spread":
            over = {"min_spread": a.min_spread}
        cfg = TrainConfig(
            model=ckpt,
            dataset=data,
            prompt_template="tiny",
            max_new_tokens=24,
            sft_steps=0,
            lr=lr,
            algo=algo,
            steps=a.rl_steps,
            eval_every=a.eval_every,
            out_dir=out,
            save_every=0,
            keep_checkpoints=1,
            pgpo=dataclasses.replace(PGPOWeightsConfig(), **over),
            **common,
        )
        t0 = time.perf_counter()
        s = train(cfg)
        print(f"[{a.task} s{a.seed}] {name}: eval {s.get('eval/acc')}, {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
