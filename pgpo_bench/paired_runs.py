"""Paired RL runs of one (task, seed): the SFT warm-up once, saved, then every variant's RL from that checkpoint.

All variants of a (task, seed) start RL from the same checkpoint and see the same prompts in the same order (same
seed), so their differences are paired. Each variant is a plain `pgpo_train.recipe.train.train` call (the code
`pgpo-train` runs) with model = the warm-up checkpoint, dataset = the generated task, and the embedded defaults made
explicit (prompt template "tiny", the task's new-token budget, no further SFT). The result studies under
benchmarks/results/ (train_task_ablation, train_reason_dose) ran their seeds through this one script:

    python -m pgpo_bench.paired_runs --task grid-count --seed 0 --out runs/ablation \
        --variants grpo,dapo,pgpo,pgpo-k3,pgpo-beta0,pgpo-tau0 --rl-steps 60 --eval-every 10 --eval-size 256
    python -m pgpo_bench.paired_runs --task grid-reason --filler 24 --seed 0 --out runs/reason \
        --variants dapo,pgpo,pgpo-shuffled,pgpo-inverted --rl-steps 20 --eval-every 5 --eval-size 128 --lr 1e-4

A finished variant (its summary.json exists) is skipped, so an interrupted seed continues where it stopped.

The fair comparison (benchmarks/results/train_fair/) adds: --text-prob P (the warm-up's --sft-text-only-prob; the
seed's folder gets -p<P>), variants given as variant@lr (one learning rate each, written to <split>/<variant>-lr<lr>),
--eval-split validation (a disjoint draw: the same task generated with data seed 1, its test split), the dev-easyr1
preset and the clip-off references, and --roles N (the token-role table at the checkpoint):

    python -m pgpo_bench.paired_runs --task grid-reason --filler 24 --text-prob 0.3 --seed 0 --out runs/fair \
        --variants dapo@1e-4,pgpo@1e-4,pgpo-dev@1e-4 --eval-split test --rl-steps 60 --eval-every 60 --roles 32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

# variant -> (algo, PGPOWeightsConfig overrides)
VARIANTS = {
    "grpo": ("grpo", {}),
    "dapo": ("dapo", {}),
    "pgpo": ("pgpo", {}),  # full token KL, tau 0.4, beta 2.0 (the paper's best)
    "pgpo-k3": ("pgpo", {"estimator": "k3"}),
    "pgpo-beta0": ("pgpo", {"beta": 0.0}),  # suppression only: tokens below tau scaled down, none boosted
    "pgpo-tau0": ("pgpo", {"tau": 0.0}),  # boosting only: every token is above the gate
    "pgpo-spread": ("pgpo", {"min_spread": 0.1}),  # the --pgpo.min-spread guard (--min-spread sets it)
    "pgpo-shuffled": ("pgpo", {"control": "shuffled"}),
    "pgpo-inverted": ("pgpo", {"control": "inverted"}),
    "pgpo-dev": ("pgpo", {"preset": "dev-easyr1"}),  # the authors' development variant (second-hand)
    "dapo-noclip": ("dapo", {}),
    "pgpo-noclip": ("pgpo", {}),
}
# variant -> TrainConfig overrides beside the PGPO options
RUN_OVERRIDES = {"dapo-noclip": {"grad_clip": 0.0}, "pgpo-noclip": {"grad_clip": 0.0}}


def seed_dir(out: str, task: str, filler: int | None, seed: int, text_prob: float = 0.0) -> str:
    """Where one (task, seed) writes: OUT/<task>[-f<filler>][-p<text prob>]-s<seed>/{sft, sft-model, <variant>...}."""
    name = f"{task}-f{filler}" if task == "grid-reason" else task
    if text_prob > 0:
        name += f"-p{text_prob:g}"
    return os.path.join(out, f"{name}-s{seed}")


def eval_dataset(task: str, filler: int | None, cache: str) -> str:
    """The task with a third split: train / test (data seed 0, the embedded task's) and validation (data seed 1's
    test split, a disjoint draw), so learning rates are never chosen on the reported split."""
    from pgpo_train.data.loading import tiny_dataset_path

    name = f"{task}-f{filler}" if task == "grid-reason" else task
    out = os.path.join(cache, f"{name}-with-validation")
    if not os.path.exists(os.path.join(out, "validation.parquet")):
        os.makedirs(out, exist_ok=True)
        d0 = tiny_dataset_path(seed=0, task=task, filler=filler)
        d1 = tiny_dataset_path(seed=1, task=task, filler=filler)
        for split, src in (("train", d0), ("test", d0), ("validation", d1)):
            path = os.path.join(out, f"{split}.parquet")
            if not os.path.exists(path):
                os.symlink(os.path.join(src, f"{'test' if split == 'validation' else split}.parquet"), path)
    return out


def warm_up(task: str, filler: int | None, seed: int, base: str, eval_size: int, sft_steps: int | None = None,
            sft_stop_acc: float | None = None, text_prob: float = 0.0) -> str:
    """The default SFT warm-up of `pgpo-train --task T --seed S`, saved once as a model folder; returns its path."""
    from pgpo_train.models.tiny import save_tiny_checkpoint
    from pgpo_train.recipe.train import train
    from pgpo_train.run.config import TrainConfig

    sft_dir, ckpt = os.path.join(base, "sft"), os.path.join(base, "sft-model")
    if os.path.exists(os.path.join(ckpt, "config.json")):
        return ckpt
    t0 = time.perf_counter()
    warm = train(TrainConfig(task=task, task_filler=filler, steps=0, out_dir=sft_dir, eval_every=1,
                             sft_steps=sft_steps, sft_stop_acc=sft_stop_acc, seed=seed, eval_size=eval_size,
                             sft_text_only_prob=text_prob,
                             tensorboard=False, progress=False, overwrite=True))
    save_tiny_checkpoint(ckpt, model=warm["model"], processor=warm["processor"])
    print(f"[{os.path.basename(base)}] sft: {warm['sft_steps']} steps, eval {warm.get('eval/acc')}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return ckpt


def run_variants(ckpt: str, task: str, filler: int | None, seed: int, base: str, variants: list[str], *,
                 rl_steps: int, eval_every: int, eval_size: int, lr: float | None = None,
                 min_spread: float = 0.1, eval_split: str = "test") -> None:
    """Every variant's RL from the warm-up checkpoint `ckpt`, paired (same seed, same prompts). A variant given as
    variant@lr runs at that rate and writes to <eval_split>/<variant>-lr<lr>."""
    from pgpo_train.data.loading import tiny_dataset_path
    from pgpo_train.recipe.train import train
    from pgpo_train.run.config import PGPOWeightsConfig
    from pgpo_train.run.config import TrainConfig

    embedded = TrainConfig(task=task, task_filler=filler, out_dir=base).resolved()  # the embedded run's settings
    data = tiny_dataset_path(seed=0, task=task, filler=filler)
    if eval_split != "test":
        data = eval_dataset(task, filler, os.path.join(os.path.dirname(base), "data"))
    for spec in variants:
        name, _, rate = spec.partition("@")
        out = os.path.join(base, eval_split, f"{name}-lr{rate}") if rate else os.path.join(base, name)
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        algo, over = VARIANTS[name]
        if name == "pgpo-spread":
            over = {"min_spread": min_spread}
        cfg = TrainConfig(model=ckpt, dataset=data, prompt_template="tiny", max_new_tokens=embedded.max_new_tokens,
                          sft_steps=0, lr=float(rate) if rate else lr or embedded.lr, algo=algo, steps=rl_steps,
                          eval_every=eval_every, eval_split=eval_split, **RUN_OVERRIDES.get(name, {}),
                          out_dir=out, save_every=0, keep_checkpoints=1,
                          pgpo=dataclasses.replace(PGPOWeightsConfig(), **over), seed=seed, eval_size=eval_size,
                          tensorboard=False, progress=False, overwrite=True)
        t0 = time.perf_counter()
        s = train(cfg)
        print(f"[{os.path.basename(base)}] {spec}: eval {s.get('eval/acc')}, {time.perf_counter() - t0:.0f}s",
              flush=True)


def role_table(ckpt: str, task: str, filler: int | None, seed: int, base: str, prompts: int) -> None:
    """The token KL and PGPO weight by token role at the checkpoint (benchmarks/results/train_reason_dose/
    grad_at_checkpoint.py's table, no gradient draws), written to roles.json."""
    import importlib.util
    import json

    from pgpo_train.data.loading import tiny_dataset_path
    from pgpo_train.run.config import TrainConfig

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "train_reason_dose", "grad_at_checkpoint.py")
    spec = importlib.util.spec_from_file_location("grad_at_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    max_new = TrainConfig(task=task, task_filler=filler, out_dir=base).resolved().max_new_tokens
    t0 = time.perf_counter()
    res = mod.measure(ckpt, tiny_dataset_path(seed=0, task=task, filler=filler), max_new, seed, filler,
                      pool=prompts, draws=0)
    with open(os.path.join(base, "roles.json"), "w") as f:
        json.dump(res, f)
    print(f"[{os.path.basename(base)}] role table: {time.perf_counter() - t0:.0f}s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgpo_bench.paired_runs", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="grid-count", choices=["grid-count", "grid-reason", "count-copy", "pair-count"])
    p.add_argument("--filler", type=int, default=None, help="grid-reason's filler words (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="dapo,pgpo", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="RL learning rate (default: the embedded run's)")
    p.add_argument("--sft-steps", type=int, default=None, help="warm-up cap (default: the task's)")
    p.add_argument("--sft-stop-acc", type=float, default=None, help="(default: the task's)")
    p.add_argument("--min-spread", type=float, default=0.1, help="pgpo-spread's --pgpo.min-spread")
    p.add_argument("--text-prob", type=float, default=0.0, help="the warm-up's --sft-text-only-prob")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"],
                   help="validation: data seed 1's test split (choosing learning rates); test: the reported one")
    p.add_argument("--roles", type=int, default=0,
                   help="prompts for the token-role table at the checkpoint (roles.json; 0: none)")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v.partition("@")[0] not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    import torch

    torch.set_num_threads(1)
    from pgpo_train.data.tasks import task_filler

    filler = task_filler(a.task, a.filler)
    base = seed_dir(a.out, a.task, filler, a.seed, a.text_prob)
    ckpt = warm_up(a.task, a.filler, a.seed, base, a.eval_size, a.sft_steps, a.sft_stop_acc, a.text_prob)
    if a.roles and not os.path.exists(os.path.join(base, "roles.json")):
        role_table(ckpt, a.task, filler, a.seed, base, a.roles)
    run_variants(ckpt, a.task, a.filler, a.seed, base, variants, rl_steps=a.rl_steps, eval_every=a.eval_every,
                 eval_size=a.eval_size, lr=a.lr, min_spread=a.min_spread, eval_split=a.eval_split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
