"""Rollout batches (docs/method.md#trainer-traps): prompts encoded with their images, prompt + response sequences
with explicit position ids, rows selected with their own images, several rounds merged, and the two passes' forward
kwargs.

A batch is a dict: input_ids / attention_mask [B, L] (left-padded prompt, then the right-padded response),
position_ids [3, B, L] (mrope) or [B, L], responses / response_mask [B, T], the processor's image tensors
(model_family.MULTIMODAL_KEYS; InternVL also num_tiles [B]) and per-row keys such as rewards / advantages [B].
"""

from __future__ import annotations

import torch

from pgpo_train.data.loading import build_prompt
from pgpo_train.models import model_family

# keys of a rollout batch with one row per response; the rest are per-prompt-image or built from these
ROW_KEYS = ("rewards", "advantages")


def chat_text(processor, record: dict, template: str) -> str:
    """A record's prompt as the chat template writes it (image placeholder unexpanded; the processor expands it)."""
    return processor.apply_chat_template(build_prompt(record["problem"], template), add_generation_prompt=True,
                                         tokenize=False)


def encode_prompts(processor, records: list[dict], template: str, repeat: int, device) -> dict:
    """Processor outputs for the prompts, each repeated `repeat` times (adjacent), left-padded, on device."""
    texts, images = [], []
    for r in records:
        text = chat_text(processor, r, template)
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
    the family's pixel layout (model_family.select_images; docs/method.md#trainer-traps: never evenly)."""
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
    """Forward kwargs of the text-only pass of the same batch (model_family.text_only_inputs,
    docs/method.md#text-only-pass)."""
    return model_family.text_only_inputs(
        model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], prompt_len=prompt_len(batch)
    )


def concat_rollouts(model, parts: list[dict], pad_id: int) -> dict:
    """One batch from several rollout batches (build_sequences layout), prompts re-left-padded, responses re-right-
    padded to the longest, 3-D position ids rebuilt for the merged layout.

    Args:
        parts: batches with input_ids/attention_mask [B, L] (= left-padded prompt + response), responses/
            response_mask [B, T], pixel_values/image_grid_thw (one image per row), and ROW_KEYS [B].
    """
    if len(parts) == 1:
        return parts[0]
    lp = max(p["input_ids"].shape[1] - p["responses"].shape[1] for p in parts)
    t = max(p["responses"].shape[1] for p in parts)
    ids, att, resp, rmask, rlogp = [], [], [], [], []
    for p in parts:
        T = p["responses"].shape[1]
        Lp = p["input_ids"].shape[1] - T
        left, right = (lp - Lp, 0), (0, t - T)
        ids.append(torch.nn.functional.pad(p["input_ids"][:, :Lp], left, value=pad_id))
        att.append(torch.nn.functional.pad(p["attention_mask"][:, :Lp], left, value=0))
        resp.append(torch.nn.functional.pad(p["responses"], right, value=pad_id))
        rmask.append(torch.nn.functional.pad(p["response_mask"], right, value=0))
        if "rollout_logp" in p:  # the rollout engine's log-probs [B, T] (vLLM), padded like the responses
            rlogp.append(torch.nn.functional.pad(p["rollout_logp"], right, value=0.0))
    prompt = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(att)}
    for k in model_family.MULTIMODAL_KEYS:  # one image per row
        if parts[0].get(k) is not None:
            prompt[k] = torch.cat([p[k] for p in parts])
    out = build_sequences(model, prompt, torch.cat(resp), torch.cat(rmask), pad_id)
    for k in ROW_KEYS:
        if k in parts[0]:
            out[k] = torch.cat([p[k] for p in parts])
    if rlogp:
        out["rollout_logp"] = torch.cat(rlogp)
    return out
