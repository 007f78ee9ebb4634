"""PGPOGRPOTrainer trains real steps with real TRL on the tiny Qwen2.5-VL, and its loss sees A x w~.

The expected weights come from an oracle that shares no code with the trainer's passes: each sequence is run alone,
unpadded, the text-only pass built by *deleting* the image tokens while keeping the others' 3-D positions
(docs/method.md#text-only-pass: this equals the masked pass), and the weights computed by the float64 reference.
"""

import math
from typing import ClassVar

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl.trainer import grpo_trainer as trl_grpo

from pgpo_kernels.reference import k3_kl_ref
from pgpo_kernels.reference import pgpo_token_weights_ref
from pgpo_kernels.reference import reshape_weights_ref
from pgpo_kernels.reference import token_logprob_ref
from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_count_records
from pgpo_train.integrations import PGPOConfig
from pgpo_train.integrations import PGPOGRPOTrainer
from pgpo_train.models.tiny import build_tiny
from pgpo_train.rl import core_algos

N_PROMPTS, G, MAX_NEW = 2, 4, 6


def _dataset():
    rows = [{"image": r["image"], "answer": r["answer"],
             "prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(
                                                         question=r["problem"])}]}]}
            for r in make_count_records(N_PROMPTS, seed=1)]
    return datasets.Dataset.from_list(rows)


def _reward(completions, **kwargs):
    # any deterministic function of the text that varies across samples: the test needs non-zero advantages
    return [float(sum(map(ord, c[0]["content"])) % 7) for c in completions]


def _config(tmp_path, **pgpo):
    return PGPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=N_PROMPTS * G, num_generations=G,
                      max_completion_length=MAX_NEW, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", bf16=False, seed=0, pgpo_backend="torch", **pgpo)


def _tiny_policy():
    """The tiny random Qwen2.5-VL with a sharper LM head (x20).

    At init its next-token distributions are near uniform (entropy ~ log V), so the two passes differ by KLs of
    ~1e-3 whose per-sequence min-max normalization magnifies float32 rounding past any useful tolerance; x20 gives
    KLs of ~0.1-0.7 and entropies ~2.7 nats, like a trained model's.
    """
    model, processor = build_tiny(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model, processor


def _oracle_pass_logits(model, out, i):
    """Unpadded visual and deleted-image-token text-only logits for completion i: ([T_i, V], [T_i, V])."""
    cfg = model.config
    ids = torch.cat([out["prompt_ids"][i], out["completion_ids"][i]])
    keep = torch.cat([out["prompt_mask"][i], out["completion_mask"][i]]).bool()
    ids = ids[keep][None]  # [1, L_i], no padding
    n_img = out["image_grid_thw"].prod(-1)
    img = out["image_grid_thw"][i:i + 1]  # one image per prompt in this dataset
    px = out["pixel_values"][int(n_img[:i].sum()):int(n_img[:i + 1].sum())]
    mm = (ids == cfg.image_token_id).long()
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=img)  # [3, 1, L_i]
    T_i = int(out["completion_mask"][i].sum())
    vis = model(input_ids=ids, position_ids=pos, pixel_values=px, image_grid_thw=img, mm_token_type_ids=mm).logits
    text = ids != cfg.image_token_id
    txt = model(input_ids=ids[:, text[0]], position_ids=pos[:, :, text[0]]).logits
    n = ids.shape[1]
    return vis[0, n - T_i - 1:n - 1], txt[0, text[0].sum() - T_i - 1:text[0].sum() - 1], ids[0, n - T_i:]


class _Capturing(PGPOGRPOTrainer):
    """Records what _compute_loss sees, and the oracle's expectation computed from the model at that moment
    (the model that generated the batch: one generation per optimizer step, no update in between)."""

    records: ClassVar[list] = []

    def _compute_loss(self, model, inputs):
        with torch.no_grad():
            expected = []
            for i in range(inputs["completion_ids"].shape[0]):
                lv, lt, tok = _oracle_pass_logits(self.model, inputs, i)
                if self.args.pgpo_estimator == "full":
                    w, s = pgpo_token_weights_ref(lv[None], lt[None], None, temperature=self.temperature,
                                                  tau=self.args.pgpo_tau, beta=self.args.pgpo_beta)
                else:
                    s = k3_kl_ref(token_logprob_ref(lv, tok, self.temperature),
                                  token_logprob_ref(lt, tok, self.temperature))[None]
                    w = reshape_weights_ref(s, None, tau=self.args.pgpo_tau, beta=self.args.pgpo_beta)
                expected.append(w[0])
        self.records.append({"advantages": inputs["advantages"].clone(), "weights": expected,
                             "completion_mask": inputs["completion_mask"].clone()})
        return super()._compute_loss(model, inputs)


@pytest.fixture
def capture(monkeypatch):
    """Keeps TRL's rollout order (no shuffle) and records the sequence advantages before PGPO touches them."""
    base = []
    original = trl_grpo.GRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        out = original(self, inputs)
        base.append(out["advantages"].clone())  # [B]
        return out

    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", lambda d: d)
    monkeypatch.setattr(trl_grpo.GRPOTrainer, "_generate_and_score_completions", recording)
    _Capturing.records = []
    return base


# chunk 3: the PGPO passes run over sequences [0, 3), [3, 6), [6, 8), each with its own images
@pytest.mark.parametrize("estimator, steps, chunk", [("full", 2, None), ("k3", 1, None), ("full", 1, 3)])
def test_loss_sees_sequence_advantage_times_pgpo_weights(tmp_path, capture, estimator, steps, chunk):
    model, processor = _tiny_policy()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _Capturing(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=steps,
                                                                        pgpo_estimator=estimator,
                                                                        pgpo_chunk_size=chunk),
                         train_dataset=_dataset(), processing_class=processor)
    trainer.train()

    assert len(_Capturing.records) == steps and len(capture) == steps
    for rec, seq_adv in zip(_Capturing.records, capture):
        adv, mask = rec["advantages"], rec["completion_mask"].bool()
        assert adv.shape == mask.shape  # the loss got per-token advantages [B, T]
        assert bool((seq_adv != 0).any())  # otherwise the check below would be vacuous
        for i, w_ref in enumerate(rec["weights"]):
            T_i = int(mask[i].sum())
            torch.testing.assert_close(adv[i, :T_i].double(), seq_adv[i].double() * w_ref, atol=2e-4, rtol=2e-4)
            assert bool((adv[i, T_i:] == 0).all())
            torch.testing.assert_close(w_ref.sum(), torch.tensor(float(T_i), dtype=w_ref.dtype))
        spread = torch.cat([w for w in rec["weights"] if w.numel() > 1])
        assert float(spread.max() - spread.min()) > 0.1  # the weights are not all 1: PGPO did reshape
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # real optimizer steps ran
    logged = trainer.state.log_history[0]
    one = torch.ones(1, 1)
    assert set(core_algos.weight_metrics(one, one * 0, one, token_adv=one)) <= set(logged)
    assert logged["pgpo/kl_mean"] >= 0


def test_shuffled_control_keeps_each_completions_weights(tmp_path, capture):
    """pgpo_control="shuffled": the loss sees A x (a permutation of the oracle's weights within each completion),
    and the rows carry the weight diagnostics the loop logs."""
    model, processor = _tiny_policy()
    trainer = _Capturing(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1, pgpo_control="shuffled"),
                         train_dataset=_dataset(), processing_class=processor)
    trainer.train()
    (rec,), (seq_adv,) = _Capturing.records, capture
    adv, mask = rec["advantages"], rec["completion_mask"].bool()
    moved = False
    for i, w_ref in enumerate(rec["weights"]):
        T_i = int(mask[i].sum())
        if abs(float(seq_adv[i])) < 1e-6:
            continue
        w = adv[i, :T_i].double() / float(seq_adv[i])
        torch.testing.assert_close(w.sort().values, w_ref.sort().values, atol=2e-4, rtol=2e-4)
        moved |= not torch.allclose(w, w_ref, atol=1e-3)
    assert moved  # the permutation moved weights
    logged = trainer.state.log_history[0]
    for key in ("pgpo/frac_above_tau", "pgpo/weight_gini", "pgpo/eff_token_ratio", "pgpo/top1_mass",
                "pgpo/top10_mass", "pgpo/weight_max"):
        assert key in logged, key
    assert 0 < logged["pgpo/eff_token_ratio"] <= 1 and 0 < logged["pgpo/top1_mass"] <= logged["pgpo/top10_mass"] <= 1


def test_refuses_liger_and_bad_options(tmp_path, monkeypatch):
    import pgpo_train.integrations.trl as pgpo_trl

    assert pgpo_trl.liger_problem() is None  # TRL 1.16: layer kernels only, its own [B, T] loss (test_integration_trl_fused)
    # a TRL whose use_liger_kernel swaps in Liger's [B]-advantage GRPO loss: refused, before and after construction
    monkeypatch.setattr(pgpo_trl, "liger_problem", lambda: pgpo_trl.LIGER_ERROR)
    with pytest.raises(ValueError, match="control"):
        _config(tmp_path, pgpo_control="random")
    with pytest.raises(ValueError, match="floor"):
        _config(tmp_path, pgpo_floor=-0.1)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        _config(tmp_path, use_liger_kernel=True)
    with pytest.raises(ValueError, match="tau"):
        _config(tmp_path, pgpo_tau=1.5)
    with pytest.raises(ValueError, match="estimator"):
        _config(tmp_path, pgpo_estimator="k2")
    with pytest.raises(ValueError, match="pgpo_temperature"):
        _config(tmp_path, pgpo_estimator="k3", pgpo_temperature=0.7)
    args = _config(tmp_path)
    args.use_liger_kernel = True  # edited after construction: the trainer checks again before loading anything
    with pytest.raises(ValueError, match="use_liger_kernel"):
        PGPOGRPOTrainer(model="unused", reward_funcs=_reward, args=args)
    with pytest.raises(TypeError, match="PGPOConfig"):
        PGPOGRPOTrainer(model="unused", reward_funcs=_reward,
                        args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))


def test_config_dev_preset_and_k3_clamps(tmp_path):
    c = _config(tmp_path, pgpo_preset="dev-easyr1", pgpo_floor=0.2)
    assert (c.pgpo_tau_mode, c.pgpo_renormalize, c.pgpo_estimator, c.pgpo_k3_log_ratio_max, c.pgpo_k3_score_max) \
        == ("quantile", False, "k3", 20.0, 10.0)
    assert c.pgpo_floor == 0.2, "an explicit value wins over the preset's"
    with pytest.raises(ValueError, match="pgpo_estimator='k3'"):
        _config(tmp_path, pgpo_k3_score_max=10.0)
    with pytest.raises(ValueError, match="preset"):
        _config(tmp_path, pgpo_preset="nope")


def test_weights_from_passes_k3_clamps():
    from pgpo_train.integrations.token_scores import pgpo_weights_from_passes

    lp_vis = torch.tensor([[-1.0, -1.0, -1.0, -2.0]])
    lp_txt = lp_vis + torch.tensor([[0.5, -30.0, 25.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, s = pgpo_weights_from_passes(mask, logp_vis=lp_vis, logp_txt=lp_txt, k3_log_ratio_max=20.0, k3_score_max=10.0,
                                    backend="torch")
    torch.testing.assert_close(s, torch.tensor([[math.exp(0.5) - 1.5, 10.0, 10.0, 0.0]]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="log-prob source"):
        pgpo_weights_from_passes(mask, scores=s, k3_score_max=10.0)
