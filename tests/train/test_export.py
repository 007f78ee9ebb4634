"""Hugging Face model folders of a policy (pgpo_train.models.hf_export, `pgpo-train export`): the folder loads with
from_pretrained and gives the trained policy's log-probs (fp32, 1e-6); one-process and sharded (2-rank gloo FSDP2,
DCP) checkpoints alike; rank 1 never holds the full state dict."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pgpo_train.cli import main
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models import hf_export
from pgpo_train.models.policy import response_logp
from pgpo_train.models.tiny import build_tiny
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import visual_kwargs


def _logp(model, processor) -> torch.Tensor:
    """[B, T] log-probs of fixed responses to 4 tiny prompts (3 with an image each), fp32."""
    gen = torch.Generator().manual_seed(0)
    records = make_count_records(4, seed=3)
    prompt = encode_prompts(processor, records, "tiny", 1, torch.device("cpu"))
    responses = torch.randint(10, 300, (4, 12), generator=gen)
    mask = torch.ones_like(responses)
    mask[1, 7:] = 0
    batch = build_sequences(model, prompt, responses, mask, processor.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp, _ = response_logp(model, visual_kwargs(model, batch), batch["responses"], 1.0)
    return lp * batch["response_mask"]


def _load(folder):
    from transformers import AutoModelForImageTextToText

    from pgpo_train.models.processor import load_processor

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32), load_processor(folder)


def _perturbed_tiny(seed: int = 0):
    """The tiny model with weights moved off their init (a trained policy stand-in the same on every rank)."""
    model, processor = build_tiny(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model, processor


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return save_count_dataset(tmp_path_factory.mktemp("data") / "count", n_train=64, n_test=8, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A one-process run: 2 SFT steps + 1 RL step, a checkpoint after each step."""
    from pgpo_train.recipe.train import train

    out = tmp_path_factory.mktemp("run") / "r"
    cfg = TrainConfig(dataset=data, prompt_template="tiny", out_dir=str(out), steps=1, sft_steps=2, sft_batch_size=4,
                      sft_lr=1e-2, prompts_per_step=2, group_size=2, max_new_tokens=8, eval_every=0,
                      tensorboard=False, progress=False, save_every=1, keep_checkpoints=3, export_model=False)
    summary = train(cfg)
    return {"dir": str(out), "model": summary["model"], "processor": summary["processor"]}


def test_export_cli_reproduces_the_trained_policy(run):
    folder = os.path.join(run["dir"], "exported")
    assert main(["export", run["dir"], "--out", folder]) == 0
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", hf_export.RUN_CONFIG} <= files
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    model, processor = _load(folder)
    want = _logp(run["model"], run["processor"])
    got = _logp(model, processor)
    assert (want != 0).any()
    assert (got - want).abs().max().item() <= 1e-6


def test_eval_of_a_run_without_a_model_folder_reads_its_latest_checkpoint(run, tmp_path):
    """No RUN_DIR/model (--no-export-model): eval loads the latest checkpoint, and answers as the exported folder."""
    assert not os.path.exists(os.path.join(run["dir"], hf_export.MODEL_DIR))
    folder = os.path.join(run["dir"], "exported-for-eval")
    assert main(["export", run["dir"], "--out", folder]) == 0
    rows = {}
    for name, target in (("run", run["dir"]), ("folder", folder)):
        out = tmp_path / name
        assert main(["eval", target, "--k", "2", "--max-samples", "4", "--out", str(out), "--no-progress"]) == 0
        rows[name] = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert rows["run"] == rows["folder"] and len(rows["run"]) == 4 * 3


def test_export_an_earlier_step_and_a_missing_one(run, capsys):
    out = hf_export.export_checkpoint(run["dir"], step=1)
    assert out.endswith(os.path.join("models", "step-00000001"))
    model, _ = _load(out)
    final = run["model"].state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in model.state_dict().items()), "step 1 is not the last step"
    assert main(["export", run["dir"], "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "--step 7" in err and "steps: 1, 2, 3" in err
    assert main(["export", os.path.dirname(run["dir"])]) == 2
    assert "not a pgpo-train run directory" in capsys.readouterr().err


def test_save_model_folder_of_the_live_policy_in_bf16(tmp_path):
    model, processor = _perturbed_tiny()
    folder = hf_export.save_model_folder(model, processor, str(tmp_path / "m"), dtype=torch.bfloat16)
    loaded, _ = _load(folder)
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert not any(n.startswith("m.tmp") for n in os.listdir(tmp_path)), "the temporary folder is renamed away"


# %% under torchrun: FSDP2 shards on 2 gloo ranks


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pgpo_train.run import dist_checkpoint
    from pgpo_train.run import distributed

    dp = distributed.setup("cpu")
    model, processor = _perturbed_tiny()
    model = distributed.shard_policy(model, torch.device("cpu"))
    held = hf_export.full_state_dict(model, dp)
    with open(os.path.join(root, f"held{rank}.json"), "w") as f:
        json.dump(len(held), f)
    del held
    hf_export.save_model_folder(model, processor, os.path.join(root, "live"), dp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dist_checkpoint.save(dp, os.path.join(root, "run", "checkpoints"), 5, model, optimizer, {"step": 5})
    distributed.teardown()


def test_two_rank_fsdp2_export_live_and_from_dcp(tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    with open(run_dir / "config.json", "w") as f:  # the run's config: the embedded tiny model, seed 0
        json.dump({"seed": 0, "prompt_template": "tiny"}, f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ref, ref_processor = _perturbed_tiny()
    held = [json.load(open(tmp_path / f"held{r}.json")) for r in range(2)]
    assert held[0] == len(ref.state_dict()) and held[1] == 0, "only rank 0 holds the full state dict"
    assert os.path.isfile(run_dir / "checkpoints" / "step-00000005" / ".metadata"), "a sharded (DCP) checkpoint"
    want = _logp(ref, ref_processor)
    live, processor = _load(tmp_path / "live")
    assert (_logp(live, processor) - want).abs().max().item() <= 1e-6
    assert main(["export", str(run_dir)]) == 0
    exported, processor = _load(run_dir / "models" / "step-00000005")
    assert (_logp(exported, processor) - want).abs().max().item() <= 1e-6
