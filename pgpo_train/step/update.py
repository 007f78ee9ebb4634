"""The step's gradient phases: the clipped policy-gradient update (PPO epochs x mini-batches, micro-batches
accumulated) and the SFT warm-up step.
"""

from __future__ import annotations

import math

import torch

from pgpo_kernels import fused_linear_logp
from pgpo_train.data.tasks import probe_ignored_ids
from pgpo_train.models.lm_head import fused_head_forward
from pgpo_train.models.lm_head import hidden_argmax
from pgpo_train.models.policy import logp_entropy
from pgpo_train.models.policy import response_logits
from pgpo_train.models.policy import response_logp
from pgpo_train.rl import core_algos
from pgpo_train.run import distributed
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.run_log import timed
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import select_rows
from pgpo_train.step.batching import text_only_kwargs
from pgpo_train.step.batching import visual_kwargs


def policy_update(
    model, optimizer, batch: dict, tok_adv: torch.Tensor, cfg: TrainConfig, times: dict, dp=distributed.SINGLE,
    fused_lm_head: bool = False,
) -> dict:
    """ppo_epochs x mini-batches of the clipped loss; micro-batches accumulate to each mini-batch's mean.

    Under torchrun (dp) the counts the loss divides by are global and every rank runs as many micro-batches as the
    rank with the most (distributed.py); tok_adv None: this rank kept no rows and only runs zero-weight forwards."""
    model.train()
    policy_loss = core_algos.get_policy_loss_fn("vanilla")
    B = 0 if tok_adv is None else batch["responses"].shape[0]
    sums = {"actor/loss": 0.0, "actor/clip_frac": 0.0, "actor/ppo_kl": 0.0, "actor/grad_norm": 0.0,
            "actor/grad_norm_post_clip": 0.0, "actor/grad_clip_frac": 0.0}
    n_mb = 0
    with timed(times, "timing/update"):
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B)
            for mini in dp.mini_batches(perm, cfg.mini_batch_size):
                n_tok = dp.sum(float(batch["response_mask"][mini].sum()))
                n_seq = dp.sum(float(len(mini)))
                for idx in dp.micro_batches(mini, cfg.micro_batch_size):
                    # torchrun: an empty micro-batch (another rank has one more) runs row 0 with zero weight, so
                    # FSDP's collectives pair
                    empty = len(idx) == 0
                    mb = select_rows(model, batch, torch.arange(1) if empty else idx)
                    logp, _ = response_logp(model, visual_kwargs(model, mb), mb["responses"], cfg.temperature,
                                            fused_lm_head, cfg.pgpo.backend)
                    if empty:
                        (logp.sum() * 0.0).backward()
                        continue
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
                for k, v in grad_norm_metrics(gn, cfg).items():  # pre-clip norm, post-clip norm, clipped or not
                    sums[k] += v
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_mb += 1
    return {k: v / max(n_mb, 1) for k, v in sums.items()}


def sft_text_rows(seed: int, step: int, n: int, prob: float) -> torch.Tensor:
    """[n] bool: which of a warm-up step's n samples train on the text-only pass's inputs (--sft-text-only-prob).

    A seeded share: round(prob n) rows, at least 1 and at most n - 1 when prob > 0 and n >= 2 (every step keeps
    visual rows, which the stop criterion counts), drawn from a generator seeded by (seed, step) only, so a resumed
    warm-up draws the same rows."""
    rows = torch.zeros(n, dtype=torch.bool)
    if prob <= 0 or n < 2:
        return rows
    k = min(max(1, round(prob * n)), n - 1)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) + 0x5F7) % (2**63))
    rows[torch.randperm(n, generator=g)[:k]] = True
    return rows


def sft_batch(model, processor, records, cfg: TrainConfig, device) -> dict:
    """The warm-up's batch: the prompts with their images and the reference responses (+ eos), laid out by
    batching.build_sequences, the builder the rollouts' scoring passes use."""
    tok = processor.tokenizer
    prompt = encode_prompts(processor, records, cfg.prompt_template, 1, device)
    sols = [r["solution"] + tok.eos_token for r in records]
    enc = tok(sols, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="right")
    responses, response_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    return build_sequences(model, prompt, responses, response_mask, tok.pad_token_id)


def sft_forward(model, batch: dict, text_only: bool, cfg: TrainConfig, fused_lm_head: bool = False):
    """([b, T] log-probs of the reference tokens, [b, T] greedy ids) of one kind of warm-up rows: the visual pass's
    inputs, or (text_only) exactly the scoring pass's text-only inputs (batching.text_only_kwargs: same ids and
    positions, visual placeholders unattended, no pixels)."""
    kw = text_only_kwargs(model, batch) if text_only else visual_kwargs(model, batch)
    T = batch["responses"].shape[1]
    if fused_lm_head:  # hidden states + fused_linear_logp: no [B, T, V] logits
        greedy_ids = []

        def head(hidden, weight, bias):
            greedy_ids.append(hidden_argmax(hidden.detach(), weight, bias))  # the accuracy probe, chunked
            return fused_linear_logp(hidden, weight, batch["responses"], bias, backend=cfg.pgpo.backend)

        return fused_head_forward(model, kw, T, head), greedy_ids[0]
    logits = response_logits(model, kw, T, 1.0)
    logp, _ = logp_entropy(logits, batch["responses"], with_entropy=False)
    return logp, logits.detach().argmax(-1)


def sft_step(model, optimizer, processor, records, cfg: TrainConfig, device, dp=distributed.SINGLE,
             fused_lm_head: bool = False, text_rows: torch.Tensor | None = None) -> dict:
    """One supervised step on the reference responses (the warm-up): mean token NLL over every row's tokens.

    text_rows ([B] bool, sft_text_rows): rows trained on the text-only pass's inputs instead of the image's, so the
    text-only pass PGPO scores with is in distribution (a real VLM is trained on text too). sft/seq_acc, the stop
    criterion's probe, counts the visual rows only; sft/text_* are the text-only rows'.

    Under torchrun each rank holds its share of the records; its loss is weighed by its share of the tokens, so the
    summed gradients are the global token mean's (sft/loss sums to it over ranks)."""
    model.train()
    tok = processor.tokenizer
    batch = sft_batch(model, processor, records, cfg, device)
    B = batch["responses"].shape[0]
    text_rows = torch.zeros(B, dtype=torch.bool) if text_rows is None else text_rows.cpu().bool()
    if text_rows.shape != (B,):
        raise ValueError(f"text_rows must be a [B] = [{B}] bool tensor, got shape {tuple(text_rows.shape)}")
    n_tok = float(batch["response_mask"].sum())
    denom = dp.sum(n_tok) if dp.world > 1 else n_tok  # the global token count: parts' losses sum to the token mean
    skip = probe_ignored_ids(cfg.task, tok) if not cfg.dataset else []  # grid-reason: its random filler
    # torchrun with a text share: every rank runs both forwards (FSDP's collectives pair), an empty part on row 0
    # with zero weight
    both = dp.world > 1 and cfg.sft_text_only_prob > 0
    out, loss_sum = {}, 0.0
    for text_only, rows in ((False, ~text_rows), (True, text_rows)):
        idx = rows.nonzero().flatten()
        empty = len(idx) == 0
        if empty and not both:
            continue
        part = batch if len(idx) == B else select_rows(model, batch, torch.zeros(1, dtype=torch.long) if empty else idx)
        logp, greedy = sft_forward(model, part, text_only, cfg, fused_lm_head)
        mask = part["response_mask"]
        nll = (-logp * mask).sum()
        loss = nll / max(denom, 1.0) * (0.0 if empty else 1.0)
        loss.backward()
        loss_sum += loss.item()
        if empty:
            continue
        with torch.no_grad():  # before the update, on records not trained on yet: a free held-out accuracy probe
            hit = (greedy == part["responses"]) | ~mask.bool()
            if skip:
                hit |= torch.isin(part["responses"], torch.tensor(skip, device=hit.device))
            key = "sft/text_" if text_only else "sft/visual_"
            out[key + "seq_acc"] = float(hit.all(-1).float().mean())  # every token the argmax: ~ greedy accuracy
            out[key + "loss"] = nll.item() / max(float(mask.sum()), 1.0)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0: off
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    m = {"sft/loss": loss_sum, "sft/seq_acc": out.get("sft/visual_seq_acc", math.nan), **grad_norm_metrics(gn, cfg),
         "sft/text_rows": float(text_rows.sum())}
    m = {("sft/" + k[len("actor/"):] if k.startswith("actor/") else k): v for k, v in m.items()}
    if cfg.sft_text_only_prob > 0:  # both kinds' metrics (absent kinds: NaN-free defaults keep the log JSON-valid)
        for k in ("seq_acc", "loss"):
            m[f"sft/visual_{k}"] = out.get(f"sft/visual_{k}", 0.0)
            m[f"sft/text_{k}"] = out.get(f"sft/text_{k}", 0.0)
    return m


def grad_norm_metrics(pre_clip: torch.Tensor | float, cfg: TrainConfig) -> dict:
    """The global gradient norm before clipping, after it (clip_grad_norm_'s scale max_norm / (norm + 1e-6), capped
    at 1), and whether the clip acted (1.0 / 0.0; averaged over optimizer steps it is the clip fraction)."""
    gn = float(pre_clip)
    if not cfg.grad_clip or not math.isfinite(gn):
        return {"actor/grad_norm": gn, "actor/grad_norm_post_clip": gn, "actor/grad_clip_frac": 0.0}
    scale = min(1.0, cfg.grad_clip / (gn + 1e-6))
    return {"actor/grad_norm": gn, "actor/grad_norm_post_clip": gn * scale, "actor/grad_clip_frac": float(scale < 1.0)}
