"""The PGPO training loop on transformers' Qwen2.5-VL, nanoGPT-style: setup on top, one linear step, helpers.

One RL step (SPEC section 3):
  1. rollout: G sampled responses per prompt (HF generate), scored by the verifiable reward;
  2. group-normalized advantages; dynamic sampling drops all-equal groups (dapo/pgpo);
  3. old log-probs with the image and (pgpo) the text-only pass, under no_grad, micro-batch by micro-batch;
  4. token KL -> PGPO weights -> token advantages A_t = A * w~_t;
  5. clipped policy-gradient loss (DAPO: clip 0.2/0.28, token-mean), AdamW.
Position ids are built explicitly (3-D mrope) for every forward of the step (SPEC section 4).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError

from pgpo_kernels import fused_linear_token_stats
from pgpo_kernels import token_kl
from pgpo_kernels import token_stats
from pgpo_train import core_algos
from pgpo_train import dist_checkpoint
from pgpo_train import distributed
from pgpo_train import model_family
from pgpo_train.checkpoint import latest_checkpoint
from pgpo_train.checkpoint import read_trainer_state
from pgpo_train.checkpoint import save_checkpoint
from pgpo_train.config import TrainConfig
from pgpo_train.data import RecordStream
from pgpo_train.data import Sampler
from pgpo_train.data import build_prompt
from pgpo_train.data import check_first_rows
from pgpo_train.data import load_split
from pgpo_train.data import tiny_dataset_path
from pgpo_train.lm_head import lm_head_params
from pgpo_train.lm_head import response_hidden
from pgpo_train.lm_head import use_fused_lm_head
from pgpo_train.nonfinite import check_finite_metrics
from pgpo_train.nonfinite import check_token_advantages
from pgpo_train.rewards import compute_score
from pgpo_train.rundir import open_run_dir
from pgpo_train.rundir import repair_metrics
from pgpo_train.signals import StopOnSignal
from pgpo_train.signals import TrainingInterrupted
from pgpo_train.signals import stop_requested_anywhere
from pgpo_train.tasks import probe_ignored_ids
from pgpo_train.validate import check_sources
from pgpo_train.weight_variants import control_generator

# %% setup helpers


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_policy(cfg: TrainConfig, device: torch.device):
    """(model, processor): the embedded tiny model when cfg.model is empty, else from_pretrained(cfg.model)."""
    from pgpo_train.tiny import build_tiny
    from pgpo_train.tiny import load_processor

    if not cfg.model:
        model, processor = build_tiny(seed=cfg.seed)
    else:
        from transformers import AutoModelForImageTextToText

        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=getattr(torch, dtype), attn_implementation=attn
        )
        processor = load_processor(cfg.model)
    model_family.check_processor(model, processor, "pgpo-train")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.freeze_vision:
        for p in model_family.vision_tower(model).parameters():
            p.requires_grad_(False)
    return model.to(device), processor


def eos_ids(model, processor) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    for t in (processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id):
        if t is not None and t not in ids:
            ids.append(t)
    return ids


@contextmanager
def timed(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


# %% batches


def encode_prompts(processor, records: list[dict], template: str, repeat: int, device) -> dict:
    """Processor outputs for the prompts, each repeated `repeat` times (adjacent), left-padded, on device."""
    texts, images = [], []
    for r in records:
        text = processor.apply_chat_template(
            build_prompt(r["problem"], template), add_generation_prompt=True, tokenize=False
        )
        texts += [text] * repeat
        images += [[r["image"]]] * repeat  # one image per prompt (Gemma 3 reads a flat list as one prompt's)
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    return {k: v.to(device) for k, v in enc.items()}


def response_mask_from(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[B, T] 1 up to and including the first stop token, 0 after (generate pads finished rows)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    return (~after_stop).long()


def build_sequences(model, prompt: dict, responses: torch.Tensor, response_mask: torch.Tensor, pad_id: int) -> dict:
    """Full (prompt + response) batch with explicit 3-D position ids.

    Args:
        prompt: encode_prompts output ([B, Lp] left-padded, pixel_values, image_grid_thw).
        responses: [B, T] token ids; response_mask: [B, T].

    Returns:
        dict with input_ids/attention_mask [B, L], position_ids [3, B, L] (mrope) or [B, L] (1-D rope),
        the processor's image tensors (model_family.MULTIMODAL_KEYS it wrote; InternVL also num_tiles [B]),
        responses/response_mask [B, T].
    """
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_id))
    input_ids = torch.cat([prompt["input_ids"], responses], dim=1)  # [B, L]
    attention_mask = torch.cat([prompt["attention_mask"], response_mask.to(prompt["attention_mask"].dtype)], dim=1)
    # the response is text (rope index over the prompt, responses continue the text positions)
    position_ids = model_family.position_ids(
        model,
        input_ids,
        attention_mask,
        prompt_len=prompt["input_ids"].shape[1],
        image_grid_thw=prompt.get("image_grid_thw"),
    )
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": responses,
        "response_mask": response_mask,
    }
    out.update({k: prompt[k] for k in model_family.MULTIMODAL_KEYS if prompt.get(k) is not None})  # as processed
    tiles = model_family.num_tiles(model, input_ids, out.get("pixel_values"), prompt["input_ids"].shape[1])
    if tiles is not None:  # InternVL: a row's tiles, so select_rows keeps them whole
        out["num_tiles"] = tiles
    return out


def select_rows(model, batch: dict, idx: torch.Tensor) -> dict:
    """Rows idx of a build_sequences batch: per-row tensors indexed, the image tensors selected image by image in
    the family's pixel layout (model_family.select_images; SPEC sec. 4: never split evenly)."""
    out = {}
    for k, v in batch.items():
        if v is None or k in model_family.MULTIMODAL_KEYS:
            continue
        out[k] = v[:, idx] if k == "position_ids" and v.dim() == 3 else v[idx]
    tiles = batch.get("num_tiles")
    tiles = None if tiles is None else tiles.tolist()
    out.update(model_family.select_images(model, batch, idx.tolist(), num_tiles=tiles))
    return out


def prompt_len(batch: dict) -> int:
    """Where a build_sequences batch's responses start (every row: left-padded prompt, then the response)."""
    return batch["input_ids"].shape[1] - batch["responses"].shape[1]


def visual_kwargs(model, batch: dict) -> dict:
    """Forward kwargs of the visual pass of a build_sequences / select_rows batch (model_family.visual_inputs)."""
    return model_family.visual_inputs(
        model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch, prompt_len=prompt_len(batch)
    )


def text_only_kwargs(model, batch: dict) -> dict:
    """Forward kwargs of the text-only pass of the same batch (model_family.text_only_inputs, SPEC section 1)."""
    return model_family.text_only_inputs(
        model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], prompt_len=prompt_len(batch)
    )


def response_logits(model, inputs: dict, n_resp: int, temperature: float | None) -> torch.Tensor:
    """[mb, T, V] temperature-scaled fp32 logits predicting the response tokens (only those positions are computed);
    temperature None: the model-dtype view itself, no copy (for kernels that take temperature= and a strided view)."""
    logits = model(**inputs, logits_to_keep=n_resp + 1, use_cache=False).logits[:, :-1]  # [mb, T, V]
    return logits if temperature is None else logits.float() / temperature


def logp_entropy(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = True):
    """Log-prob of targets [mb, T] and (no-grad) entropy [mb, T] from logits [mb, T, V]."""
    logz = torch.logsumexp(logits, dim=-1)  # [mb, T]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


# %% step phases


@torch.no_grad()
def rollout(model, processor, records, cfg: TrainConfig, device, times: dict) -> tuple[dict, dict]:
    """Samples G responses per prompt and scores them. Returns (batch, rollout metrics)."""
    G = cfg.group_size
    with timed(times, "timing/rollout"):
        prompt = encode_prompts(processor, records, cfg.prompt_template, G, device)
        model.eval()
        stop = eos_ids(model, processor)
        out = model.generate(
            **prompt,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stop,
            pad_token_id=processor.tokenizer.pad_token_id,
            suppress_tokens=model_family.special_ids(model),
            repetition_penalty=1.0,  # checkpoints' generation configs set one (Qwen: 1.05); logp must see plain softmax
        )
        responses = out[:, prompt["input_ids"].shape[1] :]  # [B, T]
        response_mask = response_mask_from(responses, stop)
        batch = build_sequences(model, prompt, responses, response_mask, processor.tokenizer.pad_token_id)
        texts = processor.tokenizer.batch_decode(batch["responses"], skip_special_tokens=True)
        answers = [r["answer"] for r in records for _ in range(G)]
        scores = [compute_score(t, a, cfg.acc_weight, cfg.format_weight) for t, a in zip(texts, answers)]
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


@torch.no_grad()
def old_logp_and_scores(model, batch: dict, cfg: TrainConfig, times: dict, fused_lm_head: bool = False) -> dict:
    """Old log-probs with the image and, for pgpo, token visual-dependency scores from the text-only pass.

    Works micro-batch by micro-batch. With `fused_lm_head` (pgpo only) both passes stop at the last hidden states
    [mb, T, H] and pgpo_kernels.fused_linear_token_stats applies the lm_head tile by tile: no [mb, T, V] logits
    exist. Otherwise at most one micro-batch's [mb, T, V] logits of each pass are alive, at response positions only.

    Returns:
        dict with old_logp [B, T], entropy [B, T] and (pgpo) scores [B, T].
    """
    model.eval()
    B, T = batch["responses"].shape
    old_logp, entropy, scores = [], [], []
    pgpo = cfg.algo == "pgpo"
    fused = pgpo and fused_lm_head
    # PGPO_NO_TOKEN_STATS=1: the logits path's unfused ops (torch log-softmax + token_kl / k3), to compare with
    unfused = os.environ.get("PGPO_NO_TOKEN_STATS") == "1"
    logits_temp = None if pgpo and not unfused else cfg.temperature  # None: token_stats scales bf16 logits itself
    for start in range(0, B, cfg.micro_batch_size):
        mb = select_rows(model, batch, torch.arange(start, min(B, start + cfg.micro_batch_size)))
        with timed(times, "timing/old_logp"):
            kw = visual_kwargs(model, mb)
            if fused:
                vis = response_hidden(model, kw, T)  # [mb, T, H]; the vision tower ran (pixel_values in kw)
            else:
                vis = response_logits(model, kw, T, logits_temp)  # [mb, T, V]
                if not pgpo or unfused:
                    lp, ent = logp_entropy(vis, mb["responses"])
        if not pgpo:
            old_logp.append(lp)
            entropy.append(ent)
            del vis
            continue
        with timed(times, "timing/text_only"):
            kw = text_only_kwargs(model, mb)
            txt = response_hidden(model, kw, T) if fused else response_logits(model, kw, T, logits_temp)
        with timed(times, "timing/kl_reshape"):
            if fused:
                weight, bias = lm_head_params(model)
                st = fused_linear_token_stats(
                    vis,
                    txt,
                    weight,
                    mb["responses"],
                    bias,
                    temperature=cfg.temperature,
                    estimator=cfg.pgpo.estimator,
                    backend=cfg.pgpo.backend,
                )
                lp, ent, s = st.logp, st.entropy, st.kl  # [mb, T] each
            elif not unfused:
                # one read of each [mb, T, V] logit view gives log-prob, entropy and S_t (no fp32 / temperature copy)
                st = token_stats(
                    vis,
                    txt,
                    mb["responses"],
                    temperature=cfg.temperature,
                    estimator=cfg.pgpo.estimator,
                    backend=cfg.pgpo.backend,
                )
                lp, ent, s = st.logp, st.entropy, st.kl  # [mb, T] each
            elif cfg.pgpo.estimator == "full":
                s = token_kl(vis, txt, backend=cfg.pgpo.backend)  # [mb, T]
            else:
                lp_txt, _ = logp_entropy(txt, mb["responses"], with_entropy=False)
                s = core_algos.k3_scores(lp, lp_txt)  # [mb, T]
        old_logp.append(lp)
        entropy.append(ent)
        scores.append(s)
        del vis, txt  # free both passes' logits / hidden states before the next micro-batch
    out = {"old_logp": torch.cat(old_logp), "entropy": torch.cat(entropy)}
    if pgpo:
        out["scores"] = torch.cat(scores)
    return out


def token_weights(scores: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, step: int = 0) -> torch.Tensor:
    """[B, T] the run's PGPO token weights: core_algos.pgpo_weights with cfg.pgpo's options; the shuffled control's
    permutations are seeded by (cfg.seed, step), so a resumed run draws the same ones."""
    gen = control_generator(cfg.seed, step, mask.device) if cfg.pgpo.control == "shuffled" else None
    return core_algos.pgpo_weights(scores, mask, **cfg.pgpo.weight_kwargs(), generator=gen)


def token_advantages(batch: dict, cfg: TrainConfig, times: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
    """[B, T] A * w~_t (pgpo) or A broadcast (grpo/dapo), and the weight/KL metrics (core_algos.weight_metrics);
    `step` seeds the shuffled control."""
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None]  # [B, 1]
    if cfg.algo != "pgpo":
        return adv * mask.float(), {}
    with timed(times, "timing/kl_reshape"):
        w = token_weights(batch["scores"], mask, cfg, step)  # [B, T]
    tok_adv = adv * w
    stats = core_algos.weight_metrics(w, batch["scores"], mask, tau=cfg.pgpo.tau, eps=cfg.pgpo.eps, token_adv=tok_adv)
    return tok_adv, dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync


def policy_update(
    model, optimizer, batch: dict, tok_adv: torch.Tensor, cfg: TrainConfig, times: dict, dp=distributed.SINGLE
) -> dict:
    """ppo_epochs x mini-batches of the clipped loss; micro-batches accumulate to each mini-batch's mean.

    Under torchrun (dp) the counts the loss divides by are global and every rank runs as many micro-batches as the
    rank with the most (distributed.py); tok_adv None: this rank kept no rows and only runs zero-weight forwards."""
    model.train()
    policy_loss = core_algos.get_policy_loss_fn("vanilla")
    B, T = batch["responses"].shape
    B = 0 if tok_adv is None else B
    sums = {"actor/loss": 0.0, "actor/clip_frac": 0.0, "actor/ppo_kl": 0.0, "actor/grad_norm": 0.0}
    n_mb = 0
    with timed(times, "timing/update"):
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B)
            for mini in dp.mini_batches(perm, cfg.mini_batch_size):
                n_tok = dp.sum(float(batch["response_mask"][mini].sum()))
                n_seq = dp.sum(float(len(mini)))
                for idx in dp.micro_batches(mini, cfg.micro_batch_size):
                    if len(idx) == 0:  # torchrun: another rank has a micro-batch more; FSDP's collectives must pair
                        mb = select_rows(model, batch, torch.arange(1))
                        (response_logits(model, visual_kwargs(model, mb), T, cfg.temperature).sum() * 0.0).backward()
                        continue
                    mb = select_rows(model, batch, idx)
                    logits = response_logits(model, visual_kwargs(model, mb), T, cfg.temperature)
                    logp, _ = logp_entropy(logits, mb["responses"], with_entropy=False)
                    loss, m = policy_loss(
                        batch["old_logp"][idx],
                        logp,
                        tok_adv[idx],
                        mb["response_mask"],
                        clip_ratio_low=cfg.clip_ratio_low,
                        clip_ratio_high=cfg.clip_ratio_high,
                        loss_agg_mode=cfg.loss_agg_mode,
                        global_tokens=max(n_tok, 1.0),
                        global_seqs=n_seq,
                    )
                    loss.backward()
                    frac = len(idx) / n_seq
                    sums["actor/loss"] += loss.item()  # host sync: fine at this scale, one per micro-batch
                    sums["actor/clip_frac"] += float(m["actor/clip_frac"]) * frac
                    sums["actor/ppo_kl"] += float(m["actor/ppo_kl"]) * frac
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0: off
                sums["actor/grad_norm"] += float(gn)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_mb += 1
    return {k: v / max(n_mb, 1) for k, v in sums.items()}


def sft_step(model, optimizer, processor, records, cfg: TrainConfig, device, dp=distributed.SINGLE) -> dict:
    """One supervised step on the reference responses (the warm-up): mean token NLL with the image.

    Under torchrun each rank holds its share of the records; its loss is weighed by its share of the tokens, so the
    summed gradients are the global token mean's (sft/loss sums to it over ranks)."""
    model.train()
    tok = processor.tokenizer
    prompt = encode_prompts(processor, records, cfg.prompt_template, 1, device)
    sols = [r["solution"] + tok.eos_token for r in records]
    enc = tok(sols, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="right")
    responses, response_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    batch = build_sequences(model, prompt, responses, response_mask, tok.pad_token_id)
    logits = response_logits(model, visual_kwargs(model, batch), responses.shape[1], 1.0)
    logp, _ = logp_entropy(logits, batch["responses"], with_entropy=False)
    loss = core_algos.agg_loss(-logp, batch["response_mask"], "token-mean")
    if dp.world > 1:
        n_tok = float(batch["response_mask"].sum())
        loss = loss * (n_tok / dp.sum(n_tok))
    with torch.no_grad():  # before the update, on records not trained on yet: a free held-out accuracy probe
        hit = (logits.argmax(-1) == batch["responses"]) | ~batch["response_mask"].bool()
        skip = probe_ignored_ids(cfg.task, tok) if not cfg.dataset else []  # grid-reason: its random filler
        if skip:
            hit |= torch.isin(batch["responses"], torch.tensor(skip, device=hit.device))
        seq_acc = float(hit.all(-1).float().mean())  # every response token the argmax: ~ greedy accuracy
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0: off
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sft/loss": loss.item(), "sft/grad_norm": float(gn), "sft/seq_acc": seq_acc}


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
            **prompt,
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stop,
            pad_token_id=processor.tokenizer.pad_token_id,
            suppress_tokens=model_family.special_ids(model),
        )
        texts = processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        for t, r in zip(texts, recs):
            s = compute_score(t, r["answer"], cfg.acc_weight, cfg.format_weight)
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


def sample_batch(model, processor, stream, cfg: TrainConfig, device, times: dict, dp=distributed.SINGLE):
    """The step's rollouts: prompts_per_step groups, scored, with group advantages; with dynamic sampling, groups of
    equal rewards dropped and (max_refill > 0) refilled from more prompts (pgpo_train.refill).

    Under torchrun (dp) each rank samples its share of every round's prompts and the refill counts are global.

    Returns:
        (batch or None when no group was kept, rollout metrics averaged over every response sampled, the first
        round's response texts, and under torchrun when this rank kept nothing: one row for zero-weight forwards).
    """
    from pgpo_train.refill import concat_rollouts
    from pgpo_train.refill import refill_groups

    G, seen, texts = cfg.group_size, [], []

    def sample_round(n_prompts: int) -> dict:
        records = dp.shard(stream.next_batch(n_prompts))  # torchrun: this rank's prompts
        with dp.full_params(model):  # torchrun: one all-gather per layer for the whole rollout
            batch, m = rollout(model, processor, records, cfg, device, times)
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


def eval_summary(metrics_path: str, sft_end: int, n_eval: int) -> dict:
    """Greedy eval accuracy after the warm-up (the eval at step sft_end) and at the last eval, each with its
    binomial standard error sqrt(p (1 - p) / n), read back from metrics.jsonl (so a resumed run reports both)."""
    if not n_eval or not os.path.exists(metrics_path):
        return {}
    with open(metrics_path) as f:
        evals = [(r["step"], r["eval/acc"]) for r in map(json.loads, filter(str.strip, f)) if "eval/acc" in r]
    out = {}
    for key, hit in (("sft", [a for s, a in evals if s == sft_end]), ("final", [a for _, a in evals[-1:]])):
        if hit:
            out[f"eval/acc_{key}"] = hit[0]
            out[f"eval/acc_{key}_se"] = math.sqrt(hit[0] * (1 - hit[0]) / n_eval)
    out["eval/n"] = n_eval
    return out


def write_curves(out_dir: str) -> str | None:
    """RUN_DIR/curves.png via pgpo-train plot's code; None when nothing was logged or (with a one-line notice)
    without matplotlib."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        print("pgpo-train: matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    from pgpo_train.plot import plot_runs

    return plot_runs([out_dir])


# %% logging


class Logger:
    """metrics.jsonl (one line per step) and tensorboard when installed."""

    def __init__(self, out_dir: str, tensorboard: bool, truncate_after: int | None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if truncate_after is not None and os.path.exists(self.path):
            # resume: drop lines written after the checkpoint, so the log matches an uninterrupted run, and a line
            # torn by a full disk or a kill
            n = repair_metrics(self.path, truncate_after)
            if n["torn"] or n["after"]:
                dropped = f"{n['torn']} torn row(s), {n['after']} after step {truncate_after}"
                print(f"pgpo-train: metrics.jsonl: dropped {dropped}")
        elif truncate_after is None and os.path.exists(self.path):
            os.remove(self.path)
        self.tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            print("pgpo-train: tensorboard is not installed: metrics go to metrics.jsonl only (--no-tensorboard)")
        elif tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def log(self, step: int, metrics: dict) -> None:
        metrics = {
            k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v) for k, v in metrics.items()
        }
        rec = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# %% the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, lr: float, weight_decay: float):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def train(cfg: TrainConfig) -> dict:
    """Runs SFT warm-up (if any) then RL; returns a summary dict. Resumable from cfg.out_dir.

    Every setting, the model and the dataset are checked before any work (ValueError naming the flag). The run dir
    is locked for the run (one writer). SIGINT/SIGTERM finish the step, checkpoint, raise TrainingInterrupted.
    """
    cfg = cfg.resolved()
    check_sources(cfg)
    dp = distributed.setup(resolve_device(cfg).type)  # torchrun: process group + FSDP2; else SINGLE (no change)
    dp.check_config(cfg)
    run_dir = functools.partial(open_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
    with distributed.on_writer(dp, run_dir), StopOnSignal() as stop:  # torchrun: rank 0 locks and writes
        return _train(cfg, stop, dp)


def _train(cfg: TrainConfig, stop: StopOnSignal, dp=distributed.SINGLE) -> dict:
    """train()'s body, in a locked run dir."""
    device = resolve_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    if dp.is_writer:  # torchrun: rank 0 holds the run dir (train() opened it there only)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    # data: the generated tiny task unless a dataset is given
    data_path = cfg.dataset or tiny_dataset_path(seed=0, task=cfg.task, filler=cfg.task_filler)
    columns = {"image": cfg.image_column, "problem": cfg.problem_column, "answer": cfg.answer_column}
    if cfg.sft_steps > 0:
        columns["solution"] = cfg.solution_column
    train_ds = load_split(data_path, cfg.split, columns, cfg.max_samples)
    check_first_rows(train_ds, columns)  # wrong columns fail here, not after the model loaded

    try:
        model, processor = load_policy(cfg, device)
    except (OSError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {cfg.model or '(embedded tiny)'}: cannot load it: {first}") from e
    # resolved once, before any step: "on" with an unsupported lm_head fails here, not mid-run
    fused_lm_head = cfg.algo == "pgpo" and use_fused_lm_head(cfg.pgpo.fused_lm_head, model, device)
    small = sum(p.numel() for p in model.parameters()) < 50_000_000
    if not cfg.threads and device.type == "cpu" and small:
        # our choice: a tiny model's matmuls only thrash with more threads (4x slower on a busy 2-core box)
        torch.set_num_threads(1)
    if dp.world > 1:  # every rank built the same model; each keeps its shard and samples with its own RNG stream
        model = distributed.shard_policy(model, device, cfg.fsdp_cpu_offload)
        dist_checkpoint.fresh_rng(cfg.seed, 0, dp.rank)
    eval_records = []
    if cfg.eval_every > 0:
        try:
            eval_ds = load_split(
                data_path, cfg.eval_split, {k: v for k, v in columns.items() if k != "solution"}, cfg.eval_size
            )
            eval_records = RecordStream(eval_ds, columns | {"solution": None}, Sampler(len(eval_ds), 0)).next_batch(
                len(eval_ds)
            )
        except ValueError as e:
            print(f"pgpo-train: no eval ({e})")

    # state; resume restores all of it. Checkpoints are written in both phases; the optimizer a checkpoint holds is
    # the one of its phase ("sft" before step sft_end, "rl" from the SFT -> RL switch on).
    step, data_pos, skipped, skipped_empty, resumed_from = 0, 0, 0, 0, None
    sft_end, sft_accs = cfg.sft_steps, []  # sft_end: the step the warm-up ends at (earlier with --sft-stop-acc)
    optimizer = make_optimizer(model, cfg.sft_lr if cfg.sft_steps > 0 else cfg.lr, cfg.weight_decay)
    if cfg.resume:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
        saved = read_trainer_state(path)
        in_sft = saved["step"] < saved.get("sft_end", cfg.sft_steps)
        optimizer = make_optimizer(model, cfg.sft_lr if in_sft else cfg.lr, cfg.weight_decay)
        st = dist_checkpoint.load(path, model, optimizer, dp, cfg.seed)
        step, data_pos, skipped = st["step"], st["data_pos"], st["skipped_images"]
        skipped_empty = st.get("skipped_empty", 0)
        sft_end = st.get("sft_end", cfg.sft_steps)
        sft_accs = list(st.get("sft_accs", []))
        resumed_from = path
    sampler = Sampler(len(train_ds), cfg.seed, data_pos)
    stream = RecordStream(train_ds, columns, sampler)
    stream.skipped_images, stream.skipped_empty = skipped, skipped_empty
    logger = (
        Logger(cfg.out_dir, cfg.tensorboard, truncate_after=step if resumed_from else None) if dp.is_writer else None
    )
    save = save_checkpoint if dp.world == 1 else functools.partial(dist_checkpoint.save, dp)

    def state():
        return {
            "step": step,
            "phase": "sft" if step < sft_end else "rl",
            "data_pos": sampler.position,
            "skipped_images": stream.skipped_images,
            "skipped_empty": stream.skipped_empty,
            "sft_end": sft_end,
            "sft_accs": list(sft_accs),
            "config": dataclasses.asdict(cfg),
        }

    total = sft_end + cfg.steps
    bar = None
    if cfg.progress and dp.is_writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"{cfg.algo}", dynamic_ncols=True)
    t_start = time.perf_counter()
    last_eval = {}
    saved_at = step if resumed_from else -1  # the step of the newest checkpoint
    stop.arm()
    while step < total:
        requested = stop.requested if dp.world == 1 else stop_requested_anywhere(stop.requested, device)
        if requested:  # a signal came during the step just finished (torchrun: on any rank): checkpoint, stop
            if saved_at != step and step > 0:
                save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
            if bar:
                bar.close()
            if logger:
                logger.close()
            raise TrainingInterrupted(requested, step, latest_checkpoint(ckpt_dir), cfg.out_dir)
        # --- SFT warm-up
        if step < sft_end:
            recs = dp.shard(stream.next_batch(cfg.sft_batch_size))
            m = dp.merge_metrics(sft_step(model, optimizer, processor, recs, cfg, device, dp), len(recs), 0.0)
            step += 1
            check_finite_metrics(step, m, ("sft/loss", "sft/grad_norm"))
            sft_accs = (sft_accs + [m["sft/seq_acc"]])[-3:]
            if cfg.sft_stop_acc > 0 and len(sft_accs) == 3 and sum(sft_accs) / 3 >= cfg.sft_stop_acc:
                sft_end, total = step, step + cfg.steps  # warm enough: RL starts now
                if bar:
                    bar.total = total
            if step == sft_end:
                if eval_records:
                    last_eval = evaluate_on_ranks(model, processor, eval_records, cfg, device, dp)
                    m.update(last_eval)
                optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)  # our choice: fresh AdamW for RL
            if logger:
                logger.log(step, {"phase": "sft", **m})
            if step == sft_end or (cfg.save_every > 0 and step % cfg.save_every == 0):
                save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
                saved_at = step
            if bar:
                bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
                bar.update(1)
            continue

        # --- RL step
        times: dict = {}
        t0 = time.perf_counter()
        batch, metrics, texts, filler = sample_batch(model, processor, stream, cfg, device, times, dp)
        if cfg.algo == "pgpo":
            metrics["pgpo/fused_lm_head"] = float(fused_lm_head)  # which old-log-prob path ran (1: hidden states)
        # this rank's responses and kept tokens, to weigh its metrics (torchrun: every rank samples as many)
        n_resp, n_tok = len(texts), 0.0
        kept_anywhere = dp.any(batch is not None)
        if batch is not None:
            with dp.full_params(model):
                batch.update(old_logp_and_scores(model, batch, cfg, times, fused_lm_head))
            tok_adv, w_m = token_advantages(batch, cfg, times, step)
            check_token_advantages(step + 1, batch["advantages"], tok_adv, batch["response_mask"])
            metrics.update(w_m)
            metrics["actor/entropy"] = float(batch["entropy"][batch["response_mask"].bool()].mean())
            metrics.update(policy_update(model, optimizer, batch, tok_adv, cfg, times, dp))
            check_finite_metrics(step + 1, metrics, ("actor/loss", "actor/grad_norm"))
            n_tok = float(batch["response_mask"].sum())
        elif kept_anywhere:  # torchrun: another rank kept groups; this one pairs their collectives with zero weight
            with dp.full_params(model):
                pass
            metrics.update(policy_update(model, optimizer, filler, None, cfg, times, dp))
            check_finite_metrics(step + 1, metrics, ("actor/grad_norm",))  # global: every rank stops together
        # else: every group had equal rewards, also after the refill rounds -> no gradient signal this step
        step += 1
        metrics.update(times)
        metrics["timing/step"] = time.perf_counter() - t0
        metrics["data/skipped_images"] = stream.skipped_images
        metrics["data/skipped_empty"] = stream.skipped_empty
        metrics["data/epoch"] = sampler.position / sampler.n
        rl_step = step - sft_end
        metrics = dp.merge_metrics(metrics, n_resp, n_tok)
        if eval_records and cfg.eval_every > 0 and (rl_step % cfg.eval_every == 0 or step == total):
            last_eval = evaluate_on_ranks(model, processor, eval_records, cfg, device, dp)
            metrics.update(last_eval)
            metrics["sample/response"] = texts[0]  # one rollout response per eval, to eyeball what the policy writes
        if logger:
            logger.log(step, {"phase": "rl", **metrics})
        if (cfg.save_every > 0 and rl_step % cfg.save_every == 0) or step == total:
            save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
            saved_at = step
        if bar:
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['reward/acc']:.2f}")
            bar.update(1)
    if bar:
        bar.close()
    if logger:
        logger.close()
    curves = write_curves(cfg.out_dir) if dp.is_writer else None
    summary = {
        "out_dir": cfg.out_dir,
        "steps": step,
        "wall_s": time.perf_counter() - t_start,
        "skipped_images": stream.skipped_images,
        "skipped_empty": stream.skipped_empty,
        "resumed_from": resumed_from,
        "sft_steps": sft_end,
        "rl_steps": step - sft_end,
        "curves": curves,
        **last_eval,
        **eval_summary(os.path.join(cfg.out_dir, "metrics.jsonl"), sft_end, len(eval_records)),
    }
    if dp.is_writer:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return {**summary, "model": model, "processor": processor}
