"""At one fixed warm-up checkpoint of grid-reason: where the token KL falls by token role, and the mini-batch
policy-gradient relative variance with DAPO's, PGPO's and the two controls' token advantages.

One pool of prompts x G responses is rolled out once with the run's sampling; old log-probs and token KLs come from
the training step's own code (train.old_logp_and_scores) and the weights from train.pgpo_weights, as in
../train_task_ablation/grad_variance.py, whose gradient and statistics functions are reused: K mini-batches of M
kept groups (with replacement, the same draws for every estimator), tr Cov / ||mean||^2 per estimator.

Token roles (from the token strings of each valid response token): filler (a FILLER_WORDS token), row_count (a digit
after ':'), row_label (a digit before ':'), total_expr (the c1+c2+c3 digits and '+'), total (the digit after '='),
boxed (the digit after '{'), other (think tags, punctuation, '\\boxed', braces, eos).

python benchmarks/results/train_reason_dose/grad_at_checkpoint.py runs/reason/grid-reason-f24-s0/sft-model --filler 24
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

import torch

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.tasks import FILLER_WORDS
from pgpo_train.data.tasks import grid_reason_max_tokens
from pgpo_train.models.policy import load_policy
from pgpo_train.models.policy import seed_everything
from pgpo_train.rl import core_algos
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.batching import select_rows
from pgpo_train.step.sampling import rollout
from pgpo_train.step.scoring import old_logp_and_scores
from pgpo_train.step.scoring import token_weights

_GV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_task_ablation", "grad_variance.py")
_spec = importlib.util.spec_from_file_location("ablation_grad_variance", _GV)
gv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gv)

ROLES = ("filler", "row_count", "row_label", "total_expr", "total", "boxed", "other")


def roles_of(tokens: list[str]) -> list[str]:
    filler = {"\u0120" + w for w in FILLER_WORDS}
    out = []
    for j, t in enumerate(tokens):
        prev = tokens[j - 1] if j else ""
        nxt = tokens[j + 1] if j + 1 < len(tokens) else ""
        if t in filler:
            out.append("filler")
        elif t.lstrip("\u0120").isdigit():
            if prev == ":":
                out.append("row_count")
            elif nxt == ":":
                out.append("row_label")
            elif prev == "=":
                out.append("total")
            elif prev == "{":
                out.append("boxed")
            else:
                out.append("total_expr")
        elif t == "+":
            out.append("total_expr")
        else:
            out.append("other")
    return out


def role_table(batch: dict, weights: torch.Tensor, tokenizer) -> dict:
    """Per role: share of tokens, mean KL, share of the (finite) KL mass, mean weight, share of the weight mass."""
    m = batch["response_mask"].bool()
    acc = {r: {"n": 0, "kl": 0.0, "w": 0.0} for r in ROLES}
    for i in range(m.shape[0]):
        ids = batch["responses"][i][m[i]].tolist()
        kl = batch["scores"][i][m[i]].tolist()
        w = weights[i][m[i]].tolist()
        for r, k, x in zip(roles_of(tokenizer.convert_ids_to_tokens(ids)), kl, w):
            acc[r]["n"] += 1
            acc[r]["kl"] += k if k != float("inf") else 0.0
            acc[r]["w"] += x
    n = sum(a["n"] for a in acc.values())
    kl = sum(a["kl"] for a in acc.values())
    w = sum(a["w"] for a in acc.values())
    return {
        r: {
            "token_share": a["n"] / n,
            "kl_mean": a["kl"] / max(a["n"], 1),
            "kl_mass_share": a["kl"] / kl if kl else 0.0,
            "weight_mean": a["w"] / max(a["n"], 1),
            "weight_mass_share": a["w"] / w if w else 0.0,
        }
        for r, a in acc.items()
        if a["n"]
    }


def measure(ckpt: str, data: str, max_new: int, seed: int, filler: int, pool: int = 64, groups: int = 8,
            draws: int = 24) -> dict:  # fmt: skip
    seed_everything(seed)
    cfg = TrainConfig(
        model=ckpt,
        dataset=data,
        prompt_template="tiny",
        max_new_tokens=max_new,
        sft_steps=0,
        lr=1e-4,
        algo="pgpo",
        seed=seed,
        out_dir="/tmp/unused",
        pgpo=PGPOWeightsConfig(),
    ).resolved()
    dev = torch.device("cpu")
    model, processor = load_policy(cfg, dev)
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(cfg.dataset, "train", cols)
    records = RecordStream(ds, cols, Sampler(len(ds), seed + 777)).next_batch(pool)
    batch, m = rollout(model, processor, records, cfg, dev, {})
    batch.pop("texts")
    G = cfg.group_size
    batch["advantages"], _ = core_algos.get_adv_estimator_fn("grpo")(batch["rewards"], G)
    batch.update(old_logp_and_scores(model, batch, cfg, {}))
    roles = role_table(batch, token_weights(batch["scores"], batch["response_mask"], cfg), processor.tokenizer)
    keep = core_algos.dynamic_sampling_keep(batch["rewards"], G)
    batch = select_rows(model, batch, keep.nonzero().squeeze(-1))  # old_logp and scores come along
    n_groups = batch["responses"].shape[0] // G
    mask = batch["response_mask"]
    A = batch["advantages"][:, None]
    variants = {"dapo": A * mask.float()}
    for name, control in (("pgpo", "none"), ("pgpo-shuffled", "shuffled"), ("pgpo-inverted", "inverted")):
        c = dataclasses.replace(cfg, pgpo=dataclasses.replace(cfg.pgpo, control=control))
        variants[name] = A * token_weights(batch["scores"], mask, c, step=0)
    res = {"checkpoint": ckpt, "filler": filler, "seed": seed, "pool_prompts": pool, "kept_groups": n_groups,
           "groups_per_batch": groups, "draws": draws, "rollout_acc": m["reward/acc"], "roles": roles}  # fmt: skip
    if n_groups == 0 or not draws:
        return res
    gen = torch.Generator().manual_seed(seed)
    grads = {k: [] for k in variants}
    model.train()
    for _ in range(draws):
        g = torch.randint(n_groups, (groups,), generator=gen)
        idx = (g[:, None] * G + torch.arange(G)).flatten()
        mb = select_rows(model, batch, idx)
        for k, tok_adv in variants.items():
            grads[k].append(gv.flat_grad(model, mb, tok_adv[idx], cfg))
    for k, gs in grads.items():
        res[k] = gv.stats(torch.stack(gs))
    for k in variants:
        if k != "dapo":
            res[f"rel_var_ratio_{k}_over_dapo"] = res[k]["rel_var"] / res["dapo"]["rel_var"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--filler", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=24)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = tiny_dataset_path(task="grid-reason", filler=a.filler)
    print(json.dumps(measure(a.model, data, grid_reason_max_tokens(a.filler), a.seed, a.filler, draws=a.draws)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
