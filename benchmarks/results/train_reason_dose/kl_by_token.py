"""Where the token KL sits, token by token: at one warm-up checkpoint, mean KL(vis || text-only) and mean PGPO
weight per token string of the sampled responses, and per response position (the structural tokens sit at fixed
positions for a given filler setting). Diagnoses grad_at_checkpoint.py's role table.

python benchmarks/results/train_reason_dose/kl_by_token.py runs/reason/grid-reason-f24-s0/sft-model --filler 24
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.tasks import grid_reason_max_tokens
from pgpo_train.recipe.train import load_policy
from pgpo_train.recipe.train import old_logp_and_scores
from pgpo_train.recipe.train import pgpo_weights
from pgpo_train.recipe.train import rollout
from pgpo_train.recipe.train import seed_everything
from pgpo_train.rl import core_algos
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--filler", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=32)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(a.seed)
    cfg = TrainConfig(model=a.model, dataset=tiny_dataset_path(task="grid-reason", filler=a.filler),
                      prompt_template="tiny", max_new_tokens=grid_reason_max_tokens(a.filler), sft_steps=0, lr=1e-4,
                      algo="pgpo", seed=a.seed, out_dir="/tmp/unused", pgpo=PGPOWeightsConfig()).resolved()  # fmt: skip
    dev = torch.device("cpu")
    model, processor = load_policy(cfg, dev)
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(cfg.dataset, "train", cols)
    records = RecordStream(ds, cols, Sampler(len(ds), a.seed + 777)).next_batch(a.pool)
    batch, _ = rollout(model, processor, records, cfg, dev, {})
    batch.pop("texts")
    batch["advantages"], _ = core_algos.get_adv_estimator_fn("grpo")(batch["rewards"], cfg.group_size)
    batch.update(old_logp_and_scores(model, batch, cfg, {}))
    w = pgpo_weights(batch["scores"], batch["response_mask"], cfg)
    m = batch["response_mask"].bool()
    by_tok, by_pos = collections.defaultdict(list), collections.defaultdict(list)
    for i in range(m.shape[0]):
        toks = processor.tokenizer.convert_ids_to_tokens(batch["responses"][i][m[i]].tolist())
        for j, (t, k, x, e) in enumerate(zip(toks, batch["scores"][i][m[i]].tolist(), w[i][m[i]].tolist(),
                                             batch["entropy"][i][m[i]].tolist())):  # fmt: skip
            by_tok[t].append((k, x, e))
            by_pos[j].append((t, k, x))
    total = sum(k for v in by_tok.values() for k, _, _ in v)
    rows = sorted(((t, len(v), sum(k for k, _, _ in v)) for t, v in by_tok.items()), key=lambda r: -r[2])
    out = {"tokens": [{"token": t, "n": n, "kl_mean": s / n, "kl_mass_share": s / total,
                       "weight_mean": sum(x for _, x, _ in by_tok[t]) / n,
                       "entropy_mean": sum(e for _, _, e in by_tok[t]) / n} for t, n, s in rows[:25]],
           "positions": [{"pos": j, "top_token": collections.Counter(t for t, _, _ in v).most_common(1)[0][0],
                          "kl_mean": sum(k for _, k, _ in v) / len(v), "weight_mean": sum(x for _, _, x in v) / len(v)}
                         for j, v in sorted(by_pos.items())]}  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
