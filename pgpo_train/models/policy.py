"""The policy model: loading it (the embedded tiny model or `from_pretrained`), the process setup around it (device,
seeds, optimizer), and its forward from logits to the sampled tokens' log-probs.
"""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import torch

from pgpo_train.models import model_family
from pgpo_train.models.processor import load_processor
from pgpo_train.models.tiny import build_tiny
from pgpo_train.models.tiny import tiny_config
from pgpo_train.run.config import TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_policy(cfg: TrainConfig, device: torch.device):
    """(model, processor): the embedded tiny model when cfg.model is empty, else from_pretrained(cfg.model)."""
    if not cfg.model:
        model, processor = build_tiny(tiny_config(cfg.tiny_head_dim), seed=cfg.seed)
    else:
        from transformers import AutoModelForImageTextToText

        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=getattr(torch, dtype), attn_implementation=attn
        )
        processor = load_processor(cfg.model)
    model_family.check_processor(model, processor, "pgpo-train")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.freeze_vision:
        for p in model_family.vision_tower(model).parameters():
            p.requires_grad_(False)
    if cfg.lora.rank > 0:  # peft adapters; every base weight frozen (pgpo_train.models.lora)
        from pgpo_train.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model.to(device), processor


def eos_ids(model, processor) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    for t in (processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id):
        if t is not None and t not in ids:
            ids.append(t)
    return ids


def make_optimizer(model, lr: float, weight_decay: float):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def response_logits(model, inputs: dict, n_resp: int, temperature: float | None) -> torch.Tensor:
    """[mb, T, V] temperature-scaled fp32 logits predicting the response tokens (only those positions are computed);
    temperature None: the model-dtype view itself, no copy (for kernels that take temperature= and a strided view)."""
    logits = model(**inputs, logits_to_keep=n_resp + 1, use_cache=False).logits[:, :-1]  # [mb, T, V]
    return logits if temperature is None else logits.float() / temperature


def logp_entropy(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = True):
    """Log-prob of targets [mb, T] and (no-grad) entropy [mb, T] from logits [mb, T, V]."""
    logz = torch.logsumexp(logits, dim=-1)  # [mb, T]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, ent


def response_logp(model, inputs: dict, targets: torch.Tensor, temperature: float, fused: bool = False,
                  backend: str = "auto", with_entropy: bool = False):
    """(log-prob [mb, T], entropy [mb, T] or None) of the response tokens, differentiable in the log-prob.

    fused: hidden states + pgpo_kernels.fused_linear_logp inside the model's own forward (lm_head.fused_head_forward),
    so no [mb, T, V] tensor exists in forward or backward; else the logits path (logits, log-softmax and
    their autograd buffers)."""
    n_resp = targets.shape[1]
    if fused:
        from pgpo_kernels import fused_linear_logp
        from pgpo_train.models.lm_head import fused_head_forward

        def head(hidden, weight, bias):  # the "logits" of this forward: [mb, T] log-prob, or [mb, T, 2] with entropy
            out = fused_linear_logp(hidden, weight, targets, bias, temperature=temperature, with_entropy=with_entropy,
                                    backend=backend)
            return torch.stack(out, -1) if with_entropy else out

        out = fused_head_forward(model, inputs, n_resp, head)
        return (out[..., 0], out[..., 1]) if with_entropy else (out, None)
    return logp_entropy(response_logits(model, inputs, n_resp, temperature), targets, with_entropy)
