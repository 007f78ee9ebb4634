"""The driver-side PGPO step of a verl / EasyR1 trainer, run on a real rollout of a Qwen2.5-VL.

    python examples/verl_pgpo.py                                        # tiny random Qwen2.5-VL, CPU, seconds
    python examples/verl_pgpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --max-new-tokens 256

verl needs a Ray cluster and GPUs to run its trainer; this script runs what PGPO adds to it, on the batch layout
verl's RayPPOTrainer holds after `compute_advantage`: a DataProto (verl's own when verl is installed) with
`input_ids` / `attention_mask` [B, L], `position_ids` [B, 4, L] (text row + 3 mrope rows, verl's layout), `responses` / `response_mask` [B, T],
`old_log_probs` [B, T], GRPO `advantages` [B, T], and per-sample `multi_modal_inputs`. The actor's log-prob call is
stood in for by `actor_log_probs` (one HF forward with the batch's attention mask and position ids, as verl's
padded path does). The few lines to put in a trainer subclass are in pgpo_train/integrations/README.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from dataclasses import field

import numpy as np
import torch

from pgpo_train.data.loading import build_prompt
from pgpo_train.data.rewards import compute_score
from pgpo_train.data.tasks import make_count_records
from pgpo_train.integrations import pgpo_reshape_advantages_
from pgpo_train.integrations import pgpo_text_only_batch
from pgpo_train.models import model_family
from pgpo_train.rl.core_algos import compute_grpo_outcome_advantage
from pgpo_train.step.batching import response_mask_from


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint path/name (default: the tiny random Qwen2.5-VL)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--n", type=int, default=4, help="responses per prompt (verl: actor_rollout_ref.rollout.n)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class MiniDataProto:
    """verl.DataProto's shape (batch, non_tensor_batch, meta_info) for when verl is not installed."""

    batch: dict
    non_tensor_batch: dict
    meta_info: dict = field(default_factory=dict)


def make_dataproto(tensors: dict, non_tensors: dict):
    try:
        from verl import DataProto
    except ImportError:
        return MiniDataProto(dict(tensors), dict(non_tensors))
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def load_policy(path: str | None):
    if path is None:
        from pgpo_train.models.tiny import build_tiny

        return build_tiny(seed=0)
    from transformers import AutoModelForImageTextToText

    from pgpo_train.models.processor import (
        load_processor,  # AutoProcessor, or its parts where the video processor cannot load
    )

    return AutoModelForImageTextToText.from_pretrained(path, dtype="auto"), load_processor(path)


@torch.no_grad()
def rollout(model, processor, records, n: int, max_new_tokens: int):
    """verl's rollout output, padded the verl way: prompts left-padded [B, P], responses right-padded [B, T]."""
    texts = [processor.apply_chat_template(build_prompt(r["problem"], "tiny"), add_generation_prompt=True,
                                           tokenize=False) for r in records]
    enc = processor(images=[[r["image"]] for r in records], text=texts, padding=True, return_tensors="pt")
    P = enc["input_ids"].shape[1]
    # visual special ids never enter a response (a sampled <|image_pad|> would be counted as an image); in verl set
    # the same ids as the rollout engine's bad/suppressed tokens
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=n,
                         suppress_tokens=model_family.special_ids(model))
    responses = out[:, P:]  # [B, T]
    eos = model.generation_config.eos_token_id
    response_mask = response_mask_from(responses, [eos] if isinstance(eos, int) else list(eos))  # [B, T]
    pad = model.generation_config.pad_token_id
    responses = responses.masked_fill(response_mask == 0, pad)
    rows_per_image = enc["image_grid_thw"].prod(-1).tolist()
    pixel_rows = torch.split(enc["pixel_values"], rows_per_image)
    mm = [{"pixel_values": pixel_rows[i], "image_grid_thw": enc["image_grid_thw"][i:i + 1]}
          for i in range(len(records)) for _ in range(n)]  # one dict per response, as verl repeats prompts
    prompts = enc["input_ids"].repeat_interleave(n, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(n, 0)
    return prompts, prompt_mask, responses, response_mask, np.array(mm, dtype=object)


@torch.no_grad()
def actor_log_probs(model, data) -> torch.Tensor:
    """Stand-in for the actor's compute_log_prob: log pi(response_t) [B, T] from one forward of the batch as is."""
    b = data.batch
    mm = [m for m in data.non_tensor_batch["multi_modal_inputs"] if m]
    kwargs = {}
    if mm:
        kwargs = {"pixel_values": torch.cat([m["pixel_values"] for m in mm]),
                  "image_grid_thw": torch.cat([m["image_grid_thw"] for m in mm])}
    position_ids = b["position_ids"]
    if position_ids.dim() == 3:
        position_ids = position_ids.transpose(0, 1)  # verl's [B, 4, L] -> HF's [4, B, L] (text row + mrope rows)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=position_ids,
                   **kwargs).logits  # [B, L, V]
    T = b["responses"].shape[1]
    logp = logits[:, -T - 1:-1].float().log_softmax(-1)  # position j predicts token j + 1
    return logp.gather(-1, b["responses"].unsqueeze(-1)).squeeze(-1) * b["response_mask"]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, processor = load_policy(args.model)
    records = make_count_records(args.prompts, seed=args.seed)

    # 1. rollout, in verl's layout
    prompts, prompt_mask, responses, response_mask, mm = rollout(model, processor, records, args.n,
                                                                 args.max_new_tokens)
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    grid = torch.cat([m["image_grid_thw"] for m in mm])
    # rope index over the prompt, the responses continue the text positions (verl's rollout does the same)
    position_ids = model_family.position_ids(model, input_ids, attention_mask, prompt_len=prompts.shape[1],
                                             image_grid_thw=grid)  # mrope [3, B, L], or [B, L] for 1-D families
    if position_ids.dim() == 3:  # verl (and EasyR1) keep [B, 4, L]: the text position row, then the 3 mrope rows
        text_row = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        position_ids = torch.cat([text_row[None], position_ids], 0).transpose(0, 1)  # [B, 4, L]
    uid = np.repeat(np.arange(args.prompts), args.n).astype(str).astype(object)
    data = make_dataproto(
        {"prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention_mask,
         "position_ids": position_ids, "response_mask": response_mask},
        {"multi_modal_inputs": mm, "uid": uid})

    # 2. the visual pass verl computes anyway ("old_log_probs"), rewards and GRPO advantages [B, T]
    data.batch["old_log_probs"] = actor_log_probs(model, data)
    texts = processor.batch_decode(responses * response_mask, skip_special_tokens=True)
    answers = [r["answer"] for r in records for _ in range(args.n)]
    rewards = torch.tensor([compute_score(t, a)["score"] for t, a in zip(texts, answers)])
    seq_adv, _ = compute_grpo_outcome_advantage(rewards + 0.01 * torch.randn(len(rewards)), args.n)  # our choice:
    # a little noise so that the demo's untrained policy (all rewards 0) still shows non-zero advantages
    data.batch["advantages"] = seq_adv[:, None] * response_mask

    # 3. what PGPO adds: one text-only log-prob pass, then the in-place reshape
    text_batch = pgpo_text_only_batch(data, model)  # the family's placeholder ids, masked in the prompts only
    data.batch["pgpo_text_log_probs"] = actor_log_probs(model, text_batch)
    before = data.batch["advantages"].clone()
    weights, metrics = pgpo_reshape_advantages_(data, tau=args.tau, beta=args.beta)

    print("metrics:", {k: round(v, 4) for k, v in metrics.items()})
    valid = response_mask.bool()
    ratio = data.batch["advantages"][valid] / before[valid].where(before[valid] != 0, torch.ones(()))
    print("advantages now A x w~ on every valid token:",
          bool(torch.allclose(ratio[before[valid] != 0], weights[valid][before[valid] != 0], atol=1e-6)))
    i = int(response_mask.sum(-1).argmax())
    toks = processor.tokenizer.convert_ids_to_tokens(responses[i][valid[i]].tolist())
    print(f"sequence {i}: A = {seq_adv[i]:+.3f}")
    for tok, w, s in zip(toks, weights[i][valid[i]].tolist(), data.batch["old_log_probs"][i][valid[i]].tolist()):
        print(f"  {tok!r:>14}  w~ = {w:5.2f}   log pi_vis = {s:6.2f}")


if __name__ == "__main__":
    main()
