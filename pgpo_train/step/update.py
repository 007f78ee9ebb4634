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
    sums = {"actor/loss": 0.0, "actor/clip_frac": 0.0, "actor/ppo_kl": 0.0, "actor/grad_norm": 0.0}
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
                sums["actor/grad_norm"] += float(gn)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_mb += 1
    return {k: v / max(n_mb, 1) for k, v in sums.items()}


def sft_step(model, optimizer, processor, records, cfg: TrainConfig, device, dp=distributed.SINGLE,
             fused_lm_head: bool = False) -> dict:
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
    if fused_lm_head:  # hidden states + fused_linear_logp: no [B, T, V] logits
        greedy_ids = []

        def head(hidden, weight, bias):
            greedy_ids.append(hidden_argmax(hidden.detach(), weight, bias))  # the accuracy probe, chunked
            return fused_linear_logp(hidden, weight, batch["responses"], bias, backend=cfg.pgpo.backend)

        logp = fused_head_forward(model, visual_kwargs(model, batch), responses.shape[1], head)
    else:
        logits = response_logits(model, visual_kwargs(model, batch), responses.shape[1], 1.0)
        logp, _ = logp_entropy(logits, batch["responses"], with_entropy=False)
    loss = core_algos.agg_loss(-logp, batch["response_mask"], "token-mean")
    if dp.world > 1:
        n_tok = float(batch["response_mask"].sum())
        loss = loss * (n_tok / dp.sum(n_tok))
    with torch.no_grad():  # before the update, on records not trained on yet: a free held-out accuracy probe
        greedy = greedy_ids[0] if fused_lm_head else logits.argmax(-1)  # [B, T]
        hit = (greedy == batch["responses"]) | ~batch["response_mask"].bool()
        skip = probe_ignored_ids(cfg.task, tok) if not cfg.dataset else []  # grid-reason: its random filler
        if skip:
            hit |= torch.isin(batch["responses"], torch.tensor(skip, device=hit.device))
        seq_acc = float(hit.all(-1).float().mean())  # every response token the argmax: ~ greedy accuracy
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)  # 0: off
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sft/loss": loss.item(), "sft/grad_norm": float(gn), "sft/seq_acc": seq_acc}
