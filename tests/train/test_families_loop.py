"""pgpo-train's own loop (rollout, old log-probs with both passes, PGPO weights, update) on the 1-D rope families
of pgpo_train.models.model_family, with their tiny random models (pgpo_train.models.tiny_families)."""

import pytest
import torch

from pgpo_train.data.tasks import make_count_records
from pgpo_train.models import model_family as mf
from pgpo_train.models import policy
from pgpo_train.models.tiny_families import build_tiny_family
from pgpo_train.rl import core_algos
from pgpo_train.run.config import TrainConfig
from pgpo_train.step import batching
from pgpo_train.step import sampling
from pgpo_train.step import scoring
from pgpo_train.step import update

ONE_D = ["gemma3", "llava_onevision", "idefics3", "smolvlm", "internvl"]


@pytest.mark.parametrize("name", ONE_D)
def test_pgpo_train_step_runs_on_1d_rope_families(name):
    """One RL step: the loop accepts the family, micro-batches keep each row's image (micro_batch_size 1 < B), old
    log-probs match the update's forward (ppo_kl ~ 0), the PGPO weights are non-uniform, gradients flow."""
    cfg = TrainConfig(algo="pgpo", max_new_tokens=6, micro_batch_size=1).resolved()
    cfg.pgpo.backend = "torch"
    model, processor = build_tiny_family(name)
    mf.check_processor(model, processor)  # no refusal
    opt = policy.make_optimizer(model, 1e-3, 0.0)
    batch, _ = sampling.rollout(model, processor, make_count_records(2, seed=0), cfg, "cpu", {})
    batch.pop("texts")
    assert batch["position_ids"].shape == batch["input_ids"].shape  # 1-D positions
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] or name == "internvl"  # one image per row
    assert not torch.isin(batch["responses"], torch.tensor(mf.special_ids(model))).any()
    noisy = batch["rewards"] + torch.arange(len(batch["rewards"])).float()
    batch["advantages"], _ = core_algos.get_adv_estimator_fn("grpo")(noisy, cfg.group_size)
    batch.update(scoring.old_logp_and_scores(model, batch, cfg, {}))
    _, w = scoring.token_advantages(batch, cfg, {})
    assert w["pgpo/weight_max"] > 1.0 > w["pgpo/weight_min"]
    tok_adv, _ = scoring.token_advantages(batch, cfg, {})
    m = update.policy_update(model, opt, batch, tok_adv, cfg, {})
    assert abs(m["actor/ppo_kl"]) < 1e-5 and m["actor/grad_norm"] > 0


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3", "idefics3", "internvl"])
def test_micro_batch_rows_see_their_own_image(name):
    """select_rows keeps row i's image with row i: a micro-batch's visual logits equal the full batch's rows."""
    cfg = TrainConfig(algo="grpo", max_new_tokens=4).resolved()
    model, processor = build_tiny_family(name)
    model.eval()
    recs = make_count_records(2, seed=1)
    batch, _ = sampling.rollout(model, processor, recs, cfg, "cpu", {})
    batch.pop("texts")
    T = batch["responses"].shape[1]
    full = policy.response_logits(model, batching.visual_kwargs(model, batch), T, 1.0)
    idx = torch.tensor([batch["input_ids"].shape[0] - 1, 0])
    part = policy.response_logits(model, batching.visual_kwargs(model, batching.select_rows(model, batch, idx)), T, 1.0)
    torch.testing.assert_close(part, full[idx], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_refill_concat_keeps_the_1d_families_image_tensors():
    """Dynamic sampling's concat_rollouts merges two rounds' image tensors (LLaVA-OneVision's image_sizes too): each
    merged row's visual logits equal its own round's."""
    from pgpo_train.step.batching import concat_rollouts

    cfg = TrainConfig(algo="grpo", max_new_tokens=4).resolved()
    model, processor = build_tiny_family("llava_onevision")
    model.eval()
    parts = []
    for seed in (2, 3):
        b, _ = sampling.rollout(model, processor, make_count_records(1, seed=seed), cfg, "cpu", {})
        b.pop("texts")
        parts.append(b)
    merged = concat_rollouts(model, parts, processor.tokenizer.pad_token_id)
    assert merged["image_sizes"].shape[0] == merged["pixel_values"].shape[0] == merged["input_ids"].shape[0]
    T = merged["responses"].shape[1]
    logits = policy.response_logits(model, batching.visual_kwargs(model, merged), T, 1.0)
    n0 = parts[0]["input_ids"].shape[0]
    for i, p in enumerate(parts):
        t = p["responses"].shape[1]
        own = policy.response_logits(model, batching.visual_kwargs(model, p), t, 1.0)
        rows = slice(i * n0, i * n0 + p["input_ids"].shape[0])
        mask = p["response_mask"].bool()
        torch.testing.assert_close(logits[rows, :t][mask], own[mask], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_internvl_rows_own_their_tiles():
    """InternVL's processor tiles each image into crops: num_tiles counts each row's, select_rows keeps them whole."""
    cfg = TrainConfig(algo="grpo", max_new_tokens=4).resolved()
    model, processor = build_tiny_family("internvl")
    batch, _ = sampling.rollout(model, processor, make_count_records(2, seed=4), cfg, "cpu", {})
    tiles = batch["num_tiles"]
    assert int(tiles.sum()) == batch["pixel_values"].shape[0] and bool((tiles > 1).all())
    sel = batching.select_rows(model, batch, torch.tensor([3]))
    first = int(tiles[:3].sum())
    torch.testing.assert_close(sel["pixel_values"], batch["pixel_values"][first : first + int(tiles[3])])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava_onevision", "idefics3", "internvl"])
def test_vision_tower_found_for_freeze_vision(family):
    """--freeze-vision freezes the family's own vision encoder (Qwen `visual`, others `vision_tower`/`vision_model`)."""
    from pgpo_train.models import model_family
    from pgpo_train.models.tiny_families import build_tiny_family

    built = build_tiny_family(family)
    model = built[0] if isinstance(built, tuple) else built
    tower = model_family.vision_tower(model)
    ids = {id(p) for p in tower.parameters()}
    assert ids and ids < {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in model.get_output_embeddings().parameters())
