"""The fused-lm-head path of every pass: hidden states in, no [mb, T, V] logits (docs/method.md#trainer-traps).

`response_hidden` runs the inner model (the whole VLM below the lm_head: vision tower included when pixel_values
are passed) and keeps the hidden states at exactly the positions `policy.response_logits` projects; the caller hands
them to `pgpo_kernels.fused_linear_token_stats` with the lm_head's weight and bias.

One code path owns the lm_head (stacked fused patches diverged in verl: docs/method.md#trainer-traps): the fused path
reproduces `lm_head(hidden)` itself, so `check_fused_lm_head` refuses any model whose logits are something else (a
patched or hooked lm_head or forward, a non-Linear head, logit soft-capping or scaling in the config).
"""

from __future__ import annotations

import torch

from pgpo_train.models import model_family

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
    """Resolves --pgpo.fused-lm-head: auto (the default: on wherever the model's logits are plain lm_head(hidden),
    else off with a note), on (checked, raises if unsupported), off (every pass builds logits).

    On, every pass of a step goes through hidden states: the old-log-prob and text-only passes
    (fused_linear_token_stats; grpo/dapo: fused_linear_logp) and the policy update and SFT warm-up (fused_linear_logp
    with its backward), so old and new log-probs come from the same kernels and no [mb, T, V] tensor exists. On CPU
    the torch fallback builds ~8 MiB of logits at a time, rounded to the model dtype as lm_head(hidden) is, so fp32
    metrics match the logits path to ~1e-6; on CUDA the Triton kernels keep fp32 accumulators (bf16 policy: log-probs
    differ from bf16 logits' by their rounding, both passes alike). `device` is kept for callers; every device is
    treated alike: the fused update saves memory on any device, not only on CUDA.
    """
    if mode not in FUSED_LM_HEAD_MODES:
        raise ValueError(f"--pgpo.fused-lm-head must be one of {FUSED_LM_HEAD_MODES}, got {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        check_fused_lm_head(model)
        return True
    problem = fused_lm_head_problem(model)
    if problem is not None:
        print(f"pgpo-train: fused lm_head off ({problem}); every pass builds logits")
        return False
    return True


def response_hidden(model, inputs: dict, n_resp: int) -> torch.Tensor:
    """[mb, T, H] last hidden states at the positions predicting the T response tokens.

    The same positions as `policy.response_logits` (logits_to_keep=T+1, then [:, :-1]): the inner model is the whole
    VLM below the lm_head, so with pixel_values in `inputs` the vision tower runs as in `model(**inputs)`.
    """
    # under peft, `.model` of the wrapper is the whole VLM (lm_head included); the adapters live inside the bare
    # model's layers, so its inner model runs them too
    out = model_family.unwrap(model).model(**inputs, use_cache=False)
    return out.last_hidden_state[:, -(n_resp + 1) : -1]  # [mb, T, H]


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the plain nn.Linear lm_head."""
    return model.lm_head.weight, model.lm_head.bias


def fused_head_forward(model, inputs: dict, n_resp: int, head_fn):
    """model(**inputs) with its lm_head, for this one call, replaced by head_fn(hidden [mb, T, H], weight, bias) at the
    positions predicting the n_resp response tokens; returns what head_fn returned (the output's `logits` field).

    Why through the model's own forward rather than model.model(...) + the weight: under FSDP2 the root module's
    forward unshards the lm_head and embeddings and registers the backward hooks on its outputs; calling the inner
    model around it reads sharded parameters. Here head_fn sees the same unsharded weight the real lm_head would,
    and its result is the root forward's output, so the gradient takes FSDP's path."""
    head = model.lm_head if hasattr(model, "lm_head") else model_family.unwrap(model).lm_head

    def forward(hidden):  # hidden: [mb, n_resp + 1, H] (logits_to_keep); the last position predicts nothing
        out = head_fn(hidden[:, :-1], head.weight, head.bias)
        # FSDP2 hooks the root's output for its pre-backward and warns on a view (an in-place op on one would drop
        # the hook); fused_linear_logp's [mb, T] is a reshape of [N]: a copy of mb x T floats
        return out.clone() if out._base is not None else out

    head.forward = forward  # this instance, this call only
    try:
        return model(**inputs, logits_to_keep=n_resp + 1, use_cache=False).logits
    finally:
        del head.forward


def fallback_chunk_rows(weight: torch.Tensor, backend: str) -> int | None:
    """Rows per chunk of the fused ops' torch fallback in the training loop: ~8 MiB of fp32 logits (13 rows at
    V = 152064), as fused_linear_logp's default; None (the op's own choice) where the Triton kernels run. The
    fallback's default otherwise sizes chunks from a quarter of the free memory: on a CPU host a whole micro-batch
    of [mb, T, V] logits (measured: benchmarks/results/logp/train_step_v152064.md)."""
    from pgpo_kernels.torch_fallback.fused_logp import default_logp_chunk_rows

    if backend == "torch" or not weight.is_cuda:
        return default_logp_chunk_rows(weight.shape[0])
    return None


@torch.no_grad()
def hidden_argmax(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  chunk_bytes: int = 8 << 20) -> torch.Tensor:
    """Greedy next-token ids [..., ] from hidden states [..., H] and the lm_head, a few rows of logits at a time
    (never [mb, T, V])."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    step = max(1, chunk_bytes // (4 * weight.shape[0]))
    parts = [torch.nn.functional.linear(rows[lo:lo + step], weight, bias).argmax(-1)
             for lo in range(0, rows.shape[0], step)]
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=hidden.device)
    return out.reshape(hidden.shape[:-1])
