"""The EasyR1 contracts pgpo_train.integrations.easyr1 relies on, encoded where CI can run them.

EasyR1 (hiyouga/EasyR1) is not on PyPI and pins transformers < 5, so its code runs only by hand
(tests/support/easyr1_real_check.py: main b44b311 and v0.3.2 a23fb5b, text-only log-probs equal to the direct
computation, both uid-cache traps reproduced). What the recipe relies on is mirrored here, each piece citing the
EasyR1 file (same at both commits):

- verl/workers/fsdp_workers.py, FSDPWorker._process_multi_modal_inputs: returns at once when the batch has no
  `multi_modal_data`; otherwise clears its cache when the batch's `uid`s differ from the cached ones, builds
  `multi_modal_inputs` per uid from `multi_modal_data` (`{}` when it has no images / videos), caches them and
  writes them into the batch. Called before compute_log_probs and update_actor; compute_log_probs returns
  `old_log_probs`.
- verl/trainer/ray_trainer.py: the worker group is `self.actor_rollout_ref_wg`; `fit` updates through
  `self.actor_rollout_ref_wg.update_actor(batch)` after `compute_advantage`, and logs with
  `self.logger.log(data=metrics, ...)`.
- verl/utils/dataset.py and verl/workers/rollout/vllm_rollout_spmd.py: Qwen-VL positions are `[B, 4, L]`, a text row
  (arange) then the 3 mrope rows; response slots continue from the prompt's last position.
- verl/workers/actor/dp_actor.py: the actor reads `input_ids`, `attention_mask`, `position_ids`, `responses` and the
  non-tensor `multi_modal_inputs`.
"""

import numpy as np
import pytest
import torch

from pgpo_train.integrations import easyr1
from pgpo_train.integrations import pgpo_text_only_batch
from pgpo_train.integrations.checks import PGPODidNotRunError
from pgpo_train.models.tiny_families import build_tiny_family


class _Proto:
    """The parts of EasyR1's verl.protocol.DataProto the recipe touches."""

    def __init__(self, batch, non_tensor_batch, meta_info):
        self.batch, self.non_tensor_batch, self.meta_info = batch, non_tensor_batch, meta_info


class _EasyR1WorkerCache:
    """Mirror of verl/workers/fsdp_workers.py FSDPWorker._process_multi_modal_inputs (EasyR1 b44b311 / v0.3.2);
    the image processor is replaced by a tag so the test can see which images reached the actor."""

    def __init__(self):
        self._cache = {}

    def process(self, data):
        if "multi_modal_data" not in data.non_tensor_batch:
            return
        if "uid" in self._cache and not np.all(data.non_tensor_batch["uid"] == self._cache["uid"]):
            self._cache.clear()
        if "multi_modal_inputs" not in self._cache:
            per_uid = {}
            out = []
            for uid, mm in zip(data.non_tensor_batch["uid"], data.non_tensor_batch["multi_modal_data"]):
                if uid not in per_uid:
                    images = mm.get("images", [])
                    per_uid[uid] = {"pixel_values": f"pixels of {images}"} if images else {}
                out.append(per_uid[uid])
            self._cache["uid"] = data.non_tensor_batch["uid"]
            self._cache["multi_modal_inputs"] = np.array(out, dtype=object)
        data.non_tensor_batch["multi_modal_inputs"] = self._cache["multi_modal_inputs"]


def _batch(model, positions_rows=4):
    """Two samples of one prompt with an image and a video placeholder, EasyR1's keys and [B, 4, L] positions."""
    cfg = model.config
    prompt = torch.tensor([[11, cfg.image_token_id, cfg.image_token_id, 12, cfg.video_token_id, 13]] * 2)
    responses = torch.tensor([[21, 22, 0], [23, 0, 0]])
    response_mask = (responses != 0).long()
    input_ids = torch.cat([prompt, responses], 1)
    attention_mask = torch.cat([torch.ones_like(prompt), response_mask], 1)
    L = input_ids.shape[1]
    positions = torch.arange(L).expand(2, positions_rows, L).clone()
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
               "responses": responses, "response_mask": response_mask,
               "advantages": torch.tensor([[1.0], [-1.0]]) * response_mask,
               "old_log_probs": -torch.rand(2, 3)}
    non_tensor = {"multi_modal_data": np.array([{"images": ["img0"]}] * 2, dtype=object),
                  "uid": np.array(["u0", "u0"], dtype=object)}
    return _Proto(tensors, non_tensor, {"global_token_num": attention_mask.sum(-1).tolist(), "min_pixels": 1})


@pytest.fixture(scope="module")
def model():
    return build_tiny_family("qwen2_5_vl")[0]


def test_twin_has_no_multimodal_keys_and_masks_image_and_video_from_the_config(model):
    data = _batch(model)
    text = easyr1.text_only_batch(data, model.config)
    assert not set(easyr1.MULTIMODAL_KEYS) & set(text.non_tensor_batch)
    assert "multi_modal_data" in data.non_tensor_batch  # the batch keeps its images
    ids, mask = data.batch["input_ids"], text.batch["attention_mask"]
    for tid in (model.config.image_token_id, model.config.video_token_id):
        assert bool((mask[ids == tid] == 0).all())
    assert text.batch["position_ids"] is data.batch["position_ids"]  # [B, 4, L] kept as is
    assert text.meta_info["global_token_num"] == mask.sum(-1).tolist()


def test_the_twin_leaves_easyr1s_uid_cache_alone_and_the_update_keeps_its_images(model):
    """fit's order: with-image log-probs, the twin, update_actor: the update still gets the images."""
    worker, data = _EasyR1WorkerCache(), _batch(model)
    worker.process(data)  # compute_log_probs(batch)
    text = easyr1.text_only_batch(data, model.config)
    worker.process(text)  # compute_log_probs(twin): returns at once
    assert "multi_modal_inputs" not in text.non_tensor_batch
    worker.process(data)  # update_actor(batch)
    assert data.non_tensor_batch["multi_modal_inputs"][0] == {"pixel_values": "pixels of ['img0']"}


def test_the_naive_twin_falls_into_both_traps(model):
    """Why the twin drops the keys: with `{}` entries and the same uids the cache either feeds the twin the images
    (with-image pass first) or strips them from the update (twin first / cache cleared)."""
    naive_keys = ("multi_modal_data", "multi_modal_inputs")
    worker, data = _EasyR1WorkerCache(), _batch(model)
    worker.process(data)
    naive = pgpo_text_only_batch(data, model.config, multimodal_keys=naive_keys)
    worker.process(naive)
    assert "pixel_values" in naive.non_tensor_batch["multi_modal_inputs"][0]  # the twin would see the image
    worker, data = _EasyR1WorkerCache(), _batch(model)
    worker.process(pgpo_text_only_batch(data, model.config, multimodal_keys=naive_keys))
    worker.process(data)
    assert data.non_tensor_batch["multi_modal_inputs"][0] == {}  # the update would train without images


def test_pgpo_step_uses_actor_rollout_ref_wg_and_check_ran(model):
    data, worker = _batch(model), _EasyR1WorkerCache()
    seen = []

    def compute_log_probs(batch):  # fsdp_workers.py: cache, then the actor; returns `old_log_probs`
        worker.process(batch)
        seen.append(batch)
        return _Proto({"old_log_probs": data.batch["old_log_probs"] - 0.5 * torch.rand(2, 3)}, {}, {})

    class Trainer:
        actor_rollout_ref_wg = type("WG", (), {"compute_log_probs": staticmethod(compute_log_probs)})()

    before = data.batch["advantages"].clone()
    metrics = {}
    easyr1.pgpo_step(Trainer(), data, metrics, model_config=model.config, tau=0.4, beta=2.0)
    easyr1.check_ran(metrics)
    assert len(seen) == 1 and "multi_modal_data" not in seen[0].non_tensor_batch
    assert not torch.equal(data.batch["advantages"], before)
    with pytest.raises(PGPODidNotRunError, match="compute_advantage"):
        easyr1.check_ran({})

    class OldTrainer:
        actor_rollout_wg = Trainer.actor_rollout_ref_wg

    with pytest.raises(AttributeError, match="actor_rollout_ref_wg"):
        easyr1.pgpo_step(OldTrainer(), _batch(model), {}, model_config=model.config)


def test_positions_must_be_easyr1s_b_4_l(model):
    with pytest.raises(ValueError, match=r"position_ids must be \[B, 4, L\]"):
        easyr1.text_only_batch(_batch(model, positions_rows=3), model.config)
