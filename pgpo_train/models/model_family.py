"""What PGPO needs to know about each vision-language model family, in one place (docs/method.md#families).

For a given HF VLM this module knows
- its visual placeholder ids (the tokens the vision tower's outputs replace) and the visual special ids that must
  never be sampled in a response (placeholders plus image delimiters);
- how to build explicit position ids for a full prompt + response batch: 3-D mrope from the model's own
  `get_rope_index` for the Qwen-VL family, `cumsum(attention_mask) - 1` for 1-D rope models;
- the forward kwargs of the visual pass and of the text-only pass (same tensors, attention off on the visual
  placeholders, the original positions, no pixel values: for Qwen3-VL that also means no DeepStack injection;
  for Idefics3 / SmolVLM attention is off on each image's whole span, the crop-grid tags included, `image_spans`).

Response tokens are always text. Positions are built with the rope index over the prompt only and the response
continuing the text positions, and only the prompt's placeholders are masked, so a placeholder id sampled inside a
response is never counted as an image. The sampler should not emit them anyway: `special_ids` is what
rollouts pass as `suppress_tokens`.

Known limit (Gemma 3): its local layers' sliding window is counted in token slots, not positions. While a sequence
is shorter than the window (1024 in Gemma 3 4B+) masking equals deleting the image tokens (tested); beyond it the
masked image tokens still take window slots, so local layers see fewer text tokens than deletion would. The
text-only pass stays the masked pass (docs/method.md#families).

PEFT-wrapped models (and DDP/accelerate `.module` wrappers) are unwrapped for lookups; forwards run on the model as
given, wrapper included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """One VLM family: how its image enters the sequence and how its positions are built."""

    name: str  # what users read in messages and docs/method.md#families
    model_types: tuple[str, ...]  # config.model_type values of the family
    rope: str  # "mrope" (3-D, get_rope_index) or "1d" (cumsum of the attention mask)
    placeholder_attrs: tuple[str, ...] = ("image_token_id", "video_token_id")
    delimiter_attrs: tuple[str, ...] = ()  # config ids that open/close an image: suppressed in sampling too
    # per-token ids the visual pass feeds the model: "mm_token_type_ids" (Qwen), "token_type_ids" (Gemma 3)
    token_type_key: str | None = None
    # how the processor lays pixel_values out, which is how rows of a batch select their images (select_images):
    # "patches" [patches, C'] owned image by image through image_grid_thw.prod(-1) (Qwen-VL); "images" [images, ...]
    # one entry per image (Gemma 3, LLaVA-OneVision); "per_sample" [B, images, C, H, W] with pixel_attention_mask
    # (Idefics3, SmolVLM); "tiles" [tiles, C, H, W] with a tile count per sample (InternVL)
    pixel_layout: str = "images"
    # "placeholders": the text-only pass masks the placeholder tokens; "fake_token_span" (Idefics3 / SmolVLM): it
    # masks each image's whole span, <fake_token_around_image> to <fake_token_around_image> (see image_spans)
    text_only_span: str = "placeholders"
    # the per-sample image count the model's forward needs to read several images per prompt, as the processor names
    # it (LLaVA-OneVision: batch_num_images, which decides how each image is tiled); None: the layout says it all
    images_per_sample_key: str | None = None


PIXEL_LAYOUTS = ("patches", "images", "per_sample", "tiles")


FAMILIES: tuple[Family, ...] = (
    Family("Qwen2-VL", ("qwen2_vl",), "mrope", delimiter_attrs=("vision_start_token_id", "vision_end_token_id"),
           token_type_key="mm_token_type_ids", pixel_layout="patches"),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), "mrope", delimiter_attrs=("vision_start_token_id", "vision_end_token_id"),
           token_type_key="mm_token_type_ids", pixel_layout="patches"),
    # Qwen3-VL: interleaved mrope; its DeepStack visual features enter only with pixel values
    Family("Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe"), "mrope",
           delimiter_attrs=("vision_start_token_id", "vision_end_token_id"), token_type_key="mm_token_type_ids",
           pixel_layout="patches"),
    Family("Gemma 3", ("gemma3",), "1d", delimiter_attrs=("boi_token_id", "eoi_token_id"),
           token_type_key="token_type_ids"),
    Family("LLaVA-OneVision", ("llava_onevision",), "1d", images_per_sample_key="batch_num_images"),
    Family("Idefics3", ("idefics3",), "1d", pixel_layout="per_sample", text_only_span="fake_token_span"),
    Family("SmolVLM", ("smolvlm",), "1d", pixel_layout="per_sample", text_only_span="fake_token_span"),
    Family("InternVL (HF)", ("internvl",), "1d", pixel_layout="tiles"),
)


def supported_families() -> str:
    """'Qwen2-VL, Qwen2.5-VL, ...' for messages and docs."""
    return ", ".join(f.name for f in FAMILIES)


def unwrap(model):
    """The bare HF model under PEFT (`get_base_model`) and DDP/accelerate (`.module`) wrappers, for lookups only."""
    for _ in range(8):  # wrappers nest (DDP around PEFT): peel a few layers, never loop forever
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model
    return model


VISION_TOWER_ATTRS = ("visual", "vision_tower", "vision_model")  # Qwen-VL | Gemma 3, LLaVA, InternVL | Idefics3


def vision_tower(model) -> torch.nn.Module:
    """The vision encoder module of a supported VLM (for --freeze-vision): `visual` on the Qwen-VL family,
    `vision_tower` or `vision_model` on the others, on the model or its inner `.model`."""
    base = unwrap(model)
    for owner in (getattr(base, "model", None), base):
        for attr in VISION_TOWER_ATTRS:
            tower = getattr(owner, attr, None) if owner is not None else None
            if isinstance(tower, torch.nn.Module):
                return tower
    raise ValueError(f"{type(base).__name__} has none of {VISION_TOWER_ATTRS}: cannot find its vision tower")


def _config(model_or_config):
    cfg = getattr(unwrap(model_or_config), "config", None)
    return cfg if cfg is not None else model_or_config


def find_family(model_or_config) -> Family | None:
    """The family of a model (wrapped or not) or of its config, None when unsupported."""
    model_type = getattr(_config(model_or_config), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of(model_or_config, who: str = "PGPO") -> Family:
    """The family, or one ValueError naming the supported families (text-only and unknown models alike)."""
    fam = find_family(model_or_config)
    if fam is None:
        cfg = _config(model_or_config)
        model_type = getattr(cfg, "model_type", None)
        name = type(unwrap(model_or_config)).__name__
        raise ValueError(
            f"{who}: model {name} (model_type={model_type!r}) has no image tokens PGPO knows how to mask: PGPO "
            f"masks the image's placeholder tokens out of a second forward, so it needs a VLM whose image enters as "
            f"placeholder tokens; supported families: {supported_families()} (e.g. Qwen/Qwen2.5-VL-3B-Instruct)"
        )
    return fam


def check_vlm(model, who: str = "PGPO") -> Family:
    """Refuses an unsupported model or one whose config lacks the image placeholder id; returns its family."""
    fam = family_of(model, who)
    if not placeholder_ids(model):
        raise ValueError(f"{who}: {fam.name} model {type(unwrap(model)).__name__} defines no image_token_id in its "
                         "config: PGPO needs the image placeholder id to mask")
    if fam.rope == "mrope" and _rope_owner(model) is None:
        raise ValueError(f"{who}: {fam.name} model {type(unwrap(model)).__name__} has no get_rope_index")
    return fam


def check_processor(model, processor, who: str = "PGPO") -> Family:
    """check_vlm, and refuses a processor whose image placeholder token is not the model's image_token_id."""
    fam = check_vlm(model, who)
    image_token_id = _config(model).image_token_id
    tok = processor.tokenizer
    # the placeholder the image expands to (Gemma 3's processor names its <start_of_image>, the tokenizer the soft token)
    image_token = getattr(tok, "image_token", None) or getattr(processor, "image_token", "<|image_pad|>")
    if tok.convert_tokens_to_ids(image_token) != image_token_id:
        raise ValueError(
            f"{who}: tokenizer's {image_token!r} id {tok.convert_tokens_to_ids(image_token)} != model image_token_id "
            f"{image_token_id}: model and processor do not match"
        )
    return fam


def _ids(config, attrs) -> list[int]:
    ids = []
    for a in attrs:
        v = getattr(config, a, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def placeholder_ids(model) -> list[int]:
    """Ids of the visual placeholder tokens (image, and video where defined): the ones the text-only pass masks."""
    fam = family_of(model)
    return _ids(_config(model), fam.placeholder_attrs)


def special_ids(model) -> list[int]:
    """Placeholder and image-delimiter ids: never to be sampled in a response (pass as `suppress_tokens`)."""
    fam = family_of(model)
    return _ids(_config(model), fam.placeholder_attrs + fam.delimiter_attrs)


def _rope_owner(model):
    """The module that owns `get_rope_index` (the inner ...VLModel of a ...ForConditionalGeneration)."""
    base = unwrap(model)
    return next((m for m in (base, getattr(base, "model", None)) if hasattr(m, "get_rope_index")), None)


def _prompt_part(x: torch.Tensor, prompt_len: int | None) -> torch.Tensor:
    return x if prompt_len is None else x[:, :prompt_len]


def _check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int | None) -> None:
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if prompt_len is not None and not 0 <= prompt_len <= input_ids.shape[1]:
        raise ValueError(f"prompt_len must be in [0, L={input_ids.shape[1]}], got {prompt_len}")


def visual_mask(model, input_ids: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] bool, True on the prompt's visual placeholders (response tokens, from `prompt_len` on, are text)."""
    return id_mask(input_ids, placeholder_ids(model), prompt_len)


def id_mask(input_ids: torch.Tensor, ids, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] bool, True on the prompt's tokens whose id is in `ids` (from `prompt_len` on: response, text), for
    callers that hold the placeholder ids rather than the model (verl's driver)."""
    mask = torch.isin(input_ids, torch.as_tensor(list(ids), device=input_ids.device))
    if prompt_len is not None:
        mask[:, prompt_len:] = False
    return mask


def token_types(model, input_ids: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] int64: 0 text, 1 image, 2 video placeholder (prompt only), as the processors write them."""
    cfg = _config(model)
    out = torch.zeros_like(input_ids)
    prompt = _prompt_part(input_ids, prompt_len)
    view = out[:, : prompt.shape[1]]
    view[prompt == cfg.image_token_id] = 1
    video = getattr(cfg, "video_token_id", None)
    if video is not None and video != cfg.image_token_id:
        view[prompt == video] = 2
    return out


def _text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] cumsum(attention_mask) - 1, 0 on padding (as HF generate builds them)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def position_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompt_len: int | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit position ids of a full (prompt + response) batch: [3, B, L] (mrope) or [B, L] (1-D rope).

    Build them for every forward of a training step (stale `rope_deltas` from generate(), holed masks in the
    text-only pass: docs/method.md#trainer-traps).

    Args:
        model: the policy (wrapped or not).
        input_ids: [B, L] prompt (left-padded, placeholders expanded) then response (right-padded).
        attention_mask: [B, L] 1 on real tokens (the visual pass's mask, not the text-only one).
        prompt_len: where responses start; tokens from there on are text whatever their id (a sampled placeholder
            is not an image). None = the whole sequence is prompt.
        image_grid_thw, video_grid_thw, second_per_grid_ts: the Qwen-VL processor's outputs (mrope only).

    Returns:
        int64 positions; padding holds 0 (masked anyway).
    """
    _check_batch(input_ids, attention_mask, prompt_len)
    fam = family_of(model)
    if fam.rope == "1d":
        return _text_positions(attention_mask)
    prompt_ids = _prompt_part(input_ids, prompt_len)
    prompt_mask = _prompt_part(attention_mask, prompt_len)
    if image_grid_thw is None and video_grid_thw is None:
        pos = _text_positions(attention_mask)  # no image: plain text positions on all three axes
        return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
    kwargs = {"second_per_grid_ts": second_per_grid_ts} if second_per_grid_ts is not None else {}
    prompt_pos, _ = _rope_owner(model).get_rope_index(
        prompt_ids, mm_token_type_ids=token_types(model, prompt_ids), image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw, attention_mask=prompt_mask, **kwargs)  # [3, B, P]
    if prompt_len is None or prompt_len == input_ids.shape[1]:
        return prompt_pos
    # responses continue the text positions: the next position after the prompt's largest, then one per token
    start = prompt_pos.masked_fill(prompt_mask[None] == 0, -1).amax(dim=(0, 2)) + 1  # [B]
    resp_mask = attention_mask[:, prompt_len:]
    resp = (start[:, None] + _text_positions(resp_mask)).masked_fill(resp_mask == 0, 0)  # [B, T]
    return torch.cat([prompt_pos, resp.unsqueeze(0).expand(3, -1, -1).to(prompt_pos.dtype)], dim=2)


def _check_positions(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    fam = family_of(model)
    want = (3, *input_ids.shape) if fam.rope == "mrope" else tuple(input_ids.shape)
    if tuple(position_ids.shape) != want:
        kind = "3-D mrope" if fam.rope == "mrope" else "1-D"
        raise ValueError(f"position_ids must be {list(want)} for {fam.name} ({kind} positions from "
                         f"model_family.position_ids on the full visual inputs), got {tuple(position_ids.shape)}")


def image_spans(model, input_ids: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] bool, True on every token of each prompt image's span in the Idefics3 / SmolVLM layout.

    Their processors write an image as `<fake_token_around_image><global-img><image>*N<fake_token_around_image>`,
    or, split into a rows x cols grid of crops (their default), as one `<fake_token_around_image><row_i_col_j>
    <image>*N` per crop, a newline after each row, then a newline and the global image as above. The grid tags, the
    newlines and the fake tokens describe the image (its crop grid, hence its aspect ratio): they go with it. The
    span is what transformers' own Idefics3Processor marks in `mm_token_type_ids`: from an image's first fake token
    through its closing one. The token ids are read from the layout itself (the config holds only image_token_id):
    every run of `<image>` tokens follows a fake token and a tag; the tag of the last run is `<global-img>`, which
    closes each image, and the token after its run is the closing fake token. A layout that does not fit is an error.
    """
    image = _config(model).image_token_id
    prompt = _prompt_part(input_ids, prompt_len)
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    is_img = prompt == image
    starts = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]  # first <image> of each run
    ends = is_img & ~torch.nn.functional.pad(is_img, (0, 1))[:, 1:]  # last <image> of each run
    for b in range(prompt.shape[0]):
        s_idx, e_idx = starts[b].nonzero().flatten().tolist(), ends[b].nonzero().flatten().tolist()
        if not s_idx:
            continue
        row = prompt[b].tolist()
        if s_idx[0] < 2:
            raise ValueError(f"row {b}: an <image> run starts at {s_idx[0]}, with no <fake_token_around_image> and "
                             "tag before it: not the Idefics3 / SmolVLM image layout")
        fake, global_tag = row[s_idx[0] - 2], row[s_idx[-1] - 1]
        block_start = None
        for s, e in zip(s_idx, e_idx):
            if s < 2 or row[s - 2] != fake:
                raise ValueError(f"row {b}: the <image> run at {s} is not preceded by <fake_token_around_image> (id "
                                 f"{fake}) and a tag: not the Idefics3 / SmolVLM image layout")
            block_start = s - 2 if block_start is None else block_start
            if row[s - 1] == global_tag:  # the global image closes this image's span
                if e + 1 >= len(row) or row[e + 1] != fake:
                    raise ValueError(f"row {b}: the global image at {s} is not closed by <fake_token_around_image> "
                                     f"(id {fake}): not the Idefics3 / SmolVLM image layout")
                out[b, block_start:e + 2] = True
                block_start = None
    return out


def text_only_mask(model, input_ids: torch.Tensor, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] bool, True on the prompt tokens the text-only pass switches off: the visual placeholders, and for
    Idefics3 / SmolVLM each image's whole span (its grid tags and delimiters, `image_spans`)."""
    if family_of(model).text_only_span == "fake_token_span":
        return image_spans(model, input_ids, prompt_len)
    return visual_mask(model, input_ids, prompt_len)


def text_only_attention_mask(model, input_ids, attention_mask, prompt_len: int | None = None) -> torch.Tensor:
    """[B, L] the visual pass's attention mask with the prompt's image tokens switched off (`text_only_mask`)."""
    return attention_mask * (~text_only_mask(model, input_ids, prompt_len)).to(attention_mask.dtype)


def text_only_inputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_len: int | None = None,
) -> dict:
    """Forward kwargs of the text-only pass (docs/method.md#text-only-pass): same ids and positions, visual
    placeholders unattended, no pixel values (no vision tower, no DeepStack features; the placeholders keep plain
    embeddings no token sees).

    Args:
        model: the policy. input_ids, attention_mask: [B, L] as in the visual pass. position_ids: from
        `position_ids` on the full visual inputs. prompt_len: where responses start (None = all prompt).
    """
    _check_positions(model, input_ids, position_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": text_only_attention_mask(model, input_ids, attention_mask, prompt_len),
        "position_ids": position_ids,
    }


# multimodal kwargs the visual pass passes through as the processor wrote them
# (batch_num_images [B]: LLaVA-OneVision's images per sample, which decide how each image is tiled)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "video_grid_thw", "pixel_values_videos", "second_per_grid_ts",
                   "image_sizes", "pixel_attention_mask", "batch_num_images")


def visual_inputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    multimodal: dict | None = None,
    prompt_len: int | None = None,
) -> dict:
    """Forward kwargs of the visual pass with the same explicit positions.

    Args:
        multimodal: the processor's image tensors for these rows (pixel_values, image_grid_thw, image_sizes,
            pixel_attention_mask, ...); None or without pixel_values = no image.
        prompt_len: where responses start; the family's token-type ids (Qwen mm_token_type_ids, Gemma 3
            token_type_ids) mark only the prompt's placeholders.
    """
    _check_positions(model, input_ids, position_ids)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    multimodal = multimodal or {}
    if multimodal.get("pixel_values") is None and multimodal.get("pixel_values_videos") is None:
        return out
    out.update({k: v for k, v in multimodal.items() if k in MULTIMODAL_KEYS and v is not None})
    key = family_of(model).token_type_key
    if key is not None:
        out[key] = token_types(model, input_ids, prompt_len)
    return out


def check_responses_are_text(model, responses: torch.Tensor, response_mask: torch.Tensor | None = None) -> None:
    """A visual placeholder inside a response makes the model's own visual forward count it as an image (its
    feature count check fails deep inside transformers): refuse such a batch with the fix in the message."""
    found = torch.isin(responses, torch.tensor(placeholder_ids(model), device=responses.device))
    if response_mask is not None:
        found &= response_mask.bool()
    if bool(found.any()):
        row, col = (int(i) for i in found.nonzero()[0])
        raise ValueError(
            f"response {row} holds the visual placeholder id {int(responses[row, col])} at position {col}: the "
            "visual forward would count it as an image. Keep visual special ids out of sampling "
            f"(generate(..., suppress_tokens={special_ids(model)}), pgpo_train.models.model_family.special_ids)"
        )


def select_images(model, multimodal: dict, samples, *, num_images=None, num_tiles=None) -> dict:
    """The image tensors of some samples of a batch, in the order given: the one row selector of the project (the
    loop's micro-batches and refill, TRL's chunks). pixel_values are split by image, never evenly
    (docs/method.md#trainer-traps); the family's `pixel_layout` says how (see Family).

    Args:
        model: the policy (its family gives the layout), its config, or the Family itself.
        multimodal: the batch's image tensors as the processor wrote them (pixel_values, image_grid_thw,
            image_sizes, pixel_attention_mask; other keys are ignored).
        samples: sample indices (ints or a 1-D tensor), in the order wanted; repeats allowed.
        num_images: images per sample (None = the batch's batch_num_images where the processor wrote it, else one
            each); num_tiles: tiles per sample (the "tiles" layout needs it).

    Returns:
        dict with those samples' pixel_values (and image_grid_thw / image_sizes / pixel_attention_mask where the
        batch has them); {} when the batch or the chosen samples hold no image.
    """
    pixels = multimodal.get("pixel_values")
    if pixels is None:
        return {}
    samples = [int(i) for i in samples]
    fam = model if isinstance(model, Family) else family_of(model)
    layout = fam.pixel_layout
    if num_images is None and multimodal.get("batch_num_images") is not None:
        num_images = multimodal["batch_num_images"].tolist()
    if num_images is None:
        images = samples  # one image per sample: image i is sample i's
    else:
        first = [0]
        for n in num_images:
            first.append(first[-1] + int(n))
        images = [j for i in samples for j in range(first[i], first[i + 1])]
    out = {}
    if layout == "patches":  # image j owns image_grid_thw[j].prod() rows of pixel_values
        grid = multimodal["image_grid_thw"]
        per_image = torch.split(pixels, grid.prod(-1).tolist())
        if images:
            out["pixel_values"] = torch.cat([per_image[j] for j in images])
            out["image_grid_thw"] = grid[images]
    elif layout == "tiles":
        if num_tiles is None:
            raise ValueError(f"{fam.name} tiles each image into crops: select_images needs num_tiles "
                             "(tiles per sample) to split pixel_values [tiles, C, H, W] by sample")
        tiles = torch.split(pixels, [int(n) for n in num_tiles])
        if samples:
            out["pixel_values"] = torch.cat([tiles[i] for i in samples])
    elif layout == "per_sample":  # [B, images, C, H, W]: indexed by sample
        out["pixel_values"] = pixels[samples]
    else:  # "images": [images, ...]
        out["pixel_values"] = pixels[images]
    for key in ("pixel_attention_mask", "batch_num_images"):  # per sample
        if multimodal.get(key) is not None:
            out[key] = multimodal[key][samples]
    if multimodal.get("image_sizes") is not None:
        out["image_sizes"] = multimodal["image_sizes"][images]
    if out.get("pixel_values") is None or out["pixel_values"].numel() == 0:
        return {}  # these samples have no image
    return out


def num_tiles(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, prompt_len: int | None = None):
    """[B] tiles per row for the "tiles" layout (InternVL): every tile expands to the same number of placeholders,
    so a row's tiles are its share of the batch's placeholders. None for the other layouts."""
    if family_of(model).pixel_layout != "tiles" or pixel_values is None:
        return None
    n_ph = visual_mask(model, input_ids, prompt_len).sum(-1)  # [B]
    return n_ph * pixel_values.shape[0] // n_ph.sum().clamp(min=1)
