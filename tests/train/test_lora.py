"""LoRA in pgpo-train (--lora.*, peft): which layers get adapters, a target that matches nothing refused, a PGPO run
(text-only pass, fused lm head) that trains only the adapters, its merged model folder reproducing the adapted
policy's log-probs, and a 2-rank FSDP2 (gloo) LoRA run equal to one process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pgpo_train.cli import main
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models.lora import lora_targets
from pgpo_train.models.policy import response_logp
from pgpo_train.models.tiny import build_tiny
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import visual_kwargs


def _logp(model, processor) -> torch.Tensor:
    records = make_count_records(3, seed=5)
    prompt = encode_prompts(processor, records, "tiny", 1, torch.device("cpu"))
    responses = torch.randint(10, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = build_sequences(model, prompt, responses, torch.ones_like(responses), processor.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        return response_logp(model, visual_kwargs(model, batch), batch["responses"], 1.0)[0]


def _load(folder):
    from transformers import AutoModelForImageTextToText

    from pgpo_train.models.processor import load_processor

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32), load_processor(folder)


def test_targets():
    model, _ = build_tiny()
    every = lora_targets(model, "all-linear", vision=False)
    assert every and not any("visual" in n or n.endswith("lm_head") for n in every)
    qv = lora_targets(model, "q_proj, v_proj", vision=False)
    assert qv and all(n.endswith((".q_proj", ".v_proj")) for n in qv) and len(qv) == 2 * 2  # 2 layers
    with_vision = lora_targets(model, "all-linear", vision=True)
    assert any("visual" in n for n in with_vision) and len(with_vision) > len(every)
    with pytest.raises(ValueError, match=r"--lora.target-modules qproj: qproj matches no linear layer .* q_proj"):
        lora_targets(model, "qproj", vision=False)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora_targets(model, "qkv", vision=False)  # the vision blocks' qkv: not targeted without --lora.vision


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return save_count_dataset(tmp_path_factory.mktemp("data") / "count", n_train=32, n_test=4, seed=0)


LORA_RUN = {"dataset": None, "prompt_template": "tiny", "steps": 1, "sft_steps": 2, "sft_batch_size": 4,
            "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "eval_every": 0, "tensorboard": False,
            "progress": False, "save_every": 1, "lr": 1e-2, "sft_lr": 1e-2, "seed": 1,
            "dynamic_sampling": "off"}  # every group kept: the text-only pass runs even when all rewards tie


def _lora_cfg(data, out, **kw):
    from pgpo_train.run.config import LoraOptions
    from pgpo_train.run.config import TrainConfig

    cfg = TrainConfig(**{**LORA_RUN, "dataset": data, "out_dir": str(out), **kw})
    cfg.lora = LoraOptions(rank=4, alpha=8.0, target_modules="all-linear")
    return cfg


def test_pgpo_lora_run_trains_adapters_only_and_exports_merged(data, tmp_path):
    from pgpo_train.recipe.train import train

    cfg = _lora_cfg(data, tmp_path / "run")
    cfg.pgpo.fused_lm_head, cfg.pgpo.backend = "on", "torch"  # the fused lm head under peft
    out = train(cfg)
    model, processor = out["model"], out["processor"]
    assert type(model).__name__ == "PeftModel"
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["pgpo/fused_lm_head"] == 1.0 and "pgpo/kl_mean" in line, "the text-only pass ran, fused"
    init, _ = build_tiny(seed=cfg.seed)
    base = model.get_base_model().state_dict()
    for k, v in init.state_dict().items():  # peft renames adapted weights to .base_layer.weight
        key = k if k in base else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base[key], v), f"{k} moved: only the adapters train"
    assert any(n.endswith("lora_B.default.weight") and p.abs().max() > 0 for n, p in model.named_parameters())
    folder = tmp_path / "run" / "model"
    merged, merged_processor = _load(folder)
    assert "lora" not in " ".join(merged.state_dict())
    want, got = _logp(model, processor), _logp(merged, merged_processor)
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()
    # from the checkpoint (the adapters re-applied on the base, then merged) and through pgpo-train eval
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
    again, _ = _load(tmp_path / "again")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in merged.state_dict().items())
    assert main(["eval", str(tmp_path / "run"), "--k", "1", "--max-samples", "2", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0


def test_lora_target_matching_nothing_fails_at_start(data, tmp_path, capsys):
    code = main(["--dataset", data, "--prompt-template", "tiny", "--sft-steps", "0", "--lora.rank", "4",
                 "--lora.target-modules", "nope_proj", "--out-dir", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    assert "--lora.target-modules nope_proj: nope_proj matches no linear layer" in capsys.readouterr().err


# %% torchrun: 2 gloo ranks, FSDP2 over the PeftModel


def _worker(rank: int, world: int, port: int, cfg_json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pgpo_train.recipe.train import train
    from pgpo_train.run.config import config_from_dict
    from pgpo_train.run.distributed import teardown

    train(config_from_dict(json.loads(cfg_json)))
    teardown()


def test_two_rank_lora_run_equals_one_process(data, tmp_path):
    import dataclasses

    from pgpo_train.recipe.train import train

    one = _lora_cfg(data, tmp_path / "one", steps=0)  # the SFT steps: every rank's update is the same global one
    train(one)
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, json.dumps(dataclasses.asdict(two))), nprocs=2, join=True)
    a, processor = _load(tmp_path / "one" / "model")
    b, _ = _load(tmp_path / "two" / "model")
    init, _ = build_tiny(seed=one.seed)
    moved = max((v - init.state_dict()[k]).abs().max().item() for k, v in a.state_dict().items())
    assert moved > 1e-4, "the adapters trained"
    diff = max((v - b.state_dict()[k]).abs().max().item() for k, v in a.state_dict().items())
    assert diff < 1e-5, diff
    assert (_logp(a, processor) - _logp(b, processor)).abs().max().item() < 1e-4
