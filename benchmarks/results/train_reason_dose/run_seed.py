"""One (filler, seed) of the grid-reason dose-response benchmark (issue 17): the default SFT warm-up once, saved;
then, at that fixed checkpoint, the token-role KL and the mini-batch gradient variance (grad_at_checkpoint.py); then
every variant's RL from it.

As in ../train_task_ablation/run_seed.py: all variants of a (filler, seed) start RL from the same checkpoint and see
the same prompts in the same order (same seed), so their differences are paired. Each variant is a plain
`pgpo_train.recipe.train.train` call with model = the warm-up checkpoint, dataset = the generated task, and the embedded
defaults made explicit (prompt template "tiny", grid_reason_max_tokens(filler) new tokens, lr 1e-4, no more SFT).

python benchmarks/results/train_reason_dose/run_seed.py --filler 24 --seed 0 --out runs/reason
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grad_at_checkpoint import measure

# variant -> (algo, PGPOWeightsConfig overrides)
VARIANTS = {
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "pgpo": ("pgpo", {}),  # full token KL, tau 0.4, beta 2.0 (the paper's best)
    "pgpo-shuffled": ("pgpo", {"control": "shuffled"}),
    "pgpo-inverted": ("pgpo", {"control": "inverted"}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--filler", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/reason")
    p.add_argument("--variants", default="dapo,pgpo,pgpo-shuffled,pgpo-inverted")
    p.add_argument("--rl-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=-1, help="warm-up cap; -1 = pgpo-train's default (smoke tests)")
    p.add_argument("--draws", type=int, default=24, help="gradient-variance mini-batches (0: skip)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    task = f"grid-reason-f{a.filler}"
    base = os.path.join(a.out, f"{task}-s{a.seed}")
    sft_dir, ckpt = os.path.join(base, "sft"), os.path.join(base, "sft-model")
    common = {"seed": a.seed, "eval_size": a.eval_size, "tensorboard": False, "progress": False, "overwrite": True}
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        warm = train(
            TrainConfig(
                task="grid-reason",
                task_filler=a.filler,
                steps=0,
                out_dir=sft_dir,
                eval_every=1,
                sft_steps=a.sft_steps,
                **common,
            )
        )
        save_tiny_checkpoint(ckpt, model=warm["model"], processor=warm["processor"])
        print(
            f"[{task} s{a.seed}] sft: {warm['sft_steps']} steps, eval {warm.get('eval/acc')}, "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    data = tiny_dataset_path(seed=0, task="grid-reason", filler=a.filler)
    max_new = grid_reason_max_tokens(a.filler)
    at_ckpt = os.path.join(base, "at_checkpoint.json")
    if a.draws and not os.path.exists(at_ckpt):
        t0 = time.perf_counter()
        res = measure(ckpt, data, max_new, a.seed, a.filler, draws=a.draws)
        with open(at_ckpt, "w") as f:
            json.dump(res, f)
        print(f"[{task} s{a.seed}] at checkpoint: {time.perf_counter() - t0:.0f}s", flush=True)
    for name in a.variants.split(","):
        out = os.path.join(base, name)
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        algo, over = VARIANTS[name]
        cfg = TrainConfig(
            model=ckpt,
            dataset=data,
            prompt_template="tiny",
            max_new_tokens=max_new,
            sft_steps=0,
            lr=1e-4,  # the embedded run's RL learning rate
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
        print(f"[{task} s{a.seed}] {name}: eval {s.get('eval/acc')}, {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
