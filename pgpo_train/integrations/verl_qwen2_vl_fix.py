"""verl's Qwen2-VL / Qwen2.5-VL forward on a micro-batch without images: fixed on import, a no-op once verl is fixed.

verl 0.9.1, `verl/models/transformers/qwen2_vl.py`, `_get_input_embeds`: for a micro-batch without pixel values it
runs the vision tower on a dummy image (so that every FSDP rank gathers the tower's shards) and adds 0 x its mean:

    image_embeds = model.visual(pixel_values, grid_thw=image_grid_thw)
    inputs_embeds = inputs_embeds + 0.0 * image_embeds.mean()

Under transformers 5 (every version verl 0.9.1 accepts) the tower returns a `BaseModelOutputWithPooling`, so the
second line raises `AttributeError: 'BaseModelOutputWithPooling' object has no attribute 'mean'`. PGPO's text-only
twin never has images, so without this fix every PGPO step crashes in its first text-only log-prob pass. The fix is
the one verl's image branch (and its Qwen3-VL module) already applies: take the tower's output through verl's
`unpack_visual_output` first. Nothing else changes: same dummy pass, same `0.0 x mean` term, same collectives.

Use it in the workers, where the model runs: verl imports `actor_rollout_ref.model.external_lib` in every worker
before it builds the model, so

    actor_rollout_ref.model.external_lib=pgpo_train.integrations.verl_qwen2_vl_fix

`PGPOVerlTrainerMixin` refuses to start a Qwen2-VL / Qwen2.5-VL run on an affected verl without it. `apply()` checks
verl's source for the two lines above and patches only when they are there, so on a verl that has fixed the
branch (or under transformers 4, whose tower returns a tensor) importing this module changes nothing.
"""

from __future__ import annotations

import inspect
import re

# the two lines of the broken branch, as verl 0.9.1 writes them (whitespace-insensitive)
_BROKEN_BRANCH = re.compile(
    r"image_embeds\s*=\s*model\.visual\(pixel_values,\s*grid_thw=image_grid_thw\)\s*\n"
    r"\s*inputs_embeds\s*=\s*inputs_embeds\s*\+\s*0\.0\s*\*\s*image_embeds\.mean\(\)")
VERL_LINE = "verl/models/transformers/qwen2_vl.py, _get_input_embeds: `0.0 * image_embeds.mean()`"


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _verl_get_input_embeds():
    try:
        from verl.models.transformers import qwen2_vl
    except (ImportError, AttributeError):  # no verl, or one whose Qwen2-VL module does not import here
        return None
    return getattr(qwen2_vl, "_get_input_embeds", None)


def verl_is_affected() -> bool:
    """True when the installed verl's own no-image branch (patched here or not) calls `.mean()` on the raw tower
    output and the installed transformers returns an output object from the tower (transformers >= 5)."""
    fn = _verl_get_input_embeds()
    if fn is None:
        return False
    try:
        source = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return False
    return bool(_BROKEN_BRANCH.search(source)) and transformers_major() >= 5


def needs_fix() -> bool:
    """True when verl is affected and this process has not applied the fix yet."""
    fn = _verl_get_input_embeds()
    return fn is not None and not getattr(fn, "_pgpo_fixed", False) and verl_is_affected()


def apply() -> bool:
    """Patch verl's `_get_input_embeds` where `needs_fix()`; returns whether it patched. Idempotent."""
    if not needs_fix():
        return False
    import torch
    from verl.models.transformers import qwen2_vl
    from verl.utils.transformers_compat import unpack_visual_output

    original = qwen2_vl._get_input_embeds

    def _get_input_embeds(model, input_ids, attention_mask=None, pixel_values=None, pixel_values_videos=None,
                          image_grid_thw=None, video_grid_thw=None):
        if pixel_values is not None or pixel_values_videos is not None:
            return original(model, input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw,
                            video_grid_thw)
        # verl's own no-image branch, with the tower output unpacked as its image branch does
        inputs_embeds = model.get_input_embeddings()(input_ids)
        config = model.config.vision_config
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        dummy = torch.zeros((16, patch_dim), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        grid = torch.tensor([[1, 4, 4]], dtype=torch.long, device=inputs_embeds.device)
        image_embeds, _ = unpack_visual_output(model.visual(dummy, grid_thw=grid))
        inputs_embeds = inputs_embeds + 0.0 * image_embeds.mean()
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        return inputs_embeds, attention_mask

    _get_input_embeds._pgpo_fixed = True
    _get_input_embeds.__wrapped__ = original
    qwen2_vl._get_input_embeds = _get_input_embeds
    return True


APPLIED = apply()  # on import: verl's external_lib hook imports this module in every worker

__all__ = ["APPLIED", "VERL_LINE", "apply", "needs_fix", "verl_is_affected"]
