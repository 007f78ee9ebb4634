"""The verl mixin on verl's real RayPPOTrainer and configs: what it refuses at start-up.

- start-up refusals read verl's own generated configs (Megatron, untested strategies, token-level estimators,
  unknown `algorithm.pgpo` keys), raised before RayPPOTrainer.__init__ builds anything;
- verl's real `_compute_old_log_prob` / `_update_actor` run (DataProto -> no-padding TensorDict -> worker group ->
  re-pad) against a stand-in actor worker group whose log-probs depend on the tokens and on whether the image is
  there, so the expected weights come from the float64 reference;
- bypass mode (`old_log_probs` = the rollout engine's): the with-image side is recomputed on the actor;
- a `fit` that calls the worker group's `update_actor` without PGPO (as verl-recipe's RayDAPOTrainer.fit does)
  raises PGPODidNotRunError naming the method.
"""

import os
from typing import ClassVar

import numpy as np
import pytest
import torch

ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")
omegaconf = pytest.importorskip("omegaconf")

import verl
import verl.utils.tensordict_utils as tu

from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_train.integrations import PGPOVerlTrainerMixin
from pgpo_train.integrations.checks import PGPO_RAN_METRIC
from pgpo_train.integrations.checks import PGPODidNotRunError
from pgpo_train.integrations.checks import check_pgpo_ran
from pgpo_train.integrations.checks import check_verl_config
from pgpo_train.integrations.checks import guard_actor_updates

OmegaConf = omegaconf.OmegaConf
RayPPOTrainer = ray_trainer.RayPPOTrainer
CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
IMAGE_PAD = 151655
B, G, P, T = 4, 2, 6, 5


def _config(megatron=False, **pgpo):
    name = "_generated_ppo_megatron_trainer.yaml" if megatron else "_generated_ppo_trainer.yaml"
    cfg = OmegaConf.load(os.path.join(CONFIG_DIR, name))  # verl's own full default config
    cfg.algorithm.adv_estimator = "grpo"
    cfg.algorithm.pgpo = {"enable": True, "tau": 0.4, "beta": 2.0, "visual_token_ids": [IMAGE_PAD], **pgpo}
    return cfg


class PGPORayPPOTrainer(PGPOVerlTrainerMixin, RayPPOTrainer):
    pass


# ---------------------------------------------------------------- start-up refusals


def test_verl_default_fsdp_config_passes_and_refusals_name_the_option():
    check_verl_config(_config())  # fsdp, grpo: fine
    with pytest.raises(ValueError, match=r"strategy='megatron'.*position_ids=None"):
        check_verl_config(_config(megatron=True))
    cfg = _config()
    cfg.actor_rollout_ref.actor.strategy = "veomni"
    with pytest.raises(ValueError, match="strategy='veomni'"):
        check_verl_config(cfg)
    cfg = _config()
    cfg.algorithm.adv_estimator = "gae"
    with pytest.raises(ValueError, match="adv_estimator='gae'"):
        check_verl_config(cfg)
    with pytest.raises(ValueError, match=r"unknown option\(s\) algorithm.pgpo.\['tua'\]"):
        check_verl_config(_config(tua=0.5))
    with pytest.raises(ValueError, match="tau"):
        check_verl_config(_config(tau=1.5))
    check_verl_config(_config(megatron=True, enable=False))  # PGPO off: nothing of ours is checked


def test_refused_before_ray_ppo_trainer_builds_anything(monkeypatch):
    def no_init(self, *a, **k):
        raise AssertionError("RayPPOTrainer.__init__ ran before the refusal")

    monkeypatch.setattr(RayPPOTrainer, "__init__", no_init)
    with pytest.raises(ValueError, match="strategy='megatron'"):
        PGPORayPPOTrainer(_config(megatron=True), tokenizer=None, role_worker_mapping={}, resource_pool_manager=None)
    with pytest.raises(ValueError, match="strategy='megatron'"):
        PGPORayPPOTrainer(config=_config(megatron=True), tokenizer=None, role_worker_mapping={},
                          resource_pool_manager=None)
    with pytest.raises(AssertionError, match="before the refusal"):  # a supported config reaches verl's __init__
        PGPORayPPOTrainer(_config(), tokenizer=None, role_worker_mapping={}, resource_pool_manager=None)


def test_verl_v1_trainers_are_refused():
    class V1Trainer:
        def __init__(self, *a, **k):
            pass

    V1Trainer.__module__ = "verl.trainer.ppo.v1.trainer_base"  # verl's transfer-queue trainers (not importable here)

    class Mixed(PGPOVerlTrainerMixin, V1Trainer):
        pass

    with pytest.raises(TypeError, match="not verl's v1 trainers"):
        Mixed(_config())


# ---------------------------------------------------------------- verl's real log-prob and update paths


def _base_logp(tok):
    return -0.2 * (1 + tok % 5).double()


def _image_shift(tok):
    return -0.4 * ((tok * 7) % 3).double()  # how much seeing the image moves each token's log-prob


class _ActorWorkerGroup:
    """Stands in for the actor worker group: answers verl's no-padding TensorDicts as an FSDP engine would, with
    log-probs that depend on the token and on whether its sample carries an image (its multi_modal_inputs)."""

    def __init__(self):
        self.log_prob_calls, self.updates = [], []

    def compute_log_prob(self, td):
        ids = td["input_ids"]  # nested [B, (kept tokens)]
        has_image = [bool(m) for m in tu.get(td, "multi_modal_inputs")]
        self.log_prob_calls.append(has_image)
        values, offsets = ids.values(), ids.offsets()
        nxt = torch.cat([values[1:], values.new_zeros(1)])  # position j scores token j + 1
        img = torch.zeros_like(values, dtype=torch.bool)
        for i, flag in enumerate(has_image):
            img[offsets[i]:offsets[i + 1]] = flag
        logp = (_base_logp(nxt) + torch.where(img, _image_shift(nxt), 0.0)).float()
        nested = torch.nested.nested_tensor_from_jagged(logp, offsets=offsets)
        return tu.get_tensordict({"log_probs": nested, "entropy": nested.clone()},
                                 non_tensor_dict={"metrics": {"mfu": 0.0}})

    def update_actor(self, td):
        self.updates.append(td["advantages"].clone())
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0, "pg_loss": 0.1}})


def _batch():
    prompts = torch.tensor([[0, 11, IMAGE_PAD, IMAGE_PAD, 12, 13]] * B)
    prompts[1, 0] = 9
    lengths = torch.tensor([5, 3, 4, 2])
    response_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    responses = (torch.arange(B * T).view(B, T) % 17 + 20) * response_mask
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([(prompts != 0).long(), response_mask], 1)
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    seq_adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    tensors = {"prompts": prompts, "responses": responses, "response_mask": response_mask, "input_ids": input_ids,
               "attention_mask": attention_mask, "position_ids": torch.stack([pos] * 4, 1),
               "advantages": seq_adv[:, None] * response_mask}
    mm = np.array([{"pixel_values": torch.rand(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
                   for _ in range(B)], dtype=object)
    return verl.DataProto.from_dict(tensors=tensors, non_tensors={"multi_modal_inputs": mm}), seq_adv


def _trainer(cfg):
    trainer = object.__new__(PGPORayPPOTrainer)  # verl's methods, without its Ray workers and dataloaders
    trainer.config, trainer.actor_rollout_wg = cfg, _ActorWorkerGroup()
    return trainer


def _expected(data, seq_adv):
    mask = data.batch["response_mask"].bool()
    tok = data.batch["responses"]
    vis, txt = _base_logp(tok) + _image_shift(tok), _base_logp(tok)
    w = reshape_weights_ref(torch.where(mask, k3_kl_ref(vis, txt), 0.0), mask)
    return seq_adv.double()[:, None] * w


def test_update_actor_through_verls_real_paths_reshapes_with_the_actors_log_probs():
    trainer = _trainer(_config())
    guard_actor_updates(trainer)
    data, seq_adv = _batch()
    old, _ = trainer._compute_old_log_prob(data)  # what verl's fit does before compute_advantage
    data.batch["old_log_probs"] = old.batch["old_log_probs"]
    wg = trainer.actor_rollout_wg
    wg.log_prob_calls.clear()
    out = trainer._update_actor(data)
    assert wg.log_prob_calls == [[False] * B]  # one extra pass, on the text-only twin
    (adv,) = wg.updates
    torch.testing.assert_close(adv.double(), _expected(data, seq_adv), atol=1e-5, rtol=1e-5)
    assert float(adv[0].max() - adv[0].min()) > 0.1  # the weights are not uniform: the check can fail
    metrics = out.meta_info["metrics"]
    assert metrics["actor/pg_loss"] == 0.1 and PGPO_RAN_METRIC in metrics
    check_pgpo_ran(metrics, "test")


def test_bypass_mode_recomputes_the_with_image_side_on_the_actor():
    cfg = _config()
    cfg.algorithm.rollout_correction.bypass_mode = True
    trainer = _trainer(cfg)
    data, seq_adv = _batch()
    tok = data.batch["responses"]
    # verl's apply_bypass_mode: old_log_probs := the rollout engine's log-probs (here off by an engine mismatch)
    rollout = (_base_logp(tok) + _image_shift(tok) + 0.05 * torch.randn(B, T, dtype=torch.float64)).float()
    data.batch["old_log_probs"] = data.batch["rollout_log_probs"] = rollout
    trainer._update_actor(data)
    wg = trainer.actor_rollout_wg
    assert sorted(map(tuple, wg.log_prob_calls)) == [(False,) * B, (True,) * B]  # text-only and with-image
    (adv,) = wg.updates
    torch.testing.assert_close(adv.double(), _expected(data, seq_adv), atol=1e-5, rtol=1e-5)
    assert torch.equal(data.batch["old_log_probs"], rollout)  # verl's bypass semantics untouched
    # against the rollout's log-probs the weights would differ: the recompute is what makes them right
    mask = data.batch["response_mask"].bool()
    w_rollout = reshape_weights_ref(torch.where(mask, k3_kl_ref(rollout.double(), _base_logp(tok)), 0.0), mask)
    assert (seq_adv.double()[:, None] * w_rollout - adv.double()).abs().max() > 1e-3


# ---------------------------------------------------------------- PGPO must have run in every step


class _DAPOLikeTrainer(RayPPOTrainer):
    """The update step of verl-recipe's RayDAPOTrainer.fit up to b0f3bfb (2026-02-25): after compute_advantage it
    calls the worker group's update_actor itself (`actor_output = self.actor_rollout_wg.update_actor(batch)`), never self._update_actor."""

    def fit(self):
        data, _ = _batch()
        data.batch["old_log_probs"] = self._compute_old_log_prob(data)[0].batch["old_log_probs"]
        metrics = {}
        td = ray_trainer.left_right_2_no_padding(data.to_tensordict())
        out = self.actor_rollout_wg.update_actor(td)
        metrics.update(tu.get(out, "metrics"))
        return metrics


class _PPOLikeTrainer(RayPPOTrainer):
    """RayPPOTrainer.fit's update step: self._update_actor(batch) after compute_advantage."""

    def fit(self):
        data, _ = _batch()
        data.batch["old_log_probs"] = self._compute_old_log_prob(data)[0].batch["old_log_probs"]
        metrics = dict(self._update_actor(data).meta_info["metrics"])
        check_pgpo_ran(metrics, f"{type(self).__name__}.fit")
        return metrics


@pytest.mark.parametrize("enable", [True, False])
def test_a_fit_that_bypasses_update_actor_is_an_error_naming_the_method(enable):
    class PGPODAPO(PGPOVerlTrainerMixin, _DAPOLikeTrainer):
        pass

    trainer = object.__new__(PGPODAPO)
    trainer.config, trainer.actor_rollout_wg = _config(enable=enable), _ActorWorkerGroup()
    if not enable:  # PGPO off: verl's own behaviour, no guard
        trainer.fit()
        return
    with pytest.raises(PGPODidNotRunError, match=r"PGPODAPO.fit called actor_rollout_wg.update_actor without going "
                                                 r"through PGPOVerlTrainerMixin._update_actor"):
        trainer.fit()
    assert trainer.actor_rollout_wg.updates == []  # refused before the un-reshaped update ran
    with pytest.raises(PGPODidNotRunError, match="no 'pgpo/kl_mean'"):
        check_pgpo_ran({"actor/pg_loss": 0.1}, "PGPODAPO.fit")


def test_a_fit_through_update_actor_passes_the_guard_once_per_reshape():
    class PGPOPPO(PGPOVerlTrainerMixin, _PPOLikeTrainer):
        pass

    trainer = object.__new__(PGPOPPO)
    trainer.config, trainer.actor_rollout_wg = _config(), _ActorWorkerGroup()
    metrics = trainer.fit()
    assert PGPO_RAN_METRIC in metrics and len(trainer.actor_rollout_wg.updates) == 1
    with pytest.raises(PGPODidNotRunError):  # the reshape armed exactly one update
        trainer.actor_rollout_wg.update_actor(None)


# ---------------------------------------------------------------- verl-recipe's real RayDAPOTrainer.fit


class _Tracking:
    logged: ClassVar[list] = []

    def __init__(self, *a, **k):
        pass

    def log(self, data, step):
        self.logged.append(dict(data))


def _rollout(gen_batch):
    """What the agent loop returns for 3 prompts x 2 responses, rewards on the last token; prompt 1's group has
    equal rewards, so DAPO's group filter drops it."""
    data, _ = _batch()
    rows = [0, 1, 2, 3, 0, 1]
    tensors = {k: data.batch[k][rows] for k in ("prompts", "responses", "input_ids", "attention_mask",
                                                 "position_ids")}
    mask = data.batch["response_mask"][rows]
    acc = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    rm = torch.zeros(len(rows), T)
    rm[torch.arange(len(rows)), mask.sum(-1) - 1] = torch.tensor(acc, dtype=torch.float32)
    tensors["rm_scores"] = rm
    mm = np.array([dict(data.non_tensor_batch["multi_modal_inputs"][i]) for i in rows], dtype=object)
    return verl.DataProto.from_dict(tensors=tensors, non_tensors={"multi_modal_inputs": mm, "acc": acc},
                                    meta_info={"timing": {}, "reward_extra_keys": ["acc"]})


def test_verl_recipe_dapo_fit_runs_pgpo_in_its_step(monkeypatch):
    """verl-recipe's RayDAPOTrainer.fit (group filtering on) with the mixin: the step's update gets PGPO's token
    advantages and the logged metrics hold pgpo/kl_mean. Skipped where verl-recipe is not importable (it is not a
    pip package; run with PYTHONPATH=<verl-recipe checkout, as recipe/dapo>)."""
    dapo = pytest.importorskip("recipe.dapo.dapo_ray_trainer")
    import verl.utils.tracking

    class PGPODAPO(PGPOVerlTrainerMixin, dapo.RayDAPOTrainer):
        pass

    cfg = _config()
    cfg.trainer.logger, cfg.trainer.val_before_train, cfg.trainer.total_epochs = ["console"], False, 2  # fit starts at epoch 1
    cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.trainer.balance_batch = -1, -1, False
    cfg.actor_rollout_ref.rollout.n, cfg.data.train_batch_size = 2, 2
    cfg.algorithm.filter_groups = {"enable": True, "metric": "acc", "max_num_gen_batches": 0}
    trainer = object.__new__(PGPODAPO)  # verl's and the recipe's code, stand-ins for the Ray workers only
    trainer.config, trainer.actor_rollout_wg = cfg, _ActorWorkerGroup()
    trainer.async_rollout_manager = type("Rollout", (), {"generate_sequences": staticmethod(_rollout)})()
    trainer.checkpoint_manager = type("Ckpt", (), {"update_weights": lambda self, *a: None,
                                                   "sleep_replicas": lambda self: None})()
    trainer.resource_pool_manager = type("Pool", (), {"get_n_gpus": lambda self: 1})()
    trainer.train_dataloader = [{"index": torch.arange(3), "data_source": np.array(["x"] * 3, dtype=object)}]
    trainer.total_training_steps, trainer.use_reference_policy, trainer.use_rm, trainer.use_critic = 1, False, False, False
    trainer._load_checkpoint = lambda: None
    monkeypatch.setattr(verl.utils.tracking, "Tracking", _Tracking)
    _Tracking.logged = []
    trainer.fit()
    (adv,) = trainer.actor_rollout_wg.updates  # one update, on the 2 kept groups (4 responses)
    assert adv.shape == (4, T)
    (metrics,) = _Tracking.logged
    check_pgpo_ran(metrics, "RayDAPOTrainer.fit")
    assert "actor/pg_loss" in metrics and metrics["train/num_gen_batches"] == 1
    # per-token advantages: not one value per response any more
    assert any(float(row[m].max() - row[m].min()) > 1e-3 for row, m in zip(adv, adv != 0))
