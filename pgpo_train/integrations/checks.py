"""Start-up refusals and per-step checks for the TRL and verl adapters.

Every option a user can switch on in the trainers that PGPO does not support gets one error here, before any model
or worker work, naming the option; the matrix is in integrations/README.md. Nothing in this module imports trl or
verl: configs are read as plain attribute / mapping objects (OmegaConf DictConfig, dataclasses, dicts).
"""

from __future__ import annotations

from collections.abc import Mapping

from pgpo_kernels.utils import check_reshape_params

# %% verl

# The mixin's options under `algorithm.pgpo` (docs/method.md#defaults): a typo must never fall back to a default.
VERL_PGPO_KEYS = ("enable", "tau", "beta", "eps", "renormalize", "min_spread", "visual_token_ids", "control",
                  "tau_mode", "floor", "seed", "k3_log_ratio_max", "k3_score_max", "preset")

# verl's actor strategies whose VLM forward keeps the batch's position ids: the FSDP engine packs the (holed)
# attention mask into varlen sequences and passes `position_ids` (text row + 3 mrope rows) through, so the kept tokens
# keep their original positions (docs/method.md#text-only-pass; tested with verl's padding helpers).
VERL_STRATEGIES_KEEPING_POSITIONS = ("fsdp", "fsdp2")

MEGATRON_ERROR = (
    "PGPO does not support actor_rollout_ref.actor.strategy='megatron': verl's Megatron engine calls the VLM with "
    "position_ids=None (verl/models/mcore/model_forward.py), so the Megatron Qwen-VL rebuilds its rope index from the "
    "text-only batch, whose image is gone and whose attention mask is holed: the visual tokens are deleted and the "
    "rest renumbered, the variant the paper rejects, docs/method.md#text-only-pass (on the tiny model, up to 1.5e-3 "
    "in logits, 0.016 in PGPO weights). Use actor_rollout_ref.actor.strategy=fsdp (or fsdp2), which keeps the "
    "positions."
)

# Families whose attention verl 0.9.1's apply_monkey_patch replaces when use_remove_padding=True: its Qwen2-VL attention
# splits the packed row where the text position is 0 (verl/models/transformers/qwen2_vl.py,
# prepare_fa2_from_position_ids), so a row with a hole (the text-only twin's deleted image) stays one sequence.
VERL_ATTENTION_PATCHED = ("qwen2_vl", "qwen2_5_vl")
# For the other families the packed row reaches transformers' own attention with attention_mask=None: the
# flash-attention path splits it where a position is 0 (correct), while sdpa / eager split it wherever two positions
# are not consecutive (transformers.masking_utils.find_packed_sequence_indices), i.e. also right after the image the
# twin deleted: every text token after the image loses the prompt before it (tiny Qwen3-VL, verl 0.9.1's real engine:
# text-only log-probs off by up to 0.089 nats against the direct computation; 5e-7 with use_remove_padding=False).
FLASH_ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")

# Advantage estimators whose advantages are not one outcome advantage per sequence broadcast over its tokens:
# PGPO's A_t = A * w~_t is defined on such an A (docs/method.md#rl-step).
VERL_TOKEN_LEVEL_ESTIMATORS = ("gae", "optimal_token_baseline", "tir_optimal_token_baseline")


def _get(cfg, key: str, default=None):
    """cfg.key for attribute configs (OmegaConf, dataclasses) and mappings alike; default when absent."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            return cfg.get(key, default)
        except (AttributeError, KeyError, TypeError):
            pass
    return getattr(cfg, key, default)


def _path(cfg, dotted: str, default=None):
    for key in dotted.split("."):
        cfg = _get(cfg, key, None)
        if cfg is None:
            return default
    return cfg


def verl_pgpo_options(config) -> dict:
    """The `algorithm.pgpo` options as a dict ({} when absent)."""
    cfg = _path(config, "algorithm.pgpo")
    if cfg is None:
        return {}
    return {k: _get(cfg, k) for k in (cfg.keys() if hasattr(cfg, "keys") else vars(cfg))}


def verl_pgpo_enabled(config) -> bool:
    return bool(verl_pgpo_options(config).get("enable", False))


def verl_bypass_mode(config) -> bool:
    """True when verl's rollout correction runs in bypass mode (old_log_probs := the rollout engine's log-probs)."""
    return bool(_path(config, "algorithm.rollout_correction.bypass_mode", False))


def check_verl_config(config, who: str = "PGPOVerlTrainerMixin") -> None:
    """One clear error for each verl option PGPO does not support (a no-op when `algorithm.pgpo.enable` is off).

    Refused: the Megatron strategy (it renumbers positions, MEGATRON_ERROR), any strategy other than fsdp / fsdp2
    (untested: their VLM forward may not keep the position ids), token-level advantage estimators (gae, ...),
    unknown `algorithm.pgpo` keys and bad PGPO parameters. Bypass mode (`algorithm.rollout_correction.bypass_mode`)
    is supported: the mixin recomputes the with-image log-probs on the actor (see PGPOVerlTrainerMixin).
    """
    opts = verl_pgpo_options(config)
    if not opts.get("enable", False):
        return
    unknown = sorted(set(opts) - set(VERL_PGPO_KEYS))
    if unknown:
        raise ValueError(f"{who}: unknown option(s) algorithm.pgpo.{unknown} (a typo would fall back to a default "
                         f"silently); known: {list(VERL_PGPO_KEYS)}")
    opts = verl_options_with_preset(opts)  # ValueError naming algorithm.pgpo.preset when unknown
    check_reshape_params(opts.get("tau", 0.4), opts.get("beta", 2.0), opts.get("eps", 1e-6))
    from pgpo_train.rl.core_algos import check_k3_clamps
    from pgpo_train.rl.weight_variants import check_variant_args

    check_k3_clamps(opts.get("k3_log_ratio_max", 0.0), opts.get("k3_score_max", 0.0))
    check_variant_args(opts.get("control", "none"), opts.get("tau_mode", "absolute"), opts.get("floor", 0.0))
    strategy = _path(config, "actor_rollout_ref.actor.strategy", "fsdp")
    if strategy == "megatron":
        raise ValueError(f"{who}: {MEGATRON_ERROR}")
    if strategy not in VERL_STRATEGIES_KEEPING_POSITIONS:
        raise ValueError(f"{who}: PGPO is not tested with actor_rollout_ref.actor.strategy={strategy!r}: its VLM "
                         "forward may rebuild the position ids of the text-only batch from its holed attention mask "
                         "(the variant the paper rejects, docs/method.md#text-only-pass). Supported: "
                         f"{list(VERL_STRATEGIES_KEEPING_POSITIONS)}")
    _check_verl_remove_padding(config, who)
    check_verl_qwen2_vl_fix(config, who)
    estimator = _path(config, "algorithm.adv_estimator", "grpo")
    estimator = str(getattr(estimator, "value", estimator))  # verl's AdvantageEstimator is a str Enum
    if estimator in VERL_TOKEN_LEVEL_ESTIMATORS:
        raise ValueError(f"{who}: PGPO does not support algorithm.adv_estimator={estimator!r}: its advantages vary "
                         "by token before PGPO, while PGPO's A_t = A * w~_t reshapes one outcome advantage per "
                         "sequence (docs/method.md#rl-step). Use grpo (the paper's DAPO is grpo + clip-higher + "
                         "filtering).")


def verl_options_with_preset(opts) -> dict:
    """`algorithm.pgpo` as a dict with its `preset`'s values (pgpo_train.run.config.PRESETS) in the keys not given;
    verl's estimator is k3 always (old_log_probs against the text-only pass), so a preset's estimator is dropped."""
    from pgpo_train.run.config import PRESETS

    opts = dict(opts)
    preset = opts.get("preset", "none")
    if preset not in PRESETS:
        raise ValueError(f"algorithm.pgpo.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    for k, v in PRESETS[preset].items():
        if k != "estimator":
            opts.setdefault(k, v)
    return opts


def verl_model_type(config) -> str | None:
    """The policy's `model_type`, from the config at actor_rollout_ref.model.path (None when it cannot be read)."""
    path = _path(config, "actor_rollout_ref.model.path")
    if path is None:
        return None
    try:
        from transformers import AutoConfig

        trust = bool(_path(config, "actor_rollout_ref.model.trust_remote_code", False))
        return getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust), "model_type", None)
    except (OSError, ValueError, ImportError):
        return None


def _check_verl_remove_padding(config, who: str) -> None:
    if not _path(config, "actor_rollout_ref.model.use_remove_padding", False):
        return
    model_type = verl_model_type(config)
    if model_type is None or model_type in VERL_ATTENTION_PATCHED:
        return
    override = _path(config, "actor_rollout_ref.model.override_config", None)
    attn = _get(override, "attn_implementation", "flash_attention_2")  # verl's default (HFModelConfig)
    if attn not in FLASH_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"{who}: PGPO refuses actor_rollout_ref.model.use_remove_padding=True with "
            f"actor_rollout_ref.model.override_config.attn_implementation={attn!r} for model_type={model_type!r}: verl "
            "packs the micro-batch into one row with attention_mask=None, and transformers' sdpa / eager attention "
            "then starts a new sequence wherever two positions are not consecutive, i.e. right after the image the "
            "text-only pass deletes: its log-probs would be silently wrong. Use attn_implementation=flash_attention_2 "
            "(splits at position 0, correct) or use_remove_padding=False.")


def check_verl_qwen2_vl_fix(config, who: str = "PGPOVerlTrainerMixin") -> None:
    """Refuse a Qwen2-VL / Qwen2.5-VL run on a verl whose no-image branch crashes unless the workers load the fix.

    The workers apply `pgpo_train.integrations.verl_qwen2_vl_fix` when it is in actor_rollout_ref.model.external_lib
    (verl imports it there before building the model); the driver only checks that it will be.
    """
    from pgpo_train.integrations import verl_qwen2_vl_fix as fix

    if not verl_pgpo_enabled(config) or verl_model_type(config) not in VERL_ATTENTION_PATCHED:
        return
    libs = _path(config, "actor_rollout_ref.model.external_lib", None) or []
    libs = [libs] if isinstance(libs, str) else list(libs)
    if fix.__name__ in libs:
        return
    if fix.verl_is_affected():
        raise ValueError(
            f"{who}: this verl's Qwen2-VL forward crashes on every micro-batch without images ({fix.VERL_LINE} "
            "raises AttributeError: 'BaseModelOutputWithPooling' object has no attribute 'mean' under transformers "
            "5), and PGPO's text-only pass never has images. Add the fix to the workers: "
            f"actor_rollout_ref.model.external_lib={fix.__name__} (a no-op once verl unpacks the tower output there).")


# %% the per-step check that PGPO ran

# Written only by the PGPO path (pgpo_reshape_advantages_ / weight_metrics): its presence in a step's metrics is the
# proof that the advantages were reshaped in that step.
PGPO_RAN_METRIC = "pgpo/kl_mean"


class PGPODidNotRunError(RuntimeError):
    """An actor update ran on advantages PGPO never reshaped (the step would be plain GRPO/DAPO)."""


def check_pgpo_ran(metrics: Mapping, where: str) -> None:
    """Raise if a finished step's metrics lack the PGPO metric: `where` names the trainer method that should have
    run PGPO (e.g. "RayPPOTrainer.fit, after compute_advantage"). Call it once per step, before logging."""
    if PGPO_RAN_METRIC not in metrics:
        raise PGPODidNotRunError(
            f"PGPO did not run in this step: the step's metrics have no {PGPO_RAN_METRIC!r}, which only "
            f"pgpo_reshape_advantages_ writes. Check {where}: the PGPO lines (pgpo_text_only_batch, the text-only "
            "log-prob pass, pgpo_reshape_advantages_) must run on every batch before the actor update.")


def guard_actor_updates(trainer, worker_group_attr: str = "actor_rollout_wg") -> None:
    """Make `trainer.<worker_group_attr>.update_actor` refuse to run unless PGPO reshaped this batch.

    The mixin arms the guard (`trainer._pgpo_armed = True`) right after reshaping the advantages; each update
    consumes it. A `fit` that calls the worker group's `update_actor` directly, as verl-recipe's `RayDAPOTrainer.fit`
    does, never passes through `PGPOVerlTrainerMixin._update_actor`: without the guard that run would train as plain
    DAPO, silently. Idempotent.
    """
    wg = getattr(trainer, worker_group_attr, None)
    if wg is None:
        raise RuntimeError(f"{type(trainer).__name__} has no {worker_group_attr}: guard_actor_updates needs the "
                           "actor worker group (call it after init_workers)")
    update = wg.update_actor
    if getattr(update, "_pgpo_guarded", False):
        return
    cls = type(trainer).__name__

    def guarded_update_actor(*args, **kwargs):
        if not getattr(trainer, "_pgpo_armed", False):
            raise PGPODidNotRunError(
                f"PGPO did not run before this actor update: {cls}.fit called {worker_group_attr}.update_actor "
                f"without going through PGPOVerlTrainerMixin._update_actor, so the advantages were never reshaped "
                "and this step would train as plain GRPO/DAPO (verl-recipe's RayDAPOTrainer.fit calls "
                f"{worker_group_attr}.update_actor directly). Make that fit call self._update_actor(batch), or add "
                "the PGPO lines after its compute_advantage call and set self._pgpo_armed = True before the update "
                "(integrations/README.md, verl).")
        trainer._pgpo_armed = False  # one reshape, one update
        return update(*args, **kwargs)

    guarded_update_actor._pgpo_guarded = True
    wg.update_actor = guarded_update_actor


# %% TRL + vLLM generation

# vLLM's OpenAI-compatible server clamps logit_bias to [-100, 100]; -100 makes a token's probability e^-100 times
# its unbiased value (~4e-44): never sampled in practice, and one value for both of TRL's vLLM modes.
VLLM_BAN_BIAS = -100.0


def vllm_generation_kwargs(generation_kwargs: dict | None, special_ids: list[int]) -> dict:
    """TRL's `generation_kwargs` with the visual special ids banned in vLLM's sampling (logit_bias -100 each).

    TRL 1.16 merges `GRPOConfig.generation_kwargs` into vLLM's `SamplingParams` (colocate mode) and into the
    server request's sampling parameters (server mode), so this is where vLLM gets the ban. A config that keeps a
    visual special id samplable is refused, naming the key: a `logit_bias` entry above -100 for one of them, or an
    `allowed_token_ids` list that contains one.
    """
    out = dict(generation_kwargs or {})
    bias = {int(k): float(v) for k, v in (out.get("logit_bias") or {}).items()}
    for i in special_ids:
        if i in bias and bias[i] > VLLM_BAN_BIAS:
            raise ValueError(f"generation_kwargs['logit_bias'][{i}] = {bias[i]} lets vLLM sample the visual special "
                             f"id {i}; PGPO bans it (a sampled placeholder is counted as an image by the visual "
                             f"forward). Remove the entry or set it to {VLLM_BAN_BIAS}.")
        bias[i] = VLLM_BAN_BIAS
    allowed = out.get("allowed_token_ids")
    if allowed is not None and set(map(int, allowed)) & set(special_ids):
        raise ValueError(f"generation_kwargs['allowed_token_ids'] contains visual special ids "
                         f"{sorted(set(map(int, allowed)) & set(special_ids))}; PGPO bans them in sampling. Remove "
                         "them from the list.")
    out["logit_bias"] = bias
    return out


def check_no_tool_images(model, completion_ids, completion_mask, tool_mask) -> None:
    """TRL `tools` that return images put image placeholders inside the completions; PGPO's text-only pass masks
    the prompt's image only and numbers completions as text, so such a batch is refused, naming the option."""
    import torch

    from pgpo_train.models import model_family

    ids = torch.tensor(model_family.placeholder_ids(model), device=completion_ids.device)
    from_tools = completion_mask.bool() & ~tool_mask.bool()  # TRL's tool_mask is 0 on tool-response tokens
    if bool((torch.isin(completion_ids, ids) & from_tools).any()):
        raise ValueError("PGPOGRPOTrainer does not support tools that return images: a tool response put image "
                         "placeholders inside a completion, and PGPO's text-only pass masks only the prompt's image "
                         "(docs/method.md#text-only-pass). Use tools that return text, or train without `tools`.")


__all__ = [
    "MEGATRON_ERROR",
    "PGPO_RAN_METRIC",
    "VLLM_BAN_BIAS",
    "PGPODidNotRunError",
    "check_no_tool_images",
    "check_pgpo_ran",
    "check_verl_config",
    "check_verl_qwen2_vl_fix",
    "guard_actor_updates",
    "verl_bypass_mode",
    "verl_pgpo_enabled",
    "verl_pgpo_options",
    "vllm_generation_kwargs",
]
