"""The fused-lm-head path of the old-log-prob pass: hidden states in, no [mb, T, V] logits (issue 5, SPEC section 4).

`response_hidden` runs the inner model (the whole VLM below the lm_head: vision tower included when pixel_values
are passed) and keeps the hidden states at exactly the positions `train.response_logits` projects; the caller hands
them to `pgpo_kernels.fused_linear_token_stats` with the lm_head's weight and bias.

One code path owns the lm_head (SPEC section 4: stacked fused patches diverged in verl): the fused path reproduces
`lm_head(hidden)` itself, so `check_fused_lm_head` refuses any model whose logits are something else (a patched or
hooked lm_head or forward, a non-Linear head, logit soft-capping or scaling in the config).
"""

from __future__ import annotations

import torch

# Config fields of transformers models whose logits are not plain lm_head(hidden): (name, value that is a no-op).
# Gemma 2/3/4, PaliGemma, nanochat: final_logit_softcapping; Cohere: logit_scale; Granite: logits / logits_scaling.
LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", None),
    ("logit_scale", None),
    ("logits_scaling", 1.0),
    ("softcap", None),
)
FUSED_LM_HEAD_MODES = ("auto", "on", "off")


def _configs(model) -> list:
    """The model's config and, for VLMs, its text config (where the language model's logit settings live)."""
    out = [model.config]
    text = getattr(model.config, "text_config", None)
    if text is not None and text is not model.config:
        out.append(text)
    return out


def fused_lm_head_problem(model, allow_forward=None) -> str | None:
    """Why the fused path cannot reproduce this model's logits, or None when it can.

    Tied input/output embeddings are fine: lm_head.weight is then the embedding matrix, which is exactly what the
    model's own forward multiplies by. allow_forward(model): True for an instance forward patch known to leave the
    logits alone (TRL 1.16's fused LM head, which calls the original forward unless asked for log-probs).
    """
    name = type(model).__name__
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is None or head is None:
        return f"{name} has no .model / .lm_head pair (a transformers ...ForConditionalGeneration is expected)"
    if type(head) is not torch.nn.Linear:
        return f"{name}.lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    if "forward" in vars(head) or ("forward" in vars(model) and not (allow_forward and allow_forward(model))):
        return f"{name}'s forward or lm_head.forward is patched on the instance"
    if head._forward_hooks or head._forward_pre_hooks or model._forward_hooks or model._forward_pre_hooks:
        return f"{name} or its lm_head has forward hooks registered"
    # a class-level patch (e.g. Liger's fused-linear-cross-entropy forward) lives outside the model's own module
    fwd_module = getattr(type(model).forward, "__module__", "")
    if fwd_module != type(model).__module__ and not fwd_module.startswith("transformers."):
        return f"{name}.forward is replaced by {fwd_module} (a patched forward owns the logits)"
    for cfg in _configs(model):
        for key, neutral in LOGIT_TRANSFORMS:
            value = getattr(cfg, key, None)
            if value is not None and value != neutral:
                return f"{type(cfg).__name__}.{key} = {value!r} transforms the logits after the lm_head"
    return None


def check_fused_lm_head(model) -> None:
    """Raises ValueError naming the reason when the fused-lm-head path would not reproduce the model's logits."""
    problem = fused_lm_head_problem(model)
    if problem is not None:
        raise ValueError(
            f"--pgpo.fused-lm-head on: {problem}; the fused path computes lm_head(hidden) itself and would give "
            "different log-probs. Use --pgpo.fused-lm-head off (the model's own forward builds the logits)."
        )


def use_fused_lm_head(mode: str, model, device: torch.device) -> bool:
    """Resolves --pgpo.fused-lm-head: off (the default), on (checked, raises if unsupported), auto (on for CUDA when
    supported).

    our choice: auto stays off on CPU, where logits of a small model are small and the kernels' torch fallback would
    build them chunk by chunk anyway; auto falls back to the logits path (with a note) for an unsupported model.

    Precision note: on CUDA the Triton kernel keeps fp32 logits, while the policy update's log-probs come from bf16
    lm_head logits, so for a bf16 policy old and new log-probs differ by the logits' bf16 rounding (tiny model: up
    to 0.03 nats; actor/ppo_kl of the first mini-batch shows it). The torch fallback rounds like the update does.
    """
    if mode not in FUSED_LM_HEAD_MODES:
        raise ValueError(f"--pgpo.fused-lm-head must be one of {FUSED_LM_HEAD_MODES}, got {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        check_fused_lm_head(model)
        return True
    if device.type != "cuda":
        return False
    problem = fused_lm_head_problem(model)
    if problem is not None:
        print(f"pgpo-train: fused lm_head off ({problem}); the old-log-prob pass builds logits")
        return False
    return True


def response_hidden(model, inputs: dict, n_resp: int) -> torch.Tensor:
    """[mb, T, H] last hidden states at the positions predicting the T response tokens.

    The same positions as `train.response_logits` (logits_to_keep=T+1, then [:, :-1]): the inner model is the whole
    VLM below the lm_head, so with pixel_values in `inputs` the vision tower runs as in `model(**inputs)`.
    """
    out = model.model(**inputs, use_cache=False)
    return out.last_hidden_state[:, -(n_resp + 1) : -1]  # [mb, T, H]


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the plain nn.Linear lm_head."""
    return model.lm_head.weight, model.lm_head.bias
