"""PGPO on verl 0.9.1's real code: run in the second venv (.ci/run's .venv-verl, transformers as verl pins it) by
tests/integrations/test_verl_real_code.py; not collected by the main suite (its transformers is newer than verl
allows, and verl's model patches replace transformers classes process-wide).

What runs is verl's: the FSDP engine worker (`ActorRolloutRefWorker`, role actor, FSDP2 over one gloo process) with
`apply_monkey_patch`, `RayPPOTrainer._compute_old_log_prob` / `_update_actor` (DataProto -> no-padding TensorDict
-> worker -> re-pad), its padding-free and padded engine paths, dynamic batch size, and its agent loop's position
ids ([B, 4, L]: text row + 3 mrope rows). Stood in for: the CUDA device (tests/support/verl_cpu.py) and
flash-attn's varlen kernel (per-segment SDPA, tests/support/flash_standin.py).

Acceptance figure: the text-only log-probs of PGPO's twin through that path against a direct HF computation of the
same model before verl patched it (visual tokens deleted, the other tokens' positions kept), max abs difference.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import types

import numpy as np
import pytest
import torch
import verl_cpu  # noqa: I001 - before verl's device layer is first asked for a device

verl_cpu.use_cpu_platform()

import verl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402

from pgpo_train.data.loading import build_prompt  # noqa: E402
from pgpo_train.data.tasks import make_count_records  # noqa: E402
from pgpo_train.integrations import PGPOVerlTrainerMixin  # noqa: E402
from pgpo_train.integrations import pgpo_text_only_batch  # noqa: E402
from pgpo_train.integrations import verl_qwen2_vl_fix  # noqa: E402
from pgpo_train.integrations.checks import PGPO_RAN_METRIC  # noqa: E402
from pgpo_train.integrations.checks import check_verl_config  # noqa: E402
from pgpo_train.models import model_family  # noqa: E402
from pgpo_train.models.tiny_families import build_tiny_family  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
N_PROMPTS, N = 2, 2  # prompts x responses each
TOL = 1e-5  # fp32 end to end; the image's own effect on these log-probs is ~0.08 (a wrong pass is far off)
REPORT = os.environ.get("PGPO_REAL_CODE_REPORT")  # a JSON file the figures are appended to, if set
ORIGINAL_GET_INPUT_EMBEDS = None  # verl's own no-image branch, before the fix (set in `rollouts`)


class PGPORayPPOTrainer(PGPOVerlTrainerMixin, RayPPOTrainer):
    pass


def _rope_processor(processor, model):
    """The processor with the model's get_rope_index bound, as verl.utils.tokenizer.hf_processor binds it."""
    import transformers

    cls = {"qwen2_vl": transformers.Qwen2VLModel, "qwen2_5_vl": transformers.Qwen2_5_VLModel,
           "qwen3_vl": transformers.Qwen3VLModel}[model.config.model_type]
    processor.config = model.config
    processor.get_rope_index = types.MethodType(cls.get_rope_index, processor)
    if hasattr(cls, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(cls.get_vision_position_ids, processor)
    return processor


@torch.no_grad()
def _rollout(family: str) -> dict:
    """A rollout batch in verl's layout (agent-loop position ids, left-padded prompts, right-padded responses of
    varied length, one image per prompt) and the direct HF log-probs with and without the image."""
    model, processor = build_tiny_family(family)
    model.eval()
    tok = processor.tokenizer
    path = tempfile.mkdtemp(prefix=f"pgpo-verl-{family}-")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    loop = types.SimpleNamespace(processor=_rope_processor(processor, model))
    special = set(model_family.special_ids(model)) | set(tok.all_special_ids)
    text_ids = torch.tensor([i for i in range(len(tok)) if i not in special])
    g = torch.Generator().manual_seed(3)
    rows = []
    for rec in make_count_records(N_PROMPTS, seed=1):
        text = processor.apply_chat_template(build_prompt(rec["problem"], "tiny"), add_generation_prompt=True,
                                             tokenize=False)
        enc = processor(text=[text], images=[[rec["image"]]], return_tensors="pt")
        thw = enc["image_grid_thw"]
        mm = {"pixel_values": enc["pixel_values"], "image_grid_thw": thw,
              "images_seqlens": torch.repeat_interleave(thw[:, 1] * thw[:, 2], thw[:, 0])}  # as verl's agent loop
        for _ in range(N):
            resp = text_ids[torch.randint(len(text_ids), (int(torch.randint(3, 9, (1,), generator=g)),),
                                          generator=g)]
            ids = torch.cat([enc["input_ids"][0], resp])[None]
            pos = AgentLoopWorker._compute_position_ids(loop, ids, torch.ones_like(ids),
                                                        dict(mm, mm_token_type_ids=torch.zeros_like(ids)))
            rows.append((enc["input_ids"][0], resp, pos[0], mm))
    P, T, B = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows), len(rows)
    prompts, responses = torch.full((B, P), tok.pad_token_id), torch.full((B, T), tok.pad_token_id)
    attention_mask = torch.zeros(B, P + T, dtype=torch.long)
    position_ids = torch.zeros(B, 4, P + T, dtype=torch.long)
    for i, (p, r, pos, _) in enumerate(rows):
        prompts[i, P - len(p):], responses[i, :len(r)] = p, r
        attention_mask[i, P - len(p):P + len(r)] = 1
        position_ids[i, :, P - len(p):P + len(r)] = pos
    placeholders = torch.tensor(model_family.placeholder_ids(model))

    def direct(text_only: bool) -> torch.Tensor:
        out = torch.zeros(B, T)
        for i, (p, r, pos, mm) in enumerate(rows):
            ids = torch.cat([p, r])
            keep = torch.ones(len(ids), dtype=torch.bool)
            kwargs = {"pixel_values": mm["pixel_values"], "image_grid_thw": mm["image_grid_thw"]}
            if text_only:  # visual tokens deleted, every other token keeps its position
                keep[:len(p)] = ~torch.isin(p, placeholders)
                kwargs = {}
            logits = model(input_ids=ids[keep][None], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                           position_ids=pos[1:, keep][:, None], **kwargs).logits[0].float()
            logp = logits.log_softmax(-1)[:-1].gather(-1, ids[keep][1:, None])[:, 0]
            out[i, :len(r)] = logp[-len(r):]
        return out

    tensors = {"prompts": prompts, "responses": responses, "response_mask": attention_mask[:, P:].clone(),
               "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention_mask,
               "position_ids": position_ids}
    return {"family": family, "path": path, "config": model.config, "tensors": tensors,
            "mm": [r[3] for r in rows], "ref_vis": direct(False), "ref_txt": direct(True),
            "max_len": int(attention_mask.sum(-1).max())}


@pytest.fixture(scope="session")
def rollouts():
    """Every family's batch and direct log-probs, computed before any verl worker patches transformers' classes."""
    global ORIGINAL_GET_INPUT_EMBEDS
    from verl.models.transformers import qwen2_vl

    ORIGINAL_GET_INPUT_EMBEDS = getattr(qwen2_vl._get_input_embeds, "__wrapped__", qwen2_vl._get_input_embeds)
    torch.distributed.is_initialized() or verl_cpu.init_single_process_group()
    return {f: _rollout(f) for f in FAMILIES}


def _config(r: dict, *, remove_padding: bool, dynamic_bsz: bool, fix: bool = True):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config",
                                      "_generated_ppo_trainer.yaml"))
    cfg.algorithm.adv_estimator = "grpo"
    cfg.algorithm.pgpo = {"enable": True, "tau": 0.4, "beta": 2.0}
    a = cfg.actor_rollout_ref
    a.model.path = r["path"]
    a.model.use_remove_padding = remove_padding
    a.model.override_config = {"attn_implementation": "sdpa"}  # flash_attention_2 needs a CUDA flash-attn
    if fix:
        a.model.external_lib = verl_qwen2_vl_fix.__name__
    a.actor.strategy = a.actor.fsdp_config.strategy = "fsdp2"  # FSDP1 cannot sync module states from CPU
    a.actor.use_torch_compile = a.actor.fsdp_config.use_torch_compile = False
    a.actor.fsdp_config.dtype = "float32"
    a.actor.fsdp_config.mixed_precision = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    B = N_PROMPTS * N
    a.actor.ppo_mini_batch_size = B
    a.actor.ppo_micro_batch_size_per_gpu = a.rollout.log_prob_micro_batch_size_per_gpu = 2
    a.actor.use_dynamic_bsz = dynamic_bsz
    a.actor.ppo_max_token_len_per_gpu = int(1.5 * r["max_len"])  # micro-batches of one or two sequences
    a.rollout.n = 1
    return cfg


class _LocalWorkerGroup:
    """verl's RayWorkerGroup interface over one in-process worker; records what the update saw."""

    def __init__(self, worker):
        self.worker, self.updates = worker, []

    def compute_log_prob(self, data):
        return self.worker.compute_log_prob(data)

    def update_actor(self, data):
        self.updates.append(data)
        return self.worker.update_actor(data)


def _trainer(r: dict, **options):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    cfg = _config(r, **options)
    verl_cpu.install_flash_standin()
    worker = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    trainer = object.__new__(PGPORayPPOTrainer)  # RayPPOTrainer.__init__ builds Ray pools; the methods need these
    trainer.config, trainer.actor_rollout_wg, trainer.distillation_config = cfg, _LocalWorkerGroup(worker), None
    return trainer


def _batch(r: dict) -> DataProto:
    t = r["tensors"]
    B = t["input_ids"].shape[0]
    return DataProto.from_dict(
        tensors=dict(t), non_tensors={"multi_modal_inputs": np.array(r["mm"], dtype=object),
                                      "uid": np.array([str(i // N) for i in range(B)], dtype=object)},
        meta_info={"temperature": 1.0, "global_token_num": t["attention_mask"].sum(-1).tolist()})


def _report(**figure):
    print("FIGURE", json.dumps(figure))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(figure) + "\n")


def _max_diff(a, b, mask) -> float:
    return float((a - b)[mask.bool()].abs().max())


@pytest.mark.parametrize("family,remove_padding,dynamic_bsz", [
    ("qwen2_5_vl", True, False), ("qwen2_5_vl", True, True), ("qwen2_5_vl", False, False),
    ("qwen2_5_vl", False, True), ("qwen2_vl", True, False), ("qwen2_vl", False, True), ("qwen3_vl", False, False),
])
def test_text_only_log_probs_through_verls_driver_and_engine(rollouts, family, remove_padding, dynamic_bsz):
    r = rollouts[family]
    trainer = _trainer(r, remove_padding=remove_padding, dynamic_bsz=dynamic_bsz)
    check_verl_config(trainer.config)  # the start-up checks accept this configuration
    data = _batch(r)
    mask = data.batch["response_mask"]
    vis, _ = RayPPOTrainer._compute_old_log_prob(trainer, data)
    txt, _ = RayPPOTrainer._compute_old_log_prob(trainer, pgpo_text_only_batch(data, r["config"]))
    figure = {"trainer": "verl 0.9.1", "family": family, "use_remove_padding": remove_padding,
              "use_dynamic_bsz": dynamic_bsz,
              "text_only_max_abs_diff": _max_diff(txt.batch["old_log_probs"], r["ref_txt"], mask),
              "with_image_max_abs_diff": _max_diff(vis.batch["old_log_probs"], r["ref_vis"], mask),
              "image_effect": _max_diff(r["ref_vis"], r["ref_txt"], mask)}
    _report(**figure)
    assert figure["with_image_max_abs_diff"] < TOL, figure
    assert figure["text_only_max_abs_diff"] < TOL, figure
    assert figure["image_effect"] > 100 * TOL, figure  # the comparison can tell the two passes apart


def test_the_mixins_step_on_verls_update_actor(rollouts):
    """PGPOVerlTrainerMixin._update_actor on verl's real path: one twin pass, advantages reshaped with weights from
    the real log-probs, then verl's update, which still receives the images (pixel values) of the batch."""
    from pgpo_train.rl.core_algos import k3_scores
    from pgpo_train.rl.core_algos import pgpo_weights

    r = rollouts["qwen2_5_vl"]
    trainer = _trainer(r, remove_padding=True, dynamic_bsz=False)
    data = _batch(r)
    mask = data.batch["response_mask"].bool()
    data.batch["old_log_probs"] = RayPPOTrainer._compute_old_log_prob(trainer, data)[0].batch["old_log_probs"]
    seq_adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    data.batch["advantages"] = seq_adv[:, None] * mask
    out = trainer._update_actor(data)
    assert PGPO_RAN_METRIC in out.meta_info["metrics"] and "actor/pg_loss" in out.meta_info["metrics"]
    want = pgpo_weights(k3_scores(r["ref_vis"], r["ref_txt"], mask), mask, tau=0.4, beta=2.0, backend="torch")
    torch.testing.assert_close(data.batch["advantages"], seq_adv[:, None] * want, atol=1e-4, rtol=1e-4)
    (update,) = trainer.actor_rollout_wg.updates
    assert "pixel_values" in update["multi_modal_inputs"][0]  # the update trains with the images


def test_qwen2_vl_no_image_branch_is_broken_in_this_verl_and_the_fix_is_required(rollouts):
    """verl 0.9.1's no-image branch crashes (every text-only twin takes it); the mixin refuses a Qwen2.5-VL run whose
    workers do not load the fix, and accepts it with external_lib set."""
    from verl.models.transformers import qwen2_vl

    assert verl_qwen2_vl_fix._BROKEN_BRANCH.search(inspect.getsource(ORIGINAL_GET_INPUT_EMBEDS))
    model, _ = build_tiny_family("qwen2_5_vl")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(AttributeError, match="mean"):
        ORIGINAL_GET_INPUT_EMBEDS(model.model, ids)
    embeds, _ = qwen2_vl._get_input_embeds(model.model, ids)  # the fixed branch: token embeddings + 0 x tower
    torch.testing.assert_close(embeds, model.get_input_embeddings()(ids))
    r = rollouts["qwen2_5_vl"]
    with pytest.raises(ValueError, match="external_lib=pgpo_train.integrations.verl_qwen2_vl_fix"):
        check_verl_config(_config(r, remove_padding=True, dynamic_bsz=False, fix=False))
    check_verl_config(_config(r, remove_padding=True, dynamic_bsz=False))


def test_remove_padding_with_sdpa_on_a_family_verl_does_not_patch_is_wrong_and_refused(rollouts):
    """Qwen3-VL: verl leaves its attention to transformers; the packed row with the twin's hole then splits into
    several sequences under sdpa. Measured on verl's engine, then refused at start-up."""
    r = rollouts["qwen3_vl"]
    cfg = _config(r, remove_padding=True, dynamic_bsz=False)
    with pytest.raises(ValueError, match="use_remove_padding=True with .*attn_implementation='sdpa'"):
        check_verl_config(cfg)
    trainer = _trainer(r, remove_padding=True, dynamic_bsz=False)
    data = _batch(r)
    txt, _ = RayPPOTrainer._compute_old_log_prob(trainer, pgpo_text_only_batch(data, r["config"]))
    vis, _ = RayPPOTrainer._compute_old_log_prob(trainer, data)
    mask = data.batch["response_mask"]
    figure = {"trainer": "verl 0.9.1", "family": "qwen3_vl", "use_remove_padding": True, "use_dynamic_bsz": False,
              "attn_implementation": "sdpa", "status": "refused",
              "text_only_max_abs_diff": _max_diff(txt.batch["old_log_probs"], r["ref_txt"], mask),
              "with_image_max_abs_diff": _max_diff(vis.batch["old_log_probs"], r["ref_vis"], mask)}
    _report(**figure)
    assert figure["with_image_max_abs_diff"] < TOL  # the with-image pass has no hole: correct
    assert figure["text_only_max_abs_diff"] > 100 * TOL  # the reason for the refusal


def test_the_twins_meta_info_counts_its_own_tokens(rollouts):
    data = _batch(rollouts["qwen2_5_vl"])
    data.meta_info["images_seqlens"] = [16] * len(data)
    text = pgpo_text_only_batch(data, rollouts["qwen2_5_vl"]["config"])
    assert text.meta_info["global_token_num"] == text.batch["attention_mask"].sum(-1).tolist()
    assert sum(text.meta_info["global_token_num"]) < sum(data.meta_info["global_token_num"])
    assert text.meta_info["images_seqlens"] == [] and data.meta_info["images_seqlens"] == [16] * len(data)
