"""PGPO on EasyR1's real worker and actor code, CPU, tiny Qwen2.5-VL: a script, run by hand in EasyR1's environment.

    python3 -m venv /tmp/venv-easyr1 && . /tmp/venv-easyr1/bin/activate
    pip install torch==2.13.0 && pip install transformers==4.56.2 peft==0.17.1 "datasets<4" "accelerate<1.12" \
        triton==3.9.0 ray einops codetiming omegaconf tensordict pillow psutil pandas pyarrow mathruler pylatexenc
    PYTHONPATH=/path/to/EasyR1:/path/to/pgpo python tests/support/easyr1_real_check.py

EasyR1 is not a pip package and pins transformers < 5, so CI cannot run this next to the main suite; what it relies
on is encoded in tests/integrations/test_easyr1_contracts.py. What runs here is EasyR1's: `FSDPWorker.
_process_multi_modal_inputs` (its uid cache, called exactly as its compute_log_probs / update_actor call it),
`DataParallelPPOActor.compute_log_prob` (padding-free and padded, dynamic batching on and off), its model patch
`apply_ulysses_patch` (Qwen2-VL forward + flash attention function), its `get_rope_index` and its `DataProto`.
Stood in for: flash-attn (varlen kernel as per-segment SDPA, bert_padding's unpad/pad as plain torch), vLLM (its
modules are empty stubs: no sampling runs; responses are random text tokens), qwen_vl_utils (video fetching only,
unused) and the CUDA device moves of the worker's methods (the worker's compute_log_probs is called as its two
steps: the cache, then the actor).

Prints, per option, the max abs difference of the text-only log-probs against a direct HF computation (visual
tokens deleted, positions kept), and checks the two uid-cache traps and pgpo_step end to end.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import flash_standin  # noqa: E402

# ---------------------------------------------------------------- stand-ins (before EasyR1 is imported)


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers' availability probes call find_spec
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash_attn.bert_padding.unpad_input: the attended rows, their flat indices, cu_seqlens, max length."""
    seqlens = attention_mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu, int(seqlens.max()), seqlens


def _pad_input(hidden_states, indices, batch, seqlen):
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


class _Stub:
    def __init__(self, *a, **k):
        raise RuntimeError("vLLM is stood in for here: no rollout runs")


import einops  # noqa: E402

_module("flash_attn", flash_attn_func=flash_standin.flash_attn_func,
        flash_attn_varlen_func=flash_standin.flash_attn_varlen_func)
_module("flash_attn.bert_padding", unpad_input=_unpad_input, pad_input=_pad_input,
        index_first_axis=lambda x, idx: x[idx], rearrange=einops.rearrange)
for name in ("vllm", "vllm.lora", "vllm.lora.models", "vllm.lora.request", "vllm.lora.utils", "vllm.lora.worker_manager",
             "vllm.distributed", "vllm.distributed.parallel_state"):
    _module(name, LLM=_Stub, RequestOutput=_Stub, SamplingParams=_Stub, LoRARequest=_Stub, LoRAModel=_Stub,
            LRUCacheWorkerLoRAManager=_Stub, get_adapter_absolute_path=_Stub, parallel_state=None)
_module("qwen_vl_utils")
_module("qwen_vl_utils.vision_process", fetch_video=_Stub)

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from verl.models.monkey_patch import apply_ulysses_patch  # noqa: E402
from verl.models.transformers import flash_attention_utils  # noqa: E402
from verl.models.transformers.qwen2_vl import get_rope_index  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.workers.actor.config import ActorConfig  # noqa: E402
from verl.workers.actor.dp_actor import DataParallelPPOActor  # noqa: E402
from verl.workers.fsdp_workers import FSDPWorker  # noqa: E402

from pgpo_train.integrations import easyr1  # noqa: E402
from pgpo_train.integrations import pgpo_text_only_batch  # noqa: E402
from pgpo_train.integrations.checks import PGPODidNotRunError  # noqa: E402
from pgpo_train.models.tiny_families import build_family_tokenizer  # noqa: E402

flash_standin.install_into(flash_attention_utils)

# ---------------------------------------------------------------- a tiny Qwen2.5-VL in transformers 4.x


def tiny_qwen25_vl():
    tok = build_family_tokenizer("qwen2_5_vl")
    ids = tok.convert_tokens_to_ids
    config = transformers.Qwen2_5_VLConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "fullatt_block_indexes": [1]})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = types.SimpleNamespace(tokenizer=tok, image_processor=image_processor)
    return model, processor


def main():
    model, processor = tiny_qwen25_vl()
    tok, ids = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids
    g = torch.Generator().manual_seed(3)
    special = set(tok.all_special_ids) | {model.config.image_token_id, model.config.video_token_id}
    text_ids = torch.tensor([i for i in range(len(tok)) if i not in special])
    n, rows = 2, []
    for k in range(2):
        image = Image.fromarray((np.random.default_rng(k).random((84, 84, 3)) * 255).astype("uint8"))
        mm = dict(processor.image_processor(images=[image], return_tensors="pt"))
        n_img = int(mm["image_grid_thw"].prod()) // 4
        prompt = torch.tensor(tok.encode("<|im_start|>user\n") + [ids("<|vision_start|>")]
                              + [model.config.image_token_id] * n_img + [ids("<|vision_end|>")]
                              + tok.encode(f"how many {k}?<|im_end|>\n<|im_start|>assistant\n"))
        vision = get_rope_index(processor, input_ids=prompt, image_grid_thw=mm["image_grid_thw"],
                                attention_mask=torch.ones_like(prompt))  # EasyR1's own, (3, P)
        prompt_pos = torch.cat([torch.arange(len(prompt))[None], vision], 0)  # (4, P), as EasyR1's dataset
        for _ in range(n):
            resp = text_ids[torch.randint(len(text_ids), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)]
            rows.append((prompt, resp, prompt_pos, image, mm, f"uid-{k}"))
    P, T, B = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows), len(rows)
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    prompts, responses = torch.full((B, P), pad), torch.full((B, T), pad)
    am, pos = torch.zeros(B, P + T, dtype=torch.long), torch.zeros(B, 4, P, dtype=torch.long)
    for i, (p, r, ps, *_) in enumerate(rows):
        prompts[i, P - len(p):], responses[i, :len(r)] = p, r
        am[i, P - len(p):P + len(r)] = 1
        pos[i, :, P - len(p):] = ps  # left padding keeps position 0 (EasyR1's postprocess_data)
    # EasyR1's vLLM rollout: every response slot (padding too) continues from the prompt's last position
    pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, T + 1).view(1, 1, -1)], -1)  # (B, 4, P + T)
    placeholders = torch.tensor([model.config.image_token_id, model.config.video_token_id])

    @torch.no_grad()
    def direct(text_only):
        out = torch.zeros(B, T)
        for i, (p, r, _, _, mm, _) in enumerate(rows):
            full = torch.cat([p, r])
            ps = pos[i][:, am[i].bool()]
            keep = torch.ones(len(full), dtype=torch.bool)
            kw = {"pixel_values": mm["pixel_values"], "image_grid_thw": mm["image_grid_thw"]}
            if text_only:
                keep[:len(p)], kw = ~torch.isin(p, placeholders), {}
            logits = model(input_ids=full[keep][None], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                           position_ids=ps[1:, keep][:, None], **kw).logits[0].float()
            out[i, :len(r)] = logits.log_softmax(-1)[:-1].gather(-1, full[keep][1:, None])[:, 0][-len(r):]
        return out

    ref_vis, ref_txt = direct(False), direct(True)  # before EasyR1 patches the classes
    apply_ulysses_patch("qwen2_5_vl")
    model.config._attn_implementation = "flash_attention_2"  # EasyR1 loads with it; its patch owns that name now
    for layer in model.model.language_model.layers:
        layer.self_attn.config._attn_implementation = "flash_attention_2"

    def batch():
        return DataProto.from_dict(
            tensors={"prompts": prompts, "responses": responses, "response_mask": am[:, P:].clone(), "input_ids":
                     torch.cat([prompts, responses], 1), "attention_mask": am, "position_ids": pos},
            non_tensors={"multi_modal_data": np.array([{"images": [r[3]]} for r in rows], dtype=object),
                         "uid": np.array([r[5] for r in rows], dtype=object)},
            meta_info={"min_pixels": 56 * 56, "max_pixels": 112 * 112, "video_fps": 2.0,
                       "global_token_num": am.sum(-1).tolist()})

    worker = object.__new__(FSDPWorker)  # the real method; its __init__ builds process groups and FSDP on CUDA
    worker._cache, worker.processor = {}, processor
    mask = am[:, P:].bool()
    failures = []

    def compute_log_probs(actor, data):  # FSDPWorker.compute_log_probs without the CUDA moves and offloading
        FSDPWorker._process_multi_modal_inputs(worker, data)
        data.meta_info["temperature"] = 1.0
        return DataProto.from_dict(tensors={"old_log_probs": actor.compute_log_prob(data=data)})

    for padding_free in (True, False):
        for dynamic in (False, True):
            actor = DataParallelPPOActor(ActorConfig(padding_free=padding_free, dynamic_batching=dynamic,
                                                     micro_batch_size_per_device_for_experience=2,
                                                     use_torch_compile=False), model)
            worker._cache.clear()
            data = batch()
            vis = compute_log_probs(actor, data).batch["old_log_probs"]
            txt = compute_log_probs(actor, easyr1.text_only_batch(data, model.config)).batch["old_log_probs"]
            d_txt = float((txt - ref_txt)[mask].abs().max())
            d_vis = float((vis - ref_vis)[mask].abs().max())
            print(f"padding_free={padding_free} dynamic_batching={dynamic}: text-only max abs diff {d_txt:.2e}, "
                  f"with image {d_vis:.2e} (image effect {float((ref_vis - ref_txt)[mask].abs().max()):.3f})")
            if max(d_txt, d_vis) > 1e-5:
                failures.append((padding_free, dynamic, d_txt, d_vis))
            FSDPWorker._process_multi_modal_inputs(worker, data)  # what update_actor does next with the batch
            if "pixel_values" not in data.non_tensor_batch["multi_modal_inputs"][0]:
                failures.append("the update after the twin lost the images")

    # the trap, both ways, with the naive twin ({} per sample, uids kept)
    actor = DataParallelPPOActor(ActorConfig(padding_free=True, dynamic_batching=False,
                                             micro_batch_size_per_device_for_experience=2, use_torch_compile=False),
                                 model)
    worker._cache.clear()
    data = batch()
    compute_log_probs(actor, data)
    naive = pgpo_text_only_batch(data, model.config, multimodal_keys=("multi_modal_data", "multi_modal_inputs"))
    try:
        compute_log_probs(actor, naive)
        failures.append("the naive twin after the with-image pass did not fail")
    except ValueError as e:
        print("naive twin after the with-image pass:", str(e)[:90])
    worker._cache.clear()
    data, naive = batch(), None
    naive = pgpo_text_only_batch(data, model.config, multimodal_keys=("multi_modal_data", "multi_modal_inputs"))
    compute_log_probs(actor, naive)
    FSDPWorker._process_multi_modal_inputs(worker, data)
    print("naive twin first: the update's multi_modal_inputs[0] =", data.non_tensor_batch["multi_modal_inputs"][0])
    if data.non_tensor_batch["multi_modal_inputs"][0] != {}:
        failures.append("expected the naive-twin-first trap to strip the update's images")

    # pgpo_step + check_ran with a trainer whose worker group is the worker above
    worker._cache.clear()
    data = batch()
    data = data.union(compute_log_probs(actor, data))
    data.batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * am[:, P:]
    trainer = types.SimpleNamespace(actor_rollout_ref_wg=types.SimpleNamespace(
        compute_log_probs=lambda d: compute_log_probs(actor, d)))
    metrics = {}
    easyr1.pgpo_step(trainer, data, metrics, model_config=model.config, tau=0.4, beta=2.0)
    easyr1.check_ran(metrics)
    try:
        easyr1.check_ran({})
        failures.append("check_ran accepted a step without PGPO")
    except PGPODidNotRunError:
        pass
    print("pgpo_step metrics:", {k: round(v, 4) for k, v in metrics.items() if k in ("pgpo/kl_mean",
                                                                                  "pgpo/weight_max")})
    easyr1_dir = os.path.dirname(os.path.dirname(sys.modules["verl"].__file__))
    rev = subprocess.run(["git", "-C", easyr1_dir, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"EasyR1 at {easyr1_dir} {rev or '(not a git checkout)'}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    if failures:
        raise SystemExit(f"FAILED: {failures}")
    print("OK")


if __name__ == "__main__":
    main()
