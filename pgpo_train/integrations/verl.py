"""PGPO for verl and EasyR1: reshape the advantages of a rollout batch in place, after `compute_advantage`.

verl (and EasyR1, its fork) keeps a rollout batch as a `DataProto`: `batch.batch` is a TensorDict with
`advantages` [B, T_resp] (GRPO/DAPO: the group-normalized score broadcast over `response_mask`), `response_mask`
[B, T_resp], `old_log_probs` [B, T_resp] (the visual pass, at the rollout temperature), `input_ids` /
`attention_mask` [B, L] and `position_ids` ([B, L], or [B, 3 | 4, L] for Qwen2.5-VL's mrope); the processed images
sit in `batch.non_tensor_batch["multi_modal_inputs"]`, one dict per sample.

Neither verl nor EasyR1 is imported here: the functions work on a DataProto, a TensorDict or a plain dict of
tensors laid out as above. See pgpo_train/integrations/README.md for the trainer-subclass recipe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pgpo_kernels import defaults
from pgpo_train.integrations import checks
from pgpo_train.integrations.token_scores import pgpo_weights_from_passes
from pgpo_train.models import model_family
from pgpo_train.rl.core_algos import weight_metrics
from pgpo_train.rl.core_algos import weight_options

TEXT_LOGP_KEY = "pgpo_text_log_probs"  # where the recipe stores the text-only pass's log-probs
WEIGHTS_KEY = "pgpo_weights"


def _tensors(data: Any):
    """The tensor dict of a DataProto (its `.batch`), or `data` itself when it already is a (Tensor)dict."""
    if hasattr(data, "non_tensor_batch") and hasattr(data, "batch"):
        return data.batch
    if hasattr(data, "keys") and hasattr(data, "__getitem__"):
        return data
    raise TypeError(f"data must be a verl DataProto, a TensorDict or a dict of tensors, got {type(data).__name__}")


def _get(tensors, key: str, what: str) -> torch.Tensor:
    if key not in tensors.keys():  # noqa: SIM118 - TensorDict refuses `key in td`
        raise KeyError(f"the batch has no {key!r} ({what}); keys present: {sorted(tensors.keys())}")
    return tensors[key]


@torch.no_grad()
def pgpo_reshape_advantages_(
    data: Any,
    *,
    logp_txt: torch.Tensor | None = None,
    logp_vis: torch.Tensor | None = None,
    logits_vis: torch.Tensor | None = None,
    logits_txt: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    temperature: float = 1.0,
    advantages_key: str = "advantages",
    mask_key: str = "response_mask",
    logp_vis_key: str = "old_log_probs",
    logp_txt_key: str = TEXT_LOGP_KEY,
    weights_key: str | None = WEIGHTS_KEY,
    k3_log_ratio_max: float = 0.0,
    k3_score_max: float = 0.0,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A_t = A_t * w~_t on a verl/EasyR1 batch, in place (arXiv 2604.01840; docs/method.md#rl-step).

    The visual-dependency scores come from exactly one source, first match wins:
      1. `scores` [B, T_resp] (e.g. `pgpo_kernels.token_kl` run inside a worker);
      2. `logits_vis`, `logits_txt` [B, T_resp, V] (exact KL; only sensible for small batches on the driver);
      3. the sampled tokens' log-probs (the paper's k3 estimate): `logp_txt` [B, T_resp], or else
         `batch[logp_txt_key]`; the visual side is `logp_vis`, or else `batch[logp_vis_key]` (verl's
         `old_log_probs`, which is the visual pass anyway).

    Args:
        data: DataProto / TensorDict / dict holding `advantages` [B, T_resp] (float) and `response_mask` [B, T_resp].
        temperature: only for the logits source.
        options: the PGPO reshape's keyword options, as `core_algos.pgpo_weights` takes them (tau, beta, eps,
            renormalize, min_spread, backend; the variants' control, tau_mode, floor, and generator for the "shuffled"
            control's permutations, e.g. `pgpo_train.rl.weight_variants.control_generator(seed, step)`).
        *_key: batch keys, verl's names by default.
        weights_key: if not None, the weights are also stored in the batch under this key (for logging).
        k3_log_ratio_max, k3_score_max: the k3 clamps (log-prob source only; 0 = off): core_algos.k3_scores'.

    Returns:
        (weights [B, T_resp] float32, metrics): metrics are floats with "pgpo/" keys (one host sync; this runs
        on verl's driver, next to its other metric reductions).
    """
    tensors = _tensors(data)
    advantages = _get(tensors, advantages_key, "advantages [B, T_resp], computed by compute_advantage")
    mask = _get(tensors, mask_key, "response_mask [B, T_resp]")
    if not advantages.dtype.is_floating_point or advantages.dim() != 2:
        raise ValueError(f"{advantages_key} must be a float tensor [B, T_resp] (verl's token-level advantages), "
                         f"got {advantages.dtype} {tuple(advantages.shape)}")
    if mask.shape != advantages.shape:
        raise ValueError(f"{mask_key} must have the advantages' shape [B, T_resp] = {tuple(advantages.shape)}, "
                         f"got {tuple(mask.shape)}")
    valid = mask.bool()
    if scores is None and logits_vis is None and logits_txt is None:
        if logp_txt is None:
            logp_txt = _get(tensors, logp_txt_key, "text-only pass log-probs [B, T_resp]; pass logp_txt= or store "
                            "them under this key")
        if logp_vis is None:
            logp_vis = _get(tensors, logp_vis_key, "visual pass log-probs [B, T_resp]")
    weights, s = pgpo_weights_from_passes(
        valid, logits_vis=logits_vis, logits_txt=logits_txt, logp_vis=logp_vis, logp_txt=logp_txt, scores=scores,
        temperature=temperature, k3_log_ratio_max=k3_log_ratio_max, k3_score_max=k3_score_max, **options)
    advantages.mul_(weights.to(device=advantages.device, dtype=advantages.dtype))
    if weights_key is not None:
        tensors[weights_key] = weights
    opts = weight_options(**options)
    adv = advantages.to(weights.device)
    stats = weight_metrics(weights, s, valid, tau=opts["tau"], eps=opts["eps"], token_adv=adv)
    metrics = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync (driver-side)
    return weights, metrics


def pgpo_text_only_batch(
    data: Any,
    visual_token_ids: Any,
    *,
    multimodal_keys: Sequence[str] = ("multi_modal_inputs",),
) -> Any:
    """The text-only twin of a verl rollout batch: same tokens and positions, the prompt's visual tokens masked out.

    docs/method.md#text-only-pass: the attention mask is set to 0 on every visual placeholder of the prompt while the
    original (mrope) position ids are kept, and the images are dropped (their embeddings would never be attended).
    Response tokens are text whatever their id (a sampled placeholder is not an image): only the prompt part, the first
    L - T_resp tokens when the batch has `responses`, is masked. In verl's padding-free path the holed attention
    mask deletes the visual tokens and keeps the others' positions, the same pass (docs/method.md#text-only-pass);
    `no_padding_2_padding` counts prompt tokens from the same mask, so the response slice stays aligned. Feed the
    result to the actor's log-prob call, e.g. `self._compute_old_log_prob(text_batch)`.

    Args:
        data: a verl DataProto with `input_ids` [B, L], `attention_mask` [B, L] and `position_ids`.
        visual_token_ids: the image (and video) placeholder ids (e.g. Qwen2.5-VL's `<|image_pad|>` 151655), or the
            HF model / config, whose family's text-only mask is used (`pgpo_train.models.model_family.text_only_mask`:
            the placeholders; for Idefics3 / SmolVLM each image's whole span, grid tags included).
        multimodal_keys: non-tensor keys whose per-sample dicts are replaced by {} (verl's own text-only form).

    Refused: image placeholders in the responses on tokens the policy did not sample (`response_mask` 0), i.e.
    multi-turn tools that return images (the twin would attend them without pixels).

    Returns:
        A new DataProto sharing every tensor with `data` except the new attention mask; `data` is unchanged. Its
        `meta_info` is a copy whose `global_token_num` counts the twin's attended tokens and whose `images_seqlens`
        is empty, so verl's MFU / throughput of the text-only pass are not computed from the with-image batch.
    """
    if not (hasattr(data, "non_tensor_batch") and hasattr(data, "batch")):
        raise TypeError(f"data must be a verl DataProto (with .batch and .non_tensor_batch), got {type(data).__name__}")
    input_ids = _get(data.batch, "input_ids", "prompt + response token ids [B, L]")
    attention_mask = _get(data.batch, "attention_mask", "[B, L]")
    _get(data.batch, "position_ids", "the original position ids; the text-only pass must reuse them")
    prompt_len = None
    if "responses" in data.batch.keys():  # noqa: SIM118 - TensorDict refuses `key in td`
        prompt_len = input_ids.shape[1] - data.batch["responses"].shape[1]  # responses are text
    _check_no_tool_images(data.batch, _visual_ids(visual_token_ids), prompt_len)
    if _is_model_or_config(visual_token_ids):  # the family's own text-only mask (Idefics3 / SmolVLM: image spans)
        visual = model_family.text_only_mask(visual_token_ids, input_ids, prompt_len)
    else:
        visual = model_family.id_mask(input_ids, _visual_ids(visual_token_ids), prompt_len)  # [B, L]

    text = copy.copy(data)  # shallow: the other tensors are shared, never written
    text.batch = data.batch.copy()
    text.batch["attention_mask"] = attention_mask.masked_fill(visual, 0)
    text.meta_info = _text_only_meta_info(getattr(data, "meta_info", None), text.batch["attention_mask"])
    text.non_tensor_batch = dict(data.non_tensor_batch)
    for key in multimodal_keys:
        if key in text.non_tensor_batch:
            text.non_tensor_batch[key] = np.array([{} for _ in range(len(input_ids))], dtype=object)
    return text


def _check_no_tool_images(tensors, ids: list[int], prompt_len: int | None) -> None:
    """Multi-turn rollouts whose tools return images put placeholders in the responses, on tokens the policy did not
    sample (response_mask 0): the twin masks the prompt's image only, so such a batch is refused."""
    if prompt_len is None or "response_mask" not in tensors.keys():  # noqa: SIM118 - TensorDict refuses `key in td`
        return
    responses = tensors["input_ids"][:, prompt_len:]
    from_tools = (tensors["response_mask"] == 0) & tensors["attention_mask"][:, prompt_len:].bool()
    hit = torch.isin(responses, torch.tensor(ids, device=responses.device)) & from_tools
    if bool(hit.any()):
        raise ValueError(
            "pgpo_text_only_batch: image placeholders inside the responses, on tokens the policy did not sample "
            f"(response_mask 0, rows {hit.any(-1).nonzero().flatten().tolist()}): a multi-turn tool returned images "
            "(actor_rollout_ref.rollout.multi_turn with image-returning tools). PGPO's text-only pass masks the "
            "prompt's image only (docs/method.md#text-only-pass), so it would attend these image tokens without "
            "their pixels. Use tools that return text, or train without PGPO.")


def _text_only_meta_info(meta_info, attention_mask: torch.Tensor) -> dict:
    """The batch's meta_info for the twin: its own token counts (verl's MFU and throughput read
    `global_token_num`) and no image lengths (the twin has no images)."""
    meta = dict(meta_info or {})
    if "global_token_num" in meta:
        meta["global_token_num"] = attention_mask.sum(-1).tolist()
    if "images_seqlens" in meta:
        meta["images_seqlens"] = []
    return meta


def _is_model_or_config(x) -> bool:
    return hasattr(x, "config") or hasattr(x, "model_type")


def _visual_ids(visual_token_ids) -> list[int]:
    if _is_model_or_config(visual_token_ids):  # a model or its config
        return model_family.placeholder_ids(visual_token_ids)
    ids = [visual_token_ids] if isinstance(visual_token_ids, int) else list(visual_token_ids)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"visual_token_ids must be an int, a non-empty sequence of ints, or the HF model/config, "
                         f"got {visual_token_ids!r}")
    return ids


class PGPOVerlTrainerMixin:
    """PGPO for verl's `RayPPOTrainer` (0.9.x): `class PGPORayPPOTrainer(PGPOVerlTrainerMixin, RayPPOTrainer): pass`.

    Overrides `_update_actor`, which verl's `fit` calls right after `compute_advantage`: one text-only log-prob
    pass through the actor (`_compute_old_log_prob` on `pgpo_text_only_batch`), then `pgpo_reshape_advantages_`
    (k3 against `old_log_probs`), then verl's own update. The PGPO metrics join the actor's.

    Checks (integrations/checks.py): the config is checked when the trainer is built and again when `fit` starts
    (Megatron and untested strategies, token-level estimators, unknown `algorithm.pgpo` keys are refused); `fit`
    guards the actor worker group so that an update on advantages PGPO did not reshape raises
    `PGPODidNotRunError` (a `fit` that bypasses `_update_actor`, as verl-recipe's RayDAPOTrainer's does). In bypass
    mode (`algorithm.rollout_correction.bypass_mode=True`, `old_log_probs` = the rollout engine's) the with-image
    log-probs are recomputed on the actor, so both k3 sides come from the same engine: one more forward.

    Config (Hydra; `+` adds keys verl does not declare): `+algorithm.pgpo.enable=True +algorithm.pgpo.tau=0.4
    +algorithm.pgpo.beta=2.0`, optionally `eps`, `renormalize`, `min_spread`, `control` / `tau_mode` / `floor`
    (the variants and controls of docs/method.md#variants; `seed` seeds the shuffled control, default data.seed),
    `k3_log_ratio_max` / `k3_score_max` (the k3 clamps, 0 = off), `preset` (dev-easyr1: the authors' development
    variant, second-hand, pgpo_kernels.defaults.PRESETS; fills the keys not given), `visual_token_ids` (default: the
    placeholder ids of the policy's family, from `actor_rollout_ref.model.path`'s config; else the tokenizer's
    `<|image_pad|>` and `<|video_pad|>`).
    """

    def __init__(self, *args, **kwargs):
        v1 = [c.__qualname__ for c in type(self).__mro__ if c.__module__.startswith("verl.trainer.ppo.v1")]
        if v1:  # its _update_actor(batch, metrics) takes transfer-queue batches, not DataProto
            raise TypeError(f"PGPOVerlTrainerMixin supports verl's RayPPOTrainer (verl.trainer.ppo.ray_trainer) and its "
                            f"subclasses, not verl's v1 trainers ({v1[0]}); see integrations/README.md")
        config = kwargs.get("config", args[0] if args else None)
        checks.check_verl_config(config, type(self).__name__)  # before verl builds datasets or workers
        super().__init__(*args, **kwargs)

    def fit(self, *args, **kwargs):
        if checks.verl_pgpo_enabled(self.config):
            checks.check_verl_config(self.config, type(self).__name__)  # the config may have been edited since
            checks.guard_actor_updates(self)
        return super().fit(*args, **kwargs)

    def _update_actor(self, batch):
        cfg = self.config.algorithm.get("pgpo", None) or {}
        if not cfg.get("enable", False):
            return super()._update_actor(batch)
        text_batch = pgpo_text_only_batch(batch, self._pgpo_text_only_spec(cfg))
        text_logp, _ = self._compute_old_log_prob(text_batch)  # the one extra forward PGPO costs
        logp_vis = None  # verl's old_log_probs: the actor's with-image pass
        if checks.verl_bypass_mode(self.config):  # old_log_probs are the rollout engine's: recompute on the actor
            logp_vis = self._compute_old_log_prob(batch)[0].batch["old_log_probs"]
        cfg = checks.verl_options_with_preset(cfg)
        _, metrics = pgpo_reshape_advantages_(
            batch, logp_txt=text_logp.batch["old_log_probs"], logp_vis=logp_vis, tau=cfg.get("tau", defaults.TAU),
            beta=cfg.get("beta", defaults.BETA), eps=cfg.get("eps", defaults.EPS),
            renormalize=cfg.get("renormalize", defaults.RENORMALIZE), min_spread=cfg.get("min_spread", defaults.MIN_SPREAD),
            control=cfg.get("control", defaults.CONTROL), tau_mode=cfg.get("tau_mode", defaults.TAU_MODE),
            floor=cfg.get("floor", defaults.FLOOR), generator=self._pgpo_generator(cfg),
            k3_log_ratio_max=cfg.get("k3_log_ratio_max", defaults.K3_LOG_RATIO_MAX),
            k3_score_max=cfg.get("k3_score_max", defaults.K3_SCORE_MAX),
            weights_key=None)
        self._pgpo_armed = True  # this batch's advantages are reshaped: the guarded update may run
        out = super()._update_actor(batch)
        out.meta_info.setdefault("metrics", {}).update(metrics)
        return out

    def _pgpo_generator(self, cfg):
        """The shuffled control's generator: a function of (trainer.seed, verl's global step), so resumable."""
        if cfg.get("control", "none") != "shuffled":
            return None
        from pgpo_train.rl.weight_variants import control_generator

        seed = cfg.get("seed", None)
        if seed is None:
            seed = self.config.get("data", {}).get("seed", 0) if hasattr(self.config, "get") else 0
        return control_generator(int(seed or 0), int(getattr(self, "global_steps", 0)))

    def _pgpo_text_only_spec(self, cfg):
        """What pgpo_text_only_batch masks by: the explicit ids, else the policy's config (its family's text-only
        mask, image spans included), else the tokenizer's Qwen placeholder ids."""
        if not cfg.get("visual_token_ids", None) and _model_path(self.config) is not None:
            if getattr(self, "_pgpo_policy_config", None) is None:
                from transformers import AutoConfig

                self._pgpo_policy_config = AutoConfig.from_pretrained(_model_path(self.config),
                                                                      trust_remote_code=_trust(self.config))
            return self._pgpo_policy_config
        return self._pgpo_visual_token_ids(cfg)

    def _pgpo_visual_token_ids(self, cfg) -> list[int]:
        ids = cfg.get("visual_token_ids", None)
        if ids:
            return [int(i) for i in ids]
        path = _model_path(self.config)
        if path is not None:  # the policy's config names its family and placeholder ids (any supported family)
            from transformers import AutoConfig

            return model_family.placeholder_ids(AutoConfig.from_pretrained(path, trust_remote_code=_trust(self.config)))
        vocab = self.tokenizer.get_vocab()
        ids = [vocab[t] for t in ("<|image_pad|>", "<|video_pad|>") if t in vocab]
        if not ids:
            raise ValueError("PGPO found no model path (actor_rollout_ref.model.path) and no <|image_pad|> / "
                             "<|video_pad|> token in the tokenizer; set +algorithm.pgpo.visual_token_ids=[...] to the "
                             "model's visual placeholder ids")
        return ids


def _model_path(config):
    try:
        return config.actor_rollout_ref.model.path
    except (AttributeError, KeyError):
        return None


def _trust(config) -> bool:
    try:
        return bool(config.actor_rollout_ref.model.get("trust_remote_code", False))
    except (AttributeError, KeyError):
        return False
