"""Stand-in for flash-attn's varlen kernel (no CPU build exists): causal SDPA on each packed segment.

The trainers' padding-free paths pack a micro-batch into one row and call `flash_attn_varlen_func` with the
segments' cumulative lengths (`cu_seqlens`); everything around that call (unpadding, position ids, the patched
model forward, re-padding) is the trainers' own code. This module is the only thing the real-code tests replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, **_):
    """flash_attn.flash_attn_varlen_func's contract: q [total_q, H, D], k / v [total_k, H_kv, D] -> [total_q, H, D]."""
    if dropout_p:
        raise NotImplementedError("the stand-in runs evaluation passes only (dropout_p must be 0)")
    if tuple(window_size) not in ((-1, -1), (None, None)) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the stand-in has no sliding window, softcap or ALiBi")
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the stand-in needs the same segments for queries and keys")
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: each kv head serves `rep` query heads
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs = q[start:end].transpose(0, 1)  # [H, n, D]
        ks = k[start:end].repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(rep, 1).transpose(0, 1)
        o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), is_causal=causal,
                                           scale=softmax_scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash_attn.flash_attn_func: q [B, L, H, D] (one segment per row, no padding) -> [B, L, H, D]."""
    B, L = q.shape[:2]
    cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
    flat = [t.reshape(B * t.shape[1], *t.shape[2:]) for t in (q, k, v)]
    return flash_attn_varlen_func(*flat, cu, cu, L, L, dropout_p, softmax_scale, causal, **kwargs).view_as(q)


def transformers_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length,
                                         is_causal=True, dropout=0.0, softmax_scale=None, sliding_window=None,
                                         cu_seq_lens_q=None, cu_seq_lens_k=None, **_):
    """transformers' `_flash_attention_forward` (its wrapper around flash-attn) for unpadded rows: [B, L, H, D]."""
    # A 4-D mask only exists because the tests load the model with sdpa (flash_attention_2 needs a CUDA flash-attn):
    # transformers' flash path builds no such mask, and the trainers call this wrapper without position ids, i.e.
    # plain causal attention over each row. A 2-D mask is a padding mask: each row's attended tokens form one
    # segment (transformers unpads them for flash-attn's varlen kernel) and padded slots give zeros.
    if sliding_window is not None and sliding_window < key_states.shape[1]:
        raise NotImplementedError("the stand-in has no sliding window")
    if cu_seq_lens_q is not None:  # explicit segments (e.g. one per image in a vision tower): [1, total, H, D]
        return flash_attn_varlen_func(query_states[0], key_states[0], value_states[0], cu_seq_lens_q,
                                      cu_seq_lens_k, dropout_p=dropout, softmax_scale=softmax_scale,
                                      causal=is_causal)[None]
    if attention_mask is None or attention_mask.dim() != 2:
        return flash_attn_func(query_states, key_states, value_states, dropout, softmax_scale, is_causal)
    out = torch.zeros_like(query_states)
    for b in range(query_states.shape[0]):
        keep = attention_mask[b].bool()
        out[b, keep] = flash_attn_func(query_states[b, keep][None], key_states[b, keep][None],
                                       value_states[b, keep][None], dropout, softmax_scale, is_causal)[0]
    return out


def install_into(module) -> None:
    """Points a module that imported flash-attn's functions (transformers' flash_attention_utils, verl's qwen2_vl
    patch) at the stand-ins, with the flags their callers read."""
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_func = flash_attn_func
    # a micro-batch of one sequence (dynamic batch size) goes through transformers' flash wrapper instead
    module._flash_attention_forward = transformers_flash_attention_forward
    module._flash_supports_window_size = True
    module._flash_supports_deterministic = False
    module._flash_use_top_left_mask = False
    # flash-attn only has half-precision kernels, so the callers cast fp32 q/k/v to bf16 before calling it; the
    # stand-in is exact fp32 SDPA, so the tests keep fp32 end to end (bf16 noise would hide errors of 1e-2)
    module.fa_peft_integration_check = lambda q, k, v, target_dtype=None: (q, k, v)
