"""The paper's variance claim, measured: at a fixed checkpoint, how much does the policy-gradient estimate vary
across resampled mini-batches, DAPO (uniform token weights) vs PGPO (perception-grounded weights)?

For one warm-up checkpoint (run_seed.py's sft-model): roll out a pool of prompts x G responses once with the run's
sampling, keep the groups with unequal rewards (dynamic sampling), compute old log-probs and token KLs with the
training step's own code (train.old_logp_and_scores), then draw K mini-batches of M groups (with replacement) and
compute the gradient of the step's loss (train's clipped token-mean loss at ratio 1, i.e. the policy gradient) for
each, with DAPO's and with PGPO's token advantages on the same mini-batches. Reported per estimator:
  total variance  tr Cov = mean_k ||g_k - g_mean||^2,  the squared norm of the mean gradient,
  and their ratio (the relative variance, scale-free: PGPO's weights also change the gradient's size).

python benchmarks/results/train_task_ablation/grad_variance.py runs/ablation/grid-count-s0/sft-model --task grid-count
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.models.policy import load_policy
from pgpo_train.models.policy import logp_entropy
from pgpo_train.models.policy import response_logits
from pgpo_train.models.policy import seed_everything
from pgpo_train.rl import core_algos
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.batching import select_rows
from pgpo_train.step.batching import visual_kwargs
from pgpo_train.step.sampling import rollout
from pgpo_train.step.scoring import old_logp_and_scores
from pgpo_train.step.scoring import token_weights


def flat_grad(model, batch, tok_adv, cfg) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    T = batch["responses"].shape[1]
    logits = response_logits(model, visual_kwargs(model, batch), T, cfg.temperature)
    logp, _ = logp_entropy(logits, batch["responses"], with_entropy=False)
    loss, _ = core_algos.get_policy_loss_fn("vanilla")(
        batch["old_logp"],
        logp,
        tok_adv,
        batch["response_mask"],
        clip_ratio_low=cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        loss_agg_mode=cfg.loss_agg_mode,
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def stats(grads: torch.Tensor) -> dict:
    mean = grads.mean(0)
    var = float(((grads - mean) ** 2).sum(-1).mean())
    sq = float((mean**2).sum())
    return {
        "total_var": var,
        "mean_grad_sq_norm": sq,
        "rel_var": var / sq,
        "mean_grad_norm_per_batch": float(grads.norm(dim=-1).mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--task", default="grid-count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=64, help="prompts rolled out once")
    p.add_argument("--groups", type=int, default=8, help="groups per mini-batch (prompts_per_step)")
    p.add_argument("--draws", type=int, default=32, help="resampled mini-batches")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(a.seed)
    cfg = TrainConfig(
        model=a.model,
        dataset=tiny_dataset_path(task=a.task),
        prompt_template="tiny",
        max_new_tokens=24,
        sft_steps=0,
        lr=1e-4,
        algo="pgpo",
        seed=a.seed,
        out_dir="/tmp/unused",
        pgpo=PGPOWeightsConfig(),
    ).resolved()
    dev = torch.device("cpu")
    model, processor = load_policy(cfg, dev)
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(cfg.dataset, "train", cols)
    records = RecordStream(ds, cols, Sampler(len(ds), a.seed + 777)).next_batch(a.pool)
    batch, m = rollout(model, processor, records, cfg, dev, {})
    batch.pop("texts")
    G = cfg.group_size
    batch["advantages"], _ = core_algos.get_adv_estimator_fn("grpo")(batch["rewards"], G)
    keep = core_algos.dynamic_sampling_keep(batch["rewards"], G)
    batch = select_rows(model, batch, keep.nonzero().squeeze(-1))
    batch.update(old_logp_and_scores(model, batch, cfg, {}))
    n_groups = batch["responses"].shape[0] // G
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None] * mask.float()
    w_full = token_weights(batch["scores"], mask, cfg)
    variants = {"dapo": adv, "pgpo": batch["advantages"][:, None] * w_full}
    spread_cfg = dataclasses.replace(cfg, pgpo=dataclasses.replace(cfg.pgpo, min_spread=0.1))
    variants["pgpo-spread0.1"] = batch["advantages"][:, None] * token_weights(batch["scores"], mask, spread_cfg)
    gen = torch.Generator().manual_seed(a.seed)
    grads = {k: [] for k in variants}
    model.train()
    for _ in range(a.draws):
        g = torch.randint(n_groups, (a.groups,), generator=gen)
        idx = (g[:, None] * G + torch.arange(G)).flatten()
        mb = select_rows(model, batch, idx)
        for k, tok_adv in variants.items():
            grads[k].append(flat_grad(model, mb, tok_adv[idx], cfg))
    res = {
        "checkpoint": a.model,
        "task": a.task,
        "seed": a.seed,
        "pool_prompts": a.pool,
        "kept_groups": n_groups,
        "groups_per_batch": a.groups,
        "draws": a.draws,
        "rollout_acc": m["reward/acc"],
    }
    for k, gs in grads.items():
        res[k] = stats(torch.stack(gs))
    # how spread the visual dependency is per sequence: what --pgpo.min-spread would flag as flat
    ls = torch.log1p(batch["scores"].float())
    m = mask.bool()
    spread = ls.masked_fill(~m, float("-inf")).amax(-1) - ls.masked_fill(~m, float("inf")).amin(-1)  # [B]
    q = torch.quantile(spread[torch.isfinite(spread)], torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    res["log1p_kl_spread_quantiles_10_25_50_75_90"] = [round(float(x), 4) for x in q]
    res["flat_frac"] = {
        str(t): float((core_algos.flat_sequences(batch["scores"], mask, t)).float().mean()) for t in (0.01, 0.05, 0.1, 0.2, 0.5)
    }
    res["rel_var_ratio_pgpo_over_dapo"] = res["pgpo"]["rel_var"] / res["dapo"]["rel_var"]
    res["total_var_ratio_pgpo_over_dapo"] = res["pgpo"]["total_var"] / res["dapo"]["total_var"]
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
