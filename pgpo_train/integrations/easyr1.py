"""PGPO in EasyR1 (hiyouga/EasyR1, the verl fork the paper trains with): the lines its `fit` needs, as functions.

EasyR1 is not a pip package: a user edits `verl/trainer/ray_trainer.py` in a checkout. These functions keep that
edit to two calls (integrations/README.md, EasyR1) and hold what is easy to get wrong:

- the worker group is `actor_rollout_ref_wg` (`actor_rollout_wg` before mid-2025);
- the text-only twin must carry NO multimodal keys (the uid-cache trap, below);
- image AND video placeholders are masked, read from the model's config (`image_token_id`, `video_token_id`), not
  a hard-coded `<|image_pad|>`;
- positions stay as EasyR1's dataset builds them, `[B, 4, L]` for the Qwen VLMs (text row + 3 mrope rows);
- the per-step check that PGPO ran.

The uid-cache trap. EasyR1's FSDP worker does not receive processed images: before every `compute_log_probs`,
`compute_ref_log_probs` and `update_actor` it builds `multi_modal_inputs` from the batch's `multi_modal_data` and
caches them by the batch's `uid`s (`FSDPWorker._process_multi_modal_inputs`, verl/workers/fsdp_workers.py). A twin
that keeps the uids and carries `{}` per sample therefore goes wrong both ways:
  * with-image pass first (EasyR1's order): the cache for these uids already holds the images, so the `{}` entries
    are replaced by the cached `pixel_values`; the twin's masked placeholders are dropped by padding-free, and
    Qwen's forward fails with "Image features and image tokens do not match: tokens: 0, features 32";
  * twin first, or the cache cleared before it: the `{}` entries are cached under the batch's uids, and the next
    `update_actor` on the same batch trains WITHOUT images, silently.
A twin without `multi_modal_data` / `multi_modal_inputs` skips that method altogether (it returns early when
`multi_modal_data` is absent): no cache read, no cache write, no image kwargs, and the update that follows still
gets the batch's images from the cache.

Versions: checked on EasyR1 main (b44b311, 2026-07-30) and v0.3.2 (a23fb5b), whose `fit`, worker cache and dataset
positions are the same (tests/integrations/test_easyr1_contracts.py encodes what is relied on, file by file).
Environment: EasyR1 pins transformers >= 4.54, < 5 (v0.3.2: <= 4.56.2), pgpo's `train` extra wants >= 5, so install
pgpo there without its dependencies: `pip install --no-deps -e /path/to/pgpo` (pgpo_kernels needs torch and
triton, which EasyR1's environment has). This module, the verl helpers it uses and `pgpo_kernels` need no
transformers of their own (they read the model config's attributes); they import and run under transformers 4.56.2.
"""

from __future__ import annotations

from typing import Any

from pgpo_train.integrations.checks import check_pgpo_ran
from pgpo_train.integrations.verl import pgpo_reshape_advantages_
from pgpo_train.integrations.verl import pgpo_text_only_batch

WORKER_GROUP = "actor_rollout_ref_wg"  # RayPPOTrainer's actor + rollout + ref worker group (EasyR1 since mid-2025)
MULTIMODAL_KEYS = ("multi_modal_data", "multi_modal_inputs")  # what the twin must not carry (the uid-cache trap)
FIT_LOCATION = "EasyR1 RayPPOTrainer.fit, right after compute_advantage (pgpo_train.integrations.easyr1.pgpo_step)"


def text_only_batch(batch: Any, model_config: Any) -> Any:
    """The text-only twin of an EasyR1 batch: the prompt's image and video placeholders masked out of attention
    (ids from `model_config`, a transformers config or model of a family in pgpo_train.models.model_family), the
    positions kept, and no multimodal keys at all (module docstring: the uid-cache trap). `batch` is unchanged."""
    _check_positions(batch, model_config)
    text = pgpo_text_only_batch(batch, model_config, multimodal_keys=())
    for key in MULTIMODAL_KEYS:
        text.non_tensor_batch.pop(key, None)  # a fresh dict: the batch keeps its own
    return text


def pgpo_step(trainer: Any, batch: Any, metrics: dict, *, model_config: Any = None, **options) -> None:
    """One PGPO step in EasyR1's `fit`: the twin's log-probs from the actor, then `advantages *= w~` in place.

    Args:
        trainer: EasyR1's RayPPOTrainer (its `actor_rollout_ref_wg` runs the twin's log-prob pass).
        batch: the DataProto right after `compute_advantage` (`advantages`, `response_mask`, `old_log_probs`).
        metrics: the step's metrics dict; the pgpo/* metrics are added (check_pgpo_ran looks for them).
        model_config: the policy's config; default: AutoConfig of `trainer.config.worker.actor.model.model_path`.
        options: `pgpo_reshape_advantages_`'s (tau, beta, eps, renormalize, min_spread, control, tau_mode, floor).
    """
    worker_group = getattr(trainer, WORKER_GROUP, None)
    if worker_group is None:
        raise AttributeError(f"{type(trainer).__name__} has no {WORKER_GROUP}: this EasyR1 predates the actor / "
                             "rollout / ref worker group (mid-2025); update EasyR1 (tested: main b44b311, v0.3.2)")
    if model_config is None:
        model_config = _policy_config(trainer)
    text = text_only_batch(batch, model_config)
    logp_txt = worker_group.compute_log_probs(text).batch["old_log_probs"]
    _, pgpo_metrics = pgpo_reshape_advantages_(batch, logp_txt=logp_txt, weights_key=None, **options)
    metrics.update(pgpo_metrics)


def check_ran(metrics: dict) -> None:
    """Raise PGPODidNotRunError when this step's metrics lack PGPO's (call right before `self.logger.log`)."""
    check_pgpo_ran(metrics, FIT_LOCATION)


def _policy_config(trainer):
    if getattr(trainer, "_pgpo_policy_config", None) is None:
        from transformers import AutoConfig

        model = trainer.config.worker.actor.model
        trainer._pgpo_policy_config = AutoConfig.from_pretrained(
            model.model_path, trust_remote_code=bool(getattr(model, "trust_remote_code", False)))
    return trainer._pgpo_policy_config


def _check_positions(batch, model_config) -> None:
    from pgpo_train.models import model_family

    positions = batch.batch["position_ids"]
    mrope = model_family.family_of(model_config, "pgpo_train.integrations.easyr1").rope == "mrope"
    if mrope and (positions.dim() != 3 or positions.shape[1] != 4):
        raise ValueError(f"position_ids must be [B, 4, L] for a {getattr(model_config, 'model_type', '?')} policy "
                         "in EasyR1 (text row + 3 mrope rows, as its dataset builds them), got "
                         f"{tuple(positions.shape)}")


__all__ = ["MULTIMODAL_KEYS", "WORKER_GROUP", "check_ran", "pgpo_step", "text_only_batch"]
