"""LoRA for pgpo-train through peft: adapters on the policy's linear layers (`--lora.*`), and their merge into plain
weights for the exported model folder.

The lm_head never gets an adapter (the fused lm head reads its weight as a plain matrix; many VLMs tie it to the
embeddings). Without --lora.vision the vision tower gets none either and stays frozen (peft freezes every base
weight); with it, its linear layers get adapters too.
"""

from __future__ import annotations

import torch

from pgpo_train.models import model_family


def lora_targets(model, target_modules: str, vision: bool) -> list[str]:
    """Full names of the linear layers that get an adapter; ValueError naming --lora.target-modules when none match.

    target_modules: "all-linear" or comma-separated layer names (the last part of a module's name: q_proj, v_proj)."""
    tower = model_family.vision_tower(model)
    in_tower = {id(m) for m in tower.modules()}
    head = model.get_output_embeddings()
    wanted = {t.strip() for t in target_modules.split(",") if t.strip()}
    every = wanted == {"all-linear"}
    linear, out = set(), []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or (id(module) in in_tower and not vision):
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear.add(leaf)
        if every or leaf in wanted:
            out.append(name)
    missing = sorted(wanted - linear - {"all-linear"})
    if missing or not out:
        where = "the language model and vision tower" if vision else "the language model (--lora.vision is off)"
        raise ValueError(
            f"--lora.target-modules {target_modules}: {', '.join(missing) or 'nothing'} matches no linear layer of "
            f"{where}; its linear layers: {', '.join(sorted(linear))}"
        )
    return out


def apply_lora(model, opts):
    """The policy wrapped in a peft PeftModel with LoRA adapters per opts (run.config.LoraOptions)."""
    from peft import LoraConfig
    from peft import get_peft_model

    targets = lora_targets(model, opts.target_modules, opts.vision)
    config = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                        bias="none")
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def merged_state_dict(state: dict[str, torch.Tensor], peft_model) -> dict[str, torch.Tensor]:
    """A PeftModel's full state dict (base weights and lora_A / lora_B) -> the base model's, each adapted weight
    W + (alpha / r) B A, computed in fp32 (what peft's merge_and_unload computes, without touching the live model)."""
    config = peft_model.peft_config["default"]
    scale = config.lora_alpha / config.r
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name.endswith(".base_layer.weight"):
            module = key[: -len(".base_layer.weight")]
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[name.replace(".base_layer.", ".")] = value
    return out
