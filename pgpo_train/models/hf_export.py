"""Hugging Face model folders from a policy: `save_pretrained` (safetensors) of the model and its processor, so a
trained policy loads with `from_pretrained`, serves with vLLM and evaluates with any harness.

save_model_folder(model, processor, out, dp)   the live policy (one process, or FSDP2 shards under torchrun)
export_checkpoint(run_dir, step, out)          any checkpoint of a run dir, one-process (state.pt) or sharded (DCP)

Under torchrun the full state dict is gathered onto rank 0's CPU (get_model_state_dict with full_state_dict and
cpu_offload: the other ranks hold nothing), so a node never holds more than one full copy. Every folder is written
to a temporary directory and renamed into place: a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from pgpo_train.run.distributed import SINGLE

MODEL_DIR = "model"  # the run's final model folder: RUN_DIR/model
EXPORTS_DIR = "models"  # one folder per exported checkpoint: RUN_DIR/models/step-XXXXXXXX
RUN_CONFIG = "pgpo_config.yaml"  # the run's resolved config beside the weights: eval reads the prompt template there


# %% the live policy


def full_state_dict(model, dp=SINGLE) -> dict[str, torch.Tensor]:
    """The policy's full (unsharded) parameters and buffers, on CPU on the writer; {} on every other rank.

    Collective under torchrun (every rank calls it): each parameter is all-gathered in turn and only rank 0 keeps
    its CPU copy (torch's StateDictOptions(full_state_dict=True, cpu_offload=True))."""
    from pgpo_train.run.distributed import fsdp_modules

    if dp.world > 1 or fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts) if dp.world > 1 or dp.is_writer else {}
    return {k: v.detach() for k, v in model.state_dict().items()}


def hf_class(model) -> type:
    """The transformers class of a policy: FSDP2's dynamic subclass (FSDPQwen2_5_VL...) peeled off, so the folder's
    config.json names the class from_pretrained knows."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    while issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def export_dtype(name: str, base_model: str) -> torch.dtype:
    """--export-dtype: auto = the base model's published dtype (its config's dtype: bf16 for Qwen2.5-VL), so an
    FSDP2 run's fp32 master weights or a CPU run's fp32 copy do not double the folder; fp32 for the embedded tiny
    model (base_model ""); else the named dtype."""
    if name != "auto":
        return getattr(torch, name)
    if not base_model:
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_processor(processor, path: str) -> None:
    """processor.save_pretrained, or its tokenizer (with the chat template) and image processor where it has no
    video processor (pgpo_train.models.processor's image-only Qwen2.5-VL processor cannot save as a whole)."""
    if getattr(processor, "video_processor", "absent") is None:
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
    else:
        processor.save_pretrained(path)


def save_model_folder(model, processor, out: str, dp=SINGLE, dtype: torch.dtype | None = None,
                      run_config: str | None = None) -> str | None:
    """Writes a from_pretrained-able folder of the policy at out (replacing one there). Collective under torchrun;
    only the writer writes. Returns out on the writer, None elsewhere.

    Args:
        model: the policy (plain, or sharded with FSDP2).
        processor: its processor (tokenizer, image processor, chat template).
        dtype: floating weights cast to this dtype (None: as held).
        run_config: YAML text of the run's resolved config, written beside the weights (RUN_CONFIG).
    """
    state = full_state_dict(model, dp)
    if not dp.is_writer:
        dp.barrier()
        return None
    from pgpo_train.models.lora import is_peft
    from pgpo_train.models.lora import merged_state_dict

    if is_peft(model):  # LoRA: the adapters merged into the base weights, a plain model folder
        state = merged_state_dict(state, model)
        model = model.get_base_model()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # an empty shell on the meta device carries the config and the class name; the weights are `state`
    config = model.config
    with torch.device("meta"):
        shell = hf_class(model)(config)
    shell.generation_config = model.generation_config
    if dtype is not None:
        shell.config.dtype = dtype
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shell.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    save_processor(processor, tmp)
    if run_config is not None:
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            f.write(run_config)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    if dp.world > 1:
        dp.barrier()
    return out


# %% a run's checkpoints


def checkpoint_path(run_dir: str, step: int | None) -> str:
    """RUN_DIR/checkpoints/step-N (step None: the latest); ValueError naming what exists when there is none."""
    from pgpo_train.run.checkpoint import latest_checkpoint

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise ValueError(f"{run_dir} is not a pgpo-train run directory (no config.json)")
    have = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-")) if os.path.isdir(ckpt_dir) else []
    if step is None:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise ValueError(f"{run_dir} holds no checkpoint (the run stopped before its first one)")
        return path
    path = os.path.join(ckpt_dir, f"step-{step:08d}")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        steps = ", ".join(str(int(d.split("-")[1])) for d in have) or "none"
        raise ValueError(f"--step {step}: {run_dir} has no checkpoint at that step (steps: {steps})")
    return path


def run_config(run_dir: str):
    """The run's TrainConfig (RUN_DIR/config.json, as the run resolved it)."""
    from pgpo_train.run.config import config_from_dict

    with open(os.path.join(run_dir, "config.json")) as f:
        return config_from_dict(json.load(f))


def load_checkpoint_model(run_dir: str, step: int | None = None, dtype: str = "auto"):
    """(model, processor, checkpoint path): the run's policy on CPU with a checkpoint's weights, one-process or
    sharded (DCP, read here in one process at any saved world size)."""
    import dataclasses

    from pgpo_train.models.policy import load_policy
    from pgpo_train.run.dist_checkpoint import is_sharded

    path = checkpoint_path(run_dir, step)
    cfg = run_config(run_dir)
    # the architecture (the base model, or the embedded tiny one by its seed); the checkpoint's weights replace its
    load_dtype = str(export_dtype(dtype, cfg.model)).removeprefix("torch.")
    cfg = dataclasses.replace(cfg, device="cpu", gradient_checkpointing=False, freeze_vision=False, dtype=load_dtype)
    model, processor = load_policy(cfg, torch.device("cpu"))
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        # only the model's entries are read, not the optimizer's; no_dist: one process reads every rank's shards
        no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        set_model_state_dict(model, state["model"])
    else:
        payload = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False, mmap=True)
        model.load_state_dict(payload["model"])
    return model, processor, path


def export_checkpoint(run_dir: str, step: int | None = None, out: str = "", dtype: str = "auto") -> str:
    """Writes a Hugging Face folder of a run's checkpoint (default out: RUN_DIR/models/step-XXXXXXXX)."""
    from pgpo_train.run.config_file import config_yaml

    model, processor, path = load_checkpoint_model(run_dir, step, dtype)
    out = out or os.path.join(run_dir, EXPORTS_DIR, os.path.basename(path))
    cfg = run_config(run_dir)
    save_model_folder(model, processor, out, dtype=export_dtype(dtype, cfg.model), run_config=config_yaml(cfg))
    return out


# %% the training loop's exports


def export_run_model(cfg, model, processor, dp=SINGLE, name: str = "") -> str | None:
    """The run's model folder: RUN_DIR/model (name ""), or RUN_DIR/models/NAME beside a checkpoint, in
    --export-dtype with the run's config.yaml inside. Collective under torchrun; the folder's path on the writer."""
    from pgpo_train.run.config_file import config_yaml

    out = os.path.join(cfg.out_dir, EXPORTS_DIR, name) if name else os.path.join(cfg.out_dir, MODEL_DIR)
    return save_model_folder(model, processor, out, dp, export_dtype(cfg.export_dtype, cfg.model), config_yaml(cfg))
