"""The adapters' PGPO passes from hidden states: the exact token KL without [b, T, V] logits.

TRL 1.16 never builds the logits of its own passes (its fused LM head returns log-probs), so PGPO's two extra
passes should not either: both stop at the last hidden states and `fused_linear_token_kl` applies the lm_head tile by
tile. Used where the model's logits are plain `lm_head(hidden)` (pgpo_train.models.lm_head's rules, TRL's own fused-head
patch allowed); elsewhere the adapter keeps the logits path.
"""

from __future__ import annotations

import os

import torch

from pgpo_kernels import fused_linear_token_kl
from pgpo_train.models import model_family
from pgpo_train.models.lm_head import fused_lm_head_problem
from pgpo_train.models.lm_head import lm_head_params
from pgpo_train.models.lm_head import response_hidden


def is_trl_fused_head(model) -> bool:
    """True when the instance forward is TRL's add_fused_lm_head wrapper (the original forward unless
    fused_lm_head=True is passed)."""
    fwd = vars(model).get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)  # functools.wraps copied the names: the code
    return code is not None and code.co_name == "_fused_forward" and (  # object is TRL's own
        f"{os.sep}trl{os.sep}" in code.co_filename)


def plain_head_problem(model) -> str | None:
    """Why the hidden-state path would not reproduce the model's logits (None: it would)."""
    return fused_lm_head_problem(model_family.unwrap(model), allow_forward=is_trl_fused_head)


def fused_token_kl(model, vis_kw: dict, txt_kw: dict, n_resp: int, temperature: float, backend: str) -> torch.Tensor:
    """S_t [b, T] of the last n_resp tokens from both passes' hidden states and the lm_head: no [b, T, V] tensor.

    Hidden states are cast to the lm_head's dtype (under autocast they may come out 16-bit while the head is fp32);
    the KL then uses the head's precision, where the logits path would use autocast's."""
    bare = model_family.unwrap(model)
    weight, bias = lm_head_params(bare)
    h_vis = response_hidden(bare, vis_kw, n_resp).to(weight.dtype)  # [b, T, H]
    h_txt = response_hidden(bare, txt_kw, n_resp).to(weight.dtype)
    return fused_linear_token_kl(h_vis, h_txt, weight, bias, temperature=temperature, backend=backend)
