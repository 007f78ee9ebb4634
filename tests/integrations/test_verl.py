"""The verl / EasyR1 adapter on tensors laid out as verl lays them out, and on real verl objects when installed."""

import numpy as np
import pytest
import torch

from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import pgpo_token_weights_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_train.integrations import PGPOVerlTrainerMixin
from pgpo_train.integrations import pgpo_reshape_advantages_
from pgpo_train.integrations import pgpo_text_only_batch

DIAG = ("pgpo/frac_above_tau", "pgpo/weight_gini", "pgpo/eff_token_ratio", "pgpo/top1_mass", "pgpo/top10_mass")
IMAGE_PAD = 151655  # Qwen2.5-VL <|image_pad|>
B, G, T_RESP, V = 6, 3, 7, 33  # 2 prompts x G responses


def _verl_like_batch():
    """Right-padded responses of varied length, GRPO advantages broadcast over the response mask (verl's layout)."""
    lengths = torch.tensor([7, 5, 1, 6, 3, 7])
    response_mask = (torch.arange(T_RESP)[None, :] < lengths[:, None]).long()  # [B, T_resp] int, as verl stores it
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    grouped = rewards.view(-1, G)
    seq_adv = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-6)).view(-1)
    logp_vis = -torch.rand(B, T_RESP) * 3
    logp_txt = -torch.rand(B, T_RESP) * 3
    logp_vis[response_mask == 0] = 0.0  # verl leaves padding log-probs at arbitrary values
    logp_txt[response_mask == 0] = -50.0
    return {
        "advantages": seq_adv[:, None] * response_mask,  # [B, T_resp] float32
        "response_mask": response_mask,
        "old_log_probs": logp_vis,
        "pgpo_text_log_probs": logp_txt,
    }, seq_adv


def _expected_k3(batch, seq_adv, **kw):
    mask = batch["response_mask"].bool()
    s = torch.where(mask, k3_kl_ref(batch["old_log_probs"], batch["pgpo_text_log_probs"]), 0.0)
    w = reshape_weights_ref(s, mask, **kw)
    return seq_adv.double()[:, None] * w, w


def test_k3_from_batch_keys_matches_reference():
    batch, seq_adv = _verl_like_batch()
    adv = batch["advantages"]
    expected, w_ref = _expected_k3(batch, seq_adv)
    weights, metrics = pgpo_reshape_advantages_(batch, backend="torch")
    assert batch["advantages"] is adv  # in place
    torch.testing.assert_close(adv.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.double(), w_ref, atol=1e-5, rtol=1e-5)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(weights.sum(-1), mask.sum(-1).float())  # mass conserved per sequence
    assert bool((adv[~mask] == 0).all()) and bool((weights[~mask] == 0).all())
    assert batch["pgpo_weights"] is weights
    assert set(metrics) == {"pgpo/kl_mean", "pgpo/kl_inf_frac", "pgpo/kl_max", "pgpo/weight_mean", "pgpo/weight_std",
                            "pgpo/weight_max", "pgpo/weight_min", *DIAG}
    assert metrics["pgpo/weight_max"] == pytest.approx(float(w_ref[mask].max()), abs=1e-5)
    assert metrics["pgpo/weight_min"] == pytest.approx(float(w_ref[mask].min()), abs=1e-5)


def test_k3_explicit_tensors_and_params():
    batch, seq_adv = _verl_like_batch()
    logp_txt = batch.pop("pgpo_text_log_probs")
    expected, _ = _expected_k3({**batch, "pgpo_text_log_probs": logp_txt}, seq_adv, tau=0.6, beta=1.0)
    pgpo_reshape_advantages_(batch, logp_txt=logp_txt, tau=0.6, beta=1.0, weights_key=None, backend="torch")
    torch.testing.assert_close(batch["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
    assert "pgpo_weights" not in batch


def test_full_estimator_from_logits():
    batch, seq_adv = _verl_like_batch()
    logits_vis, logits_txt = torch.randn(B, T_RESP, V) * 2, torch.randn(B, T_RESP, V) * 2
    w_ref, _ = pgpo_token_weights_ref(logits_vis, logits_txt, batch["response_mask"].bool(), temperature=0.7)
    pgpo_reshape_advantages_(batch, logits_vis=logits_vis, logits_txt=logits_txt, temperature=0.7, backend="torch")
    torch.testing.assert_close(batch["advantages"].double(), seq_adv.double()[:, None] * w_ref, atol=1e-5, rtol=1e-5)


def test_precomputed_scores_triton_interpreter():
    batch, seq_adv = _verl_like_batch()
    scores = torch.rand(B, T_RESP) * 4
    w_ref = reshape_weights_ref(scores, batch["response_mask"].bool())
    pgpo_reshape_advantages_(batch, scores=scores, backend="triton")
    torch.testing.assert_close(batch["advantages"].double(), seq_adv.double()[:, None] * w_ref, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    batch, _ = _verl_like_batch()
    with pytest.raises(KeyError, match="pgpo_text_log_probs"):
        pgpo_reshape_advantages_({k: v for k, v in batch.items() if k != "pgpo_text_log_probs"})
    with pytest.raises(KeyError, match="advantages"):
        pgpo_reshape_advantages_({"response_mask": batch["response_mask"]})
    with pytest.raises(ValueError, match=r"advantages must be a float tensor \[B, T_resp\]"):
        pgpo_reshape_advantages_({**batch, "advantages": torch.zeros(B)})
    with pytest.raises(ValueError, match="response_mask must have"):
        pgpo_reshape_advantages_({**batch, "response_mask": batch["response_mask"][:, :3]})
    with pytest.raises(ValueError, match="exactly one source"):
        pgpo_reshape_advantages_(batch, scores=torch.rand(B, T_RESP), logp_txt=torch.rand(B, T_RESP))
    with pytest.raises(ValueError, match="tau"):
        pgpo_reshape_advantages_(batch, tau=1.5)
    with pytest.raises(ValueError, match="logp_txt must have the shape"):
        pgpo_reshape_advantages_(batch, logp_txt=torch.rand(B, T_RESP + 1))
    with pytest.raises(TypeError, match="DataProto"):
        pgpo_reshape_advantages_(42)
    torch.testing.assert_close(batch["advantages"], _verl_like_batch()[0]["advantages"])  # untouched on errors


# ---------------------------------------------------------------- real verl objects (skipped without verl)


def _dataproto():
    verl = pytest.importorskip("verl")
    prompt_len = 6
    prompts = torch.tensor([[0, 0, 11, IMAGE_PAD, IMAGE_PAD, 12]] * B)  # left-padded prompts with 2 image tokens
    prompts[1, :2] = torch.tensor([9, 10])
    batch, seq_adv = _verl_like_batch()
    responses = torch.randint(20, 30, (B, T_RESP)) * batch["response_mask"]
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([(prompts != 0).long(), batch["response_mask"]], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    position_ids = torch.stack([position_ids] * 4, 1)  # [B, 4, L]: verl's Qwen2.5-VL layout (text + 3 mrope)
    tensors = dict(batch, prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids)
    mm = np.array([{"pixel_values": torch.rand(8, 12), "image_grid_thw": torch.tensor([[1, 2, 4]])}
                   for _ in range(B)], dtype=object)
    data = verl.DataProto.from_dict(tensors=tensors, non_tensors={"multi_modal_inputs": mm,
                                                                  "uid": np.array(["a"] * G + ["b"] * G, dtype=object)})
    return data, seq_adv, prompt_len


def test_real_dataproto_with_verl_grpo_advantages():
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    data, _, _ = _dataproto()
    mask = data.batch["response_mask"]
    rewards = torch.zeros(B, T_RESP)
    last = mask.sum(-1) - 1
    rewards[torch.arange(B), last] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # verl: score on the last token
    adv, _ = compute_grpo_outcome_advantage(rewards, mask, data.non_tensor_batch["uid"])
    data.batch["advantages"] = adv
    seq_adv = adv[torch.arange(B), 0]
    expected, _ = _expected_k3(data.batch, seq_adv)
    _, metrics = pgpo_reshape_advantages_(data, backend="torch")
    torch.testing.assert_close(data.batch["advantages"].double(), expected, atol=1e-5, rtol=1e-5)
    assert data.batch["pgpo_weights"].shape == (B, T_RESP)
    assert all(isinstance(v, float) for v in metrics.values())


def test_text_only_batch_masks_visual_tokens_keeps_positions():
    data, _, _ = _dataproto()
    text = pgpo_text_only_batch(data, IMAGE_PAD)
    visual = data.batch["input_ids"] == IMAGE_PAD
    assert bool((text.batch["attention_mask"][visual] == 0).all())
    assert torch.equal(text.batch["attention_mask"][~visual], data.batch["attention_mask"][~visual])
    assert text.batch["position_ids"] is data.batch["position_ids"]  # the original positions, not recomputed
    assert all(d == {} for d in text.non_tensor_batch["multi_modal_inputs"])
    assert bool((data.batch["attention_mask"][visual] == 1).all())  # the original batch is untouched
    assert "pixel_values" in data.non_tensor_batch["multi_modal_inputs"][0]
    with pytest.raises(ValueError, match="visual_token_ids"):
        pgpo_text_only_batch(data, [])
    with pytest.raises(TypeError, match="DataProto"):
        pgpo_text_only_batch({"input_ids": data.batch["input_ids"]}, IMAGE_PAD)


def test_text_only_batch_through_verl_padding_free_path():
    """verl's own unpad/re-pad helpers keep the response slice aligned when the visual tokens are masked out."""
    pytest.importorskip("verl")
    from verl.utils.model import extract_multi_modal_inputs
    from verl.workers.utils.padding import left_right_2_no_padding
    from verl.workers.utils.padding import no_padding_2_padding

    data, _, _ = _dataproto()
    text = pgpo_text_only_batch(data, IMAGE_PAD)
    # verl's engines build the model's image kwargs with this: none for the text-only twin, so no vision tower
    assert extract_multi_modal_inputs(list(text.non_tensor_batch["multi_modal_inputs"])) == {}
    assert "pixel_values" in extract_multi_modal_inputs(list(data.non_tensor_batch["multi_modal_inputs"]))
    td = left_right_2_no_padding(text.to_tensordict())
    ids = td["input_ids"]  # nested [B, (kept tokens)]
    kept = ids.values()
    assert not bool((kept == IMAGE_PAD).any())  # the visual tokens are gone from the padding-free pass
    # A stand-in model output whose value at each position is the next token's id: re-padding it must give back
    # exactly the responses, so log-probs computed on the text-only pass land on the right response tokens.
    nxt = torch.cat([kept[1:], kept.new_zeros(1)]).float()
    out = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(nxt, offsets=ids.offsets()), td)
    mask = data.batch["response_mask"].bool()
    torch.testing.assert_close(out[mask], data.batch["responses"][mask].float())
    pos = td["position_ids"]  # the kept tokens keep their original positions
    for i in range(B):
        keep = text.batch["attention_mask"][i].bool()
        assert torch.equal(pos[i], data.batch["position_ids"][i][:, keep])


# ---------------------------------------------------------------- the trainer mixin (no verl needed)


class _Proto:
    """The parts of verl.DataProto the mixin touches."""

    def __init__(self, batch, non_tensor_batch=None, meta_info=None):
        self.batch, self.non_tensor_batch, self.meta_info = batch, non_tensor_batch or {}, meta_info or {}


class _Cfg(dict):
    __getattr__ = dict.__getitem__


class _FakeRayPPOTrainer:
    """Stands in for RayPPOTrainer: an actor whose log-prob call and update are recorded."""

    def __init__(self, pgpo_cfg, text_logp):
        self.config = _Cfg(algorithm=_Cfg(pgpo=pgpo_cfg) if pgpo_cfg is not None else _Cfg())
        self.tokenizer = type("Tok", (), {"get_vocab": lambda self: {"<|image_pad|>": IMAGE_PAD, "a": 5}})()
        self.text_logp, self.log_prob_calls, self.updated_with = text_logp, [], None

    def _compute_old_log_prob(self, batch):
        self.log_prob_calls.append(batch)
        return _Proto({"old_log_probs": self.text_logp}), 0.0

    def _update_actor(self, batch):
        self.updated_with = batch.batch["advantages"].clone()
        return _Proto({}, meta_info={"metrics": {"actor/pg_loss": 0.1}})


class _PGPOTrainer(PGPOVerlTrainerMixin, _FakeRayPPOTrainer):
    pass


def _proto_batch():
    tensors, seq_adv = _verl_like_batch()
    text_logp = tensors.pop("pgpo_text_log_probs")
    prompts = torch.tensor([[0, 11, IMAGE_PAD, IMAGE_PAD, 12]] * B)
    input_ids = torch.cat([prompts, torch.full((B, T_RESP), 21)], 1)
    attention_mask = torch.cat([(prompts != 0).long(), tensors["response_mask"]], 1)
    tensors.update(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=torch.arange(input_ids.shape[1]).expand(B, 3, -1))
    mm = np.array([{"pixel_values": torch.rand(4, 3)} for _ in range(B)], dtype=object)
    return _Proto(tensors, {"multi_modal_inputs": mm}), seq_adv, text_logp


def test_trainer_mixin_reshapes_before_the_update():
    data, seq_adv, text_logp = _proto_batch()
    trainer = _PGPOTrainer({"enable": True, "tau": 0.6, "beta": 1.0}, text_logp)
    out = trainer._update_actor(data)
    (text_batch,) = trainer.log_prob_calls  # exactly one extra actor pass, on the text-only twin
    assert bool((text_batch.batch["attention_mask"][data.batch["input_ids"] == IMAGE_PAD] == 0).all())
    assert all(m == {} for m in text_batch.non_tensor_batch["multi_modal_inputs"])
    expected, _ = _expected_k3({**data.batch, "pgpo_text_log_probs": text_logp}, seq_adv, tau=0.6, beta=1.0)
    torch.testing.assert_close(trainer.updated_with.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.meta_info["metrics"]["actor/pg_loss"] == 0.1 and "pgpo/kl_mean" in out.meta_info["metrics"]


@pytest.mark.parametrize("kw", [{"control": "inverted"}, {"control": "shuffled"}, {"tau_mode": "quantile", "floor": 0.1}])
def test_variants_and_controls_are_the_loops(kw):
    """The adapter's variants are core_algos.pgpo_weights on its k3 scores (the loop's code)."""
    from pgpo_train.rl import core_algos
    from pgpo_train.rl.weight_variants import control_generator

    batch, seq_adv = _verl_like_batch()
    mask = batch["response_mask"].bool()
    s = torch.where(mask, k3_kl_ref(batch["old_log_probs"], batch["pgpo_text_log_probs"]), 0.0).float()
    want = core_algos.pgpo_weights(s, mask, backend="torch", generator=control_generator(3, 5), **kw)
    weights, metrics = pgpo_reshape_advantages_(batch, backend="torch", generator=control_generator(3, 5), **kw)
    torch.testing.assert_close(weights, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["advantages"], seq_adv[:, None] * want, atol=1e-5, rtol=1e-5)
    assert set(DIAG) <= set(metrics)
    with pytest.raises(ValueError, match="control"):
        pgpo_reshape_advantages_(_verl_like_batch()[0], control="bogus")


def test_trainer_mixin_shuffled_control_seeded_by_step():
    outs = []
    for step in (4, 4, 5):
        torch.manual_seed(0)  # the same batch each time
        data, _, text_logp = _proto_batch()
        trainer = _PGPOTrainer({"enable": True, "control": "shuffled", "seed": 1}, text_logp)
        trainer.global_steps = step
        out = trainer._update_actor(data)
        outs.append(trainer.updated_with)
        assert "pgpo/eff_token_ratio" in out.meta_info["metrics"]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_trainer_mixin_off_unless_enabled():
    for cfg in (None, {"enable": False, "tau": 0.4}):
        data, _, text_logp = _proto_batch()
        before = data.batch["advantages"].clone()
        trainer = _PGPOTrainer(cfg, text_logp)
        trainer._update_actor(data)
        assert trainer.log_prob_calls == [] and torch.equal(trainer.updated_with, before)


def test_integrations_import_without_trl_or_verl():
    """The adapters are optional: with trl and verl unimportable the package still imports and the verl path works."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['trl'] = None; sys.modules['verl'] = None\n"
        "import torch\n"
        "import pgpo_train.integrations as I\n"
        "b = {'advantages': torch.ones(2, 3), 'response_mask': torch.ones(2, 3, dtype=torch.long)}\n"
        "I.pgpo_reshape_advantages_(b, scores=torch.rand(2, 3), backend='torch')\n"
        "try:\n"
        "    I.PGPOGRPOTrainer\n"
        "except ImportError as e:\n"
        "    assert 'pgpo[trl]' in str(e), e\n"
        "    print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_trainer_mixin_dev_preset_is_the_hand_formula():
    """algorithm.pgpo.preset=dev-easyr1: clamped k3 (log r in [-20, 20], S in [0, 10]), each response's gate at its
    0.4-quantile of I, floor 0.1, no renormalization (the loop's weights on the clamped scores)."""
    from pgpo_train.rl import core_algos

    data, seq_adv, text_logp = _proto_batch()
    text_logp[0, 0] = data.batch["old_log_probs"][0, 0] - 30.0  # log r = -30: the clamps act (k3 29 -> 10)
    trainer = _PGPOTrainer({"enable": True, "preset": "dev-easyr1"}, text_logp)
    trainer._update_actor(data)
    mask = data.batch["response_mask"].bool()
    d = (text_logp.double() - data.batch["old_log_probs"].double()).clamp(-20, 20)
    s = torch.where(mask, (torch.expm1(d) - d).clamp(0, 10), 0.0).float()
    assert float(s[0, 0]) == 10.0
    w = core_algos.pgpo_weights(s, mask, tau_mode="quantile", floor=0.1, renormalize=False, backend="torch")
    assert float(w[mask].min()) >= 0.1 - 1e-6 and not torch.allclose(w.sum(-1), mask.sum(-1).float())
    torch.testing.assert_close(trainer.updated_with, seq_adv[:, None] * w, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="algorithm.pgpo.preset"):
        _PGPOTrainer({"enable": True, "preset": "nope"}, text_logp)._update_actor(data)
