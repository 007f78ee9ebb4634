"""Rollout batches (docs/method.md#trainer-traps): prompts encoded with their images, prompt + response sequences
with explicit position ids, rows selected with their own images, several rounds merged, and the two passes' forward
kwargs.

A batch is a dict: input_ids / attention_mask [B, L] (left-padded prompt, then the right-padded response),
position_ids [3, B, L] (mrope) or [B, L], responses / response_mask [B, T], the processor's image tensors
(model_family.MULTIMODAL_KEYS; InternVL also num_tiles [B]), num_images [B] (a prompt may hold several images) and
per-row keys such as rewards / advantages [B].
"""

from __future__ import annotations

import torch

from pgpo_train.data.loading import build_prompt
from pgpo_train.data.loading import record_images
from pgpo_train.models import model_family

# keys of a rollout batch with one row per response; the rest are per-prompt-image or built from these
ROW_KEYS = ("rewards", "advantages")


def chat_text(processor, record: dict, template: str) -> str:
    """A record's prompt as the chat template writes it (image placeholders unexpanded; the processor expands them)."""
    messages = build_prompt(record["problem"], template, len(record_images(record)))
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, records: list[dict], template: str, repeat: int, device) -> dict:
    """Processor outputs for the prompts, each repeated `repeat` times (adjacent), left-padded, on device, plus
    num_images [B] (each record's "images", a list)."""
    texts, images = [], []
    for r in records:
        text = chat_text(processor, r, template)
        texts += [text] * repeat
        images += [record_images(r)] * repeat  # nested per prompt (Gemma 3 reads a flat list as one prompt's)
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    out = {k: v.to(device) for k, v in enc.items()}
    out["num_images"] = torch.tensor([len(im) for im in images], device=device)
    return out


def model_inputs(prompt: dict) -> dict:
    """An encode_prompts output as generate's kwargs: the processor's tensors, without our num_images."""
    return {k: v for k, v in prompt.items() if k != "num_images"}


def response_mask_from(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[B, T] 1 up to and including the first stop token, 0 after (generate pads finished rows)."""
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # strictly after the first stop
    return (~after_stop).long()


def build_sequences(model, prompt: dict, responses: torch.Tensor, response_mask: torch.Tensor, pad_id: int) -> dict:
    """Full (prompt + response) batch with explicit 3-D position ids.

    Args:
        prompt: encode_prompts output ([B, Lp] left-padded, pixel_values, image_grid_thw, num_images [B]).
        responses: [B, T] token ids; response_mask: [B, T].

    Returns:
        dict with input_ids/attention_mask [B, L], position_ids [3, B, L] (mrope) or [B, L] (1-D rope),
        the processor's image tensors (model_family.MULTIMODAL_KEYS it wrote; InternVL also num_tiles [B]),
        num_images [B] (from the prompt; one each when it has none), responses/response_mask [B, T].
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
    if prompt.get("num_images") is not None:
        out["num_images"] = prompt["num_images"]
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
    tiles, n_images = batch.get("num_tiles"), batch.get("num_images")
    out.update(model_family.select_images(model, batch, idx.tolist(),
                                          num_tiles=None if tiles is None else tiles.tolist(),
                                          num_images=None if n_images is None else n_images.tolist()))
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
            response_mask [B, T], their image tensors and num_images [B], and ROW_KEYS [B].
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
    for k in (*model_family.MULTIMODAL_KEYS, "num_images"):  # image (or sample) major: the rows' order is kept
        if parts[0].get(k) is not None:
            prompt[k] = cat_padded([p[k] for p in parts])
    out = build_sequences(model, prompt, torch.cat(resp), torch.cat(rmask), pad_id)
    for k in ROW_KEYS:
        if k in parts[0]:
            out[k] = torch.cat([p[k] for p in parts])
    if rlogp:
        out["rollout_logp"] = torch.cat(rlogp)
    return out


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0 of tensors whose other dims may differ, zero-padded at their ends to the largest: the
    processors pad each batch only to its own largest (Idefics3's images per sample [B, images, ...] with
    pixel_attention_mask, LLaVA-OneVision's tiles per image [images, tiles, ...]); zero padding is what they use,
    and what the models skip."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(out)


def check_images_per_prompt(model, processor, n_images: int, template: str) -> None:
    """Refuses (ValueError naming the family) a model whose processor cannot lay out n_images images in one prompt
    the way the rows' image selection reads them: one prompt of n_images small blank images is encoded, and the
    image tensors must hold n_images entries of that prompt (LLaVA-OneVision: and its batch_num_images, which
    decides how each image is tiled). Every supported family passes with transformers 5 (tests/train/
    test_multi_image.py); an older processor that folds several images into one entry is caught here, before the
    first step."""
    if n_images <= 1:
        return
    from PIL import Image

    fam = model_family.family_of(model)
    record = {"problem": "?", "images": [Image.new("RGB", (56, 56), "white")] * n_images}
    try:
        enc = encode_prompts(processor, [record], template, 1, "cpu")
    except Exception as e:  # noqa: BLE001 -- any processor failure is the refusal's reason
        raise ValueError(f"the dataset has prompts of {n_images} images and {fam.name}'s processor cannot encode "
                         f"{n_images} images in one prompt: {type(e).__name__}: {e}") from e
    pixels = enc.get("pixel_values")
    if fam.pixel_layout == "patches":
        entries = len(enc["image_grid_thw"])
    elif pixels is None:
        entries = 0
    elif fam.pixel_layout == "per_sample":  # [1, crops, C, H, W]: the crops that hold pixels
        entries = int(pixels.flatten(2).ne(0).any(-1).sum())
    else:  # "images": one entry per image; "tiles": one per tile
        entries = len(pixels)
    # rows select their images entry by entry where there is one per image; elsewhere one image gives >= 1 entry
    ok = entries == n_images if fam.pixel_layout in ("patches", "images") else entries >= n_images
    if fam.images_per_sample_key is not None and enc.get(fam.images_per_sample_key) is None:
        ok = False  # LLaVA-OneVision without it tiles every image as a lone one and the placeholder count breaks
    n_ph = int(model_family.visual_mask(model, enc["input_ids"]).sum())
    if not ok or n_ph == 0:
        raise ValueError(f"the dataset has prompts of {n_images} images, and {fam.name}'s processor does not lay out "
                         f"{n_images} images per prompt as PGPO selects them ({entries} image entries, {n_ph} "
                         "placeholders): use single-image data with this family, or a newer transformers")
