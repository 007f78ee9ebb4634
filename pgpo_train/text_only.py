"""Deprecated: every name here is a thin alias of `pgpo_train.model_family` (the one home of what PGPO needs to know
about a VLM family: placeholder ids, explicit positions, the visual and text-only passes, image selection). Kept for
one release for code that imported them; each use warns. New code imports pgpo_train.model_family.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from pgpo_train import model_family

# old name -> (new home, how to call it)
_MOVED = {
    "check_mrope_vlm": "model_family.check_vlm(model, who)",
    "image_token_ids": "model_family.placeholder_ids(model_or_config)",
    "visual_token_mask": "model_family.visual_mask(model_or_config, input_ids)",
    "mm_token_type_ids_for": "model_family.token_types(model_or_config, input_ids)",
    "mrope_position_ids": "model_family.position_ids(model, input_ids, attention_mask, prompt_len=..., "
    "image_grid_thw=...)",
    "text_only_attention_mask": "model_family.text_only_attention_mask(model_or_config, input_ids, attention_mask)",
    "text_only_inputs": "model_family.text_only_inputs",
    "visual_inputs": "model_family.visual_inputs(model, input_ids, attention_mask, position_ids, multimodal)",
    "select_images": "model_family.select_images(model, multimodal, samples, num_images=...)",
}


def _warn(name: str) -> None:
    warnings.warn(f"pgpo_train.text_only.{name} is deprecated and goes in the next release; use {_MOVED[name]}",
                  DeprecationWarning, stacklevel=3)


def check_mrope_vlm(model, who: str = "PGPO") -> None:
    _warn("check_mrope_vlm")
    model_family.check_vlm(model, who)


def image_token_ids(config) -> list[int]:
    _warn("image_token_ids")
    return model_family.placeholder_ids(config)


def visual_token_mask(input_ids: torch.Tensor, config) -> torch.Tensor:
    _warn("visual_token_mask")
    return model_family.visual_mask(config, input_ids)


def mm_token_type_ids_for(input_ids: torch.Tensor, config) -> torch.Tensor:
    _warn("mm_token_type_ids_for")
    return model_family.token_types(config, input_ids)


def mrope_position_ids(model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids=None, video_grid_thw=None,
                       prompt_len=None) -> torch.Tensor:
    """mm_token_type_ids is ignored: the family's own token types are rebuilt from the ids (the same ones)."""
    _warn("mrope_position_ids")
    return model_family.position_ids(model, input_ids, attention_mask, prompt_len=prompt_len,
                                     image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)


def text_only_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, config) -> torch.Tensor:
    _warn("text_only_attention_mask")
    return model_family.text_only_attention_mask(config, input_ids, attention_mask)


def text_only_inputs(model, input_ids, attention_mask, position_ids, prompt_len=None) -> dict:
    _warn("text_only_inputs")
    return model_family.text_only_inputs(model, input_ids, attention_mask, position_ids, prompt_len)


def visual_inputs(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw) -> dict:
    """The old Qwen-only 5-tensor form (no model, so no token types: positions are explicit anyway)."""
    _warn("visual_inputs")
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if pixel_values is not None:
        out.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    return out


def select_images(pixel_values, image_grid_thw, samples, num_images=None):
    """The old Qwen-only form: (pixel_values, image_grid_thw) of some samples, empty when they hold no image."""
    _warn("select_images")
    qwen = model_family.find_family(SimpleNamespace(model_type="qwen2_5_vl"))  # the "patches" layout of these two
    out = model_family.select_images(qwen, {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}, samples,
                                     num_images=num_images)
    if not out:
        return pixel_values[:0], image_grid_thw[:0]
    return out["pixel_values"], out["image_grid_thw"]
