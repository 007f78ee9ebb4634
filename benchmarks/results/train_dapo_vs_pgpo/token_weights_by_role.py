"""Mean PGPO weight and token KL of the count tokens (inside <think>) vs the boxed answer token, on 64 held-out
prompts, with a trained run's final checkpoint (sampled responses, as in training).

Usage: python benchmarks/results/train_dapo_vs_pgpo/token_weights_by_role.py runs/bench-pgpo-s0
"""

import json
import os
import statistics
import sys

import torch

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.models.policy import load_policy
from pgpo_train.recipe.inspect_run import token_dependency
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.config import config_from_dict


def main(run_dir: str, n: int = 64) -> dict:
    torch.manual_seed(0)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = config_from_dict(json.load(f)).resolved()
    cfg.algo = "pgpo"
    model, processor = load_policy(cfg, torch.device("cpu"))
    state = torch.load(
        os.path.join(latest_checkpoint(os.path.join(run_dir, "checkpoints")), "state.pt"), weights_only=False
    )
    model.load_state_dict(state["model"])
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(tiny_dataset_path(), "test", cols, n)
    records = RecordStream(ds, cols, Sampler(len(ds), 0)).next_batch(len(ds))
    boxed_w, boxed_kl, count_w, count_kl = [], [], [], []
    for rec in records:
        dep = token_dependency(model, processor, rec, cfg, greedy=False)
        toks = dep["tokens"]
        if "{" not in toks or "</think>" not in toks or toks.index("{") + 1 >= len(toks):
            continue
        i = toks.index("{") + 1  # the boxed answer
        boxed_w.append(dep["weights"][i])
        boxed_kl.append(dep["kl"][i])
        for j in range(toks.index("</think>")):
            if toks[j].strip().isdigit():  # the per-colour counts
                count_w.append(dep["weights"][j])
                count_kl.append(dep["kl"][j])
    out = {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "responses": len(boxed_w),
        "boxed_answer_weight_mean": statistics.fmean(boxed_w),
        "boxed_answer_kl_mean": statistics.fmean(boxed_kl),
        "count_token_weight_mean": statistics.fmean(count_w),
        "count_token_kl_mean": statistics.fmean(count_kl),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-pgpo-s0")
