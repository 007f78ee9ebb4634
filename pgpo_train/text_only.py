"""The text-only pass of PGPO for Qwen2.5-VL (SPEC section 1), explicit 3-D (mrope) position ids, and the
per-sample split of pixel_values (SPEC section 4). The family-independent layer is pgpo_train.model_family; the
names here are kept for their callers and delegate to it.

The text-only pass reuses the visual pass's tensors: the same input ids and the same 3-D position ids, computed
from the full visual inputs, with the attention mask set to False on every visual placeholder token. Since those
tokens are never attended, the vision tower is skipped: no pixel_values are passed and the placeholders keep their
plain token embeddings (whatever they hold cannot reach any other token).

Three traps this module exists for (SPEC sections 1 and 4):
- without explicit position ids the model recomputes positions from the holed attention mask (wrong positions);
- transformers 5.x builds 3-D mrope positions only when `mm_token_type_ids` is given, else silently 1-D;
- `generate()` leaves `rope_deltas` on the model; a later forward must not rely on them. We build position ids
  explicitly for every forward of the training step.
"""

from __future__ import annotations

import torch

from pgpo_train import model_family


def _rope_index_owner(model):
    """The module that owns `get_rope_index` (PEFT/DDP wrappers unwrapped), else None."""
    return model_family._rope_owner(model)


def _inner_model(model):
    """The module that owns `get_rope_index` (Qwen2_5_VLModel inside ...ForConditionalGeneration)."""
    owner = _rope_index_owner(model)
    if owner is not None:
        return owner
    raise ValueError(
        f"{type(model).__name__} has no get_rope_index: 3-D (mrope) positions need a Qwen-VL family model; "
        f"1-D rope families use pgpo_train.model_family.position_ids (supported: {model_family.supported_families()})"
    )


def check_mrope_vlm(model, who: str = "PGPO") -> None:
    """Refuses a model PGPO cannot run (kept name; every family of pgpo_train.model_family is accepted now)."""
    model_family.check_vlm(model, who)


def image_token_ids(config) -> list[int]:
    """Ids of the visual placeholder tokens (image, and video when defined) of a VLM config."""
    ids = [getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)]
    ids = [i for i in ids if i is not None]
    if not ids:
        raise ValueError(f"model config {type(config).__name__} defines no image_token_id: not a vision-language model")
    return ids


def visual_token_mask(input_ids: torch.Tensor, config) -> torch.Tensor:
    """[B, L] bool, True on visual placeholder tokens (the ones the vision tower's outputs replace)."""
    return torch.isin(input_ids, torch.tensor(image_token_ids(config), device=input_ids.device))


def mm_token_type_ids_for(input_ids: torch.Tensor, config) -> torch.Tensor:
    """[B, L] int64: 0 text, 1 image, 2 video, as Qwen2.5-VL's processor writes them (needed for 3-D positions)."""
    out = torch.zeros_like(input_ids)
    out[input_ids == config.image_token_id] = 1
    video_id = getattr(config, "video_token_id", None)
    if video_id is not None:
        out[input_ids == video_id] = 2
    return out


def mrope_position_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    prompt_len: int | None = None,
) -> torch.Tensor:
    """3-D (temporal, height, width) rope position ids of a full (prompt + response) batch, built explicitly.

    Call this for every forward of the training step rather than letting the model infer positions (SPEC section 4:
    stale rope_deltas from generate(), holed masks in the text-only pass).

    Args:
        model: a Qwen-VL family ...ForConditionalGeneration (or its inner model, or a PEFT wrapper).
        input_ids: [B, L] with the image placeholders expanded, left or right padded.
        attention_mask: [B, L] 1 on real tokens, 0 on padding (the visual pass's mask, not the text-only one).
        image_grid_thw: [n_images, 3], images in batch order.
        mm_token_type_ids: [B, L] 0/1/2 from the processor (responses 0); when given, the rope index runs over the
            whole sequence with these types. When None, the rope index runs over the prompt (`prompt_len`) and the
            responses continue the text positions, so a placeholder id sampled in a response is text.
        video_grid_thw: [n_videos, 3] or None.
        prompt_len: where responses start (None = the whole sequence is prompt).

    Returns:
        [3, B, L] int64 position ids (padding positions hold 0 and are masked anyway).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    inner = _inner_model(model)
    if mm_token_type_ids is None or (image_grid_thw is None and video_grid_thw is None):
        return model_family.position_ids(model, input_ids, attention_mask, prompt_len=prompt_len,
                                         image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
    position_ids, _ = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
    )
    return position_ids  # [3, B, L]


def text_only_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, config) -> torch.Tensor:
    """[B, L] the visual pass's attention mask with every visual placeholder token switched off."""
    return attention_mask * (~visual_token_mask(input_ids, config)).to(attention_mask.dtype)


def text_only_inputs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_len: int | None = None,
) -> dict:
    """Forward kwargs of the text-only pass (SPEC section 1): same ids, same positions, visual tokens unattended.

    No pixel_values: the vision tower does not run and the placeholders keep their plain token embeddings, which no
    other token can attend to. Any family of pgpo_train.model_family (this is `model_family.text_only_inputs`).

    Args:
        model: the policy (its config gives the visual token ids).
        input_ids: [B, L] full sequences as in the visual pass.
        attention_mask: [B, L] the visual pass's mask.
        position_ids: [3, B, L] (mrope) or [B, L] (1-D rope) on the full visual inputs.
        prompt_len: where responses start: only the prompt's placeholders are masked (None = all prompt).

    Returns:
        dict(input_ids, attention_mask, position_ids) for `model(**kwargs)`.
    """
    if model_family.family_of(model).rope == "mrope" and (
        position_ids.dim() != 3 or position_ids.shape[0] != 3 or position_ids.shape[1:] != input_ids.shape
    ):
        raise ValueError(
            f"position_ids must be [3, B, L] = [3, {input_ids.shape[0]}, {input_ids.shape[1]}] (3-D mrope positions "
            f"from the full visual inputs), got {tuple(position_ids.shape)}"
        )
    return model_family.text_only_inputs(model, input_ids, attention_mask, position_ids, prompt_len)


def visual_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
) -> dict:
    """Forward kwargs of the Qwen-VL visual pass, with the same explicit 3-D position ids (other families:
    `model_family.visual_inputs`)."""
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
        out["image_grid_thw"] = image_grid_thw
    return out


def select_images(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    samples,
    num_images: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw of some samples of a batch (SPEC section 4: split by image, not evenly).

    Args:
        pixel_values: [n_patches, C] all images' patches, images in batch order.
        image_grid_thw: [n_images, 3]; image i owns image_grid_thw[i].prod() rows of pixel_values.
        samples: sample indices (ints, in the order wanted).
        num_images: images per sample; None = one each.

    Returns:
        (pixel_values [n_patches', C], image_grid_thw [n_images', 3]) of those samples' images, in that order.
    """
    per_image = torch.split(pixel_values, image_grid_thw.prod(-1).tolist())
    counts = num_images if num_images is not None else [1] * len(per_image)
    first = [0]
    for n in counts:
        first.append(first[-1] + n)
    images = [j for i in samples for j in range(first[i], first[i + 1])]
    if not images:  # samples without images (TRL allows them): empty, as a slice would be
        return pixel_values[:0], image_grid_thw[:0]
    return torch.cat([per_image[j] for j in images]), image_grid_thw[images]
