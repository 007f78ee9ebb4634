"""The step's sampling phases: rollouts scored by the verifiable reward, the step's batch (group advantages, DAPO's
dynamic sampling and refill), and the greedy evals.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pgpo_train.data.loading import record_images
from pgpo_train.data.rewards import Reward
from pgpo_train.models import model_family
from pgpo_train.models.policy import eos_ids
from pgpo_train.rl import core_algos
from pgpo_train.run import distributed
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.run_log import timed
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import chat_text
from pgpo_train.step.batching import concat_rollouts
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import model_inputs
from pgpo_train.step.batching import response_mask_from
from pgpo_train.step.batching import select_rows
from pgpo_train.step.refill import refill_groups


@functools.lru_cache(maxsize=4)
def _reward(spec: str, acc_weight: float, format_weight: float) -> Reward:
    return Reward(spec, acc_weight, format_weight)


def reward_of(cfg: TrainConfig) -> Reward:
    """The run's verifiable reward (--reward, else the paper's acc + format), imported once per process."""
    return _reward(cfg.reward, cfg.acc_weight, cfg.format_weight)


@torch.no_grad()
def rollout(model, processor, records, cfg: TrainConfig, device, times: dict, engine=None) -> tuple[dict, dict]:
    """Samples G responses per prompt and scores them. Returns (batch, rollout metrics).

    engine: a pgpo_train.step.vllm_engine.VLLMRollout (synced by the caller) samples instead of HF generate; the
    batch then also holds its log-probs of the sampled tokens, rollout_logp [B, T]."""
    G = cfg.group_size
    with timed(times, "timing/rollout"):
        prompt = encode_prompts(processor, records, cfg.prompt_template, G, device)
        model.eval()
        stop = eos_ids(model, processor)
        pad_id = processor.tokenizer.pad_token_id
        rollout_logp = None
        if engine is not None:
            texts = [chat_text(processor, r, cfg.prompt_template) for r in records for _ in range(G)]
            rows = [ids[m.bool()].tolist() for ids, m in zip(prompt["input_ids"], prompt["attention_mask"])]
            images = [record_images(r) for r in records for _ in range(G)]
            responses, rollout_logp = engine.generate(texts, images, rows, cfg, stop, pad_id)  # [B, T] each
        else:
            out = model.generate(
                **model_inputs(prompt),
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad_id,
                suppress_tokens=model_family.special_ids(model),
                repetition_penalty=1.0,  # checkpoints' configs set one (Qwen: 1.05); logp must see plain softmax
            )
            responses = out[:, prompt["input_ids"].shape[1] :]  # [B, T]
        response_mask = response_mask_from(responses, stop)
        batch = build_sequences(model, prompt, responses, response_mask, pad_id)
        if rollout_logp is not None:
            batch["rollout_logp"] = rollout_logp * response_mask
        texts = processor.tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
        scores = reward_of(cfg)(texts, [r for r in records for _ in range(G)])
    batch["rewards"] = torch.tensor([s["score"] for s in scores], dtype=torch.float32, device=device)
    batch["texts"] = texts
    metrics = {
        "reward/mean": float(np.mean([s["score"] for s in scores])),
        "reward/acc": float(np.mean([s["acc"] for s in scores])),
        "reward/format": float(np.mean([s["format"] for s in scores])),
        "response/length_mean": float(response_mask.sum(-1).float().mean()),
        "response/length_max": float(response_mask.sum(-1).max()),
    }
    return batch, metrics


def sample_batch(model, processor, stream, cfg: TrainConfig, device, times: dict, dp=distributed.SINGLE,
                 engine=None):
    """The step's rollouts: prompts_per_step groups, scored, with group advantages; with dynamic sampling, groups of
    equal rewards dropped and (max_refill > 0) refilled from more prompts (pgpo_train.step.refill).

    Under torchrun (dp) each rank samples its share of every round's prompts and the refill counts are global.
    engine (--rollout-engine vllm): gets the policy's current weights once, before the first round, then samples.

    Returns:
        (batch or None when no group was kept, rollout metrics averaged over every response sampled, the first
        round's response texts, and under torchrun when this rank kept nothing: one row for zero-weight forwards).
    """
    G, seen, texts = cfg.group_size, [], []

    def sample_round(n_prompts: int) -> dict:
        records = dp.shard(stream.next_batch(n_prompts))  # torchrun: this rank's prompts
        with dp.full_params(model):  # torchrun: one all-gather per layer for the whole rollout
            if engine is not None and not seen:  # the step's first round: the weights of the last update
                with timed(times, "timing/vllm_sync"):
                    engine.sync(model)
            batch, m = rollout(model, processor, records, cfg, device, times, engine)
        batch["advantages"], adv_m = core_algos.get_adv_estimator_fn("grpo")(batch["rewards"], G)
        seen.append((len(records), {**m, **adv_m}))
        texts.append(batch.pop("texts"))
        return batch

    on = cfg.dynamic_sampling == "on"
    rounds, metrics = refill_groups(sample_round, cfg.prompts_per_step, G, cfg.max_refill if on else 0, on, dp)
    n = sum(k for k, _ in seen)
    metrics.update({key: sum(k * m[key] for k, m in seen) / n for key in seen[0][1]})
    for key in ("response/length_max",):
        metrics[key] = max(m[key] for _, m in seen)
    parts = [
        r["batch"] if r["keep"].all() else select_rows(model, r["batch"], r["keep"].nonzero().squeeze(-1))
        for r in rounds
        if r["keep"].any()
    ]
    batch = concat_rollouts(model, parts, processor.tokenizer.pad_token_id) if parts else None
    filler = select_rows(model, rounds[0]["batch"], torch.arange(1)) if batch is None and dp.world > 1 else None
    return batch, metrics, texts[0], filler


@torch.no_grad()
def evaluate(model, processor, records: list[dict], cfg: TrainConfig, device, batch_size: int = 64) -> dict:
    """Greedy accuracy / reward on fixed eval records."""
    model.eval()
    accs, scores, fmts = [], [], []
    stop = eos_ids(model, processor)
    for i in range(0, len(records), batch_size):
        recs = records[i : i + batch_size]
        prompt = encode_prompts(processor, recs, cfg.prompt_template, 1, device)
        out = model.generate(
            **model_inputs(prompt),
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stop,
            pad_token_id=processor.tokenizer.pad_token_id,
            suppress_tokens=model_family.special_ids(model),
        )
        texts = processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        for s in reward_of(cfg)(texts, recs):
            accs.append(s["acc"])
            scores.append(s["score"])
            fmts.append(s["format"])
    return {
        "eval/acc": float(np.mean(accs)),
        "eval/reward": float(np.mean(scores)),
        "eval/format": float(np.mean(fmts)),
    }


def evaluate_on_ranks(model, processor, records: list[dict], cfg: TrainConfig, device, dp) -> dict:
    """evaluate(); under torchrun each rank takes every world-th record with the policy unsharded, means merged."""
    if dp.world == 1:
        return evaluate(model, processor, records, cfg, device)
    mine = records[dp.rank :: dp.world]
    with dp.full_params(model):
        out = evaluate(model, processor, mine, cfg, device) if mine else {}
    return dp.merge_metrics(out, len(mine), 0.0)
