"""k3 vs the full-vocab KL on the same tokens of the embedded default (tiny Qwen2.5-VL + synthetic count task).

PGPO's appendix estimates the visual dependency from the sampled token only (k3: r = pi_txt(x)/pi_vis(x),
S = r - 1 - log r); pgpo_kernels computes the exact KL over the vocabulary at the same cost. This script measures how
far apart the two are where it matters, on real rollouts of the default run's policy:

1. build the embedded default policy (pgpo_train.models.policy.load_policy with TrainConfig() defaults: random tiny model),
   optionally run the default SFT warm-up (sft_steps, sft_batch_size, sft_lr of TrainConfig) on the generated task;
2. roll out G responses per prompt with the default sampling (pgpo_train.step.sampling.rollout);
3. score those responses with the training step's own old-log-prob phase (pgpo_train.step.scoring.old_logp_and_scores:
   visual and text-only passes, then pgpo_kernels.token_stats), once per estimator, so every valid response token
   gets both the full KL and k3;
4. report mean and spread of both, of their difference, their correlation (Pearson, Spearman), and what the
   difference does to PGPO's weights (the reshape of docs/method.md#reshape with the paper's tau, beta);
5. check that generate() sampled from the very distribution the scoring pass computes (k3 is unbiased only then).

Run: python -m pgpo_bench.k3_variance --sft-steps 0 150 --seeds 0 1 2 --prompts 64 --out docs/design/k3_variance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from pgpo_kernels import reshape_weights
from pgpo_train.data.tasks import make_count_records
from pgpo_train.models import model_family
from pgpo_train.models.policy import eos_ids
from pgpo_train.models.policy import load_policy
from pgpo_train.models.policy import make_optimizer
from pgpo_train.models.policy import response_logits
from pgpo_train.models.policy import seed_everything
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import model_inputs
from pgpo_train.step.batching import response_mask_from
from pgpo_train.step.batching import visual_kwargs
from pgpo_train.step.sampling import rollout
from pgpo_train.step.scoring import old_logp_and_scores
from pgpo_train.step.update import sft_step


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def summarize(full: torch.Tensor, k3: torch.Tensor, mask: torch.Tensor, tau: float, beta: float) -> dict:
    """Statistics of k3 vs full over the valid tokens of [B, T] scores, and their effect on PGPO weights."""
    m = mask.bool()
    f, k = full[m].double(), k3[m].double()
    d = k - f
    w_full = reshape_weights(full, m, tau=tau, beta=beta, backend="torch")
    w_k3 = reshape_weights(k3, m, tau=tau, beta=beta, backend="torch")
    wf, wk = w_full[m].double(), w_k3[m].double()
    n = f.numel()
    return {
        "tokens": n,
        "sequences": int(m.any(-1).sum()),
        "full_mean": float(f.mean()),
        "full_std": float(f.std()),
        "k3_mean": float(k.mean()),
        "k3_std": float(k.std()),
        "k3_mean_stderr": float(k.std() / n**0.5),
        "diff_mean": float(d.mean()),
        "diff_std": float(d.std()),  # the estimator's per-token spread around the exact value
        "rel_spread": float(d.std() / f.mean()),  # diff_std in units of the mean KL
        "k3_zero_frac": float((k < 1e-6 * max(float(f.mean()), 1e-30)).double().mean()),
        "pearson": float(torch.corrcoef(torch.stack([f, k]))[0, 1]),
        "spearman": _spearman(f, k),
        "weights_mean_abs_diff": float((wk - wf).abs().mean()),
        "weights_max_abs_diff": float((wk - wf).abs().max()),
        "gate_flip_frac": float(((wf >= 1.0) != (wk >= 1.0)).double().mean()),  # amplified under one, not the other
    }


@torch.no_grad()
def sampling_gap(model, processor, cfg, records) -> float:
    """Max |logit| gap between what generate() sampled from and what the scoring forward computes, over valid tokens.

    k3 is unbiased only if x_t ~ pi_vis exactly; this rules out a position-id or cache mismatch between the two.
    """

    model.eval()
    prompt = encode_prompts(processor, records, cfg.prompt_template, 1, torch.device("cpu"))
    stop = eos_ids(model, processor)
    out = model.generate(
        **model_inputs(prompt), do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        max_new_tokens=cfg.max_new_tokens, eos_token_id=stop, pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=model_family.special_ids(model), output_logits=True, return_dict_in_generate=True,
    )
    resp = out.sequences[:, prompt["input_ids"].shape[1]:]  # [B, T]
    mask = response_mask_from(resp, stop).bool()
    gen = torch.stack(out.logits, 1).float()  # [B, T, V] raw logits generate() sampled from (before processors)
    batch = build_sequences(model, prompt, resp, mask.long(), processor.tokenizer.pad_token_id)
    scored = response_logits(model, visual_kwargs(model, batch), resp.shape[1], 1.0)  # [B, T, V]
    return float((gen - scored).abs().amax(-1)[mask].max())


def measure(sft_steps: int, prompts: int, group: int, seed: int, micro_batch: int) -> dict:

    cfg = TrainConfig(seed=seed, sft_steps=sft_steps, group_size=group, micro_batch_size=micro_batch,
                      progress=False).resolved()
    seed_everything(seed)
    device = torch.device("cpu")
    model, processor = load_policy(cfg, device)
    t0 = time.perf_counter()
    if sft_steps:
        optimizer = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
        records = make_count_records(sft_steps * cfg.sft_batch_size, seed=seed)
        for i in range(sft_steps):
            sft_step(model, optimizer, processor, records[i * cfg.sft_batch_size:(i + 1) * cfg.sft_batch_size], cfg,
                     device)
    t_sft = time.perf_counter() - t0
    eval_records = make_count_records(prompts, seed=seed + 10_000)  # prompts the warm-up never saw
    batch, roll = rollout(model, processor, eval_records, cfg, device, {})
    batch.pop("texts")  # strings: select_rows slices tensors only
    scores = {}
    for est in ("full", "k3"):  # the passes run once per estimator (a step computes one); cheap at this size
        cfg_est = dataclasses.replace(cfg, pgpo=dataclasses.replace(cfg.pgpo, estimator=est))
        scores[est] = old_logp_and_scores(model, batch, cfg_est, {})["scores"]  # [B, T]
    stats = summarize(scores["full"], scores["k3"], batch["response_mask"], cfg.pgpo.tau, cfg.pgpo.beta)
    stats["sampling_logit_gap"] = sampling_gap(model, processor, cfg, eval_records[:8])
    stats.update(sft_steps=sft_steps, prompts=prompts, group_size=group, seed=seed,
                 reward_mean=roll["reward/mean"], response_length_mean=roll["response/length_mean"],
                 sft_seconds=round(t_sft, 1))
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft-steps", type=int, nargs="+", default=[0, 150], help="warm-up lengths to measure at")
    p.add_argument("--prompts", type=int, default=64, help="rollout prompts (x group responses)")
    p.add_argument("--group", type=int, default=4, help="responses per prompt (TrainConfig default 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one policy + rollout per seed")
    p.add_argument("--micro-batch", type=int, default=32, help="responses per forward (never changes the math)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for seed in a.seeds:
        for steps in a.sft_steps:
            r = measure(steps, a.prompts, a.group, seed, a.micro_batch)
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.out:
        with open(a.out, "w") as f:
            args = sys.argv[1:] if argv is None else argv
            json.dump({"command": "python -m pgpo_bench.k3_variance " + " ".join(args), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
