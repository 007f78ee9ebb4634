"""PGPOGRPOTrainer on every supported model family, with LoRA, without images, without args, and with k3 reusing
TRL's visual log-probs: real TRL steps on tiny random models built locally."""

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_count_records
from pgpo_train.integrations import PGPOConfig
from pgpo_train.integrations import PGPOGRPOTrainer
from pgpo_train.models import model_family
from pgpo_train.models.tiny_families import TINY_FAMILIES
from pgpo_train.models.tiny_families import build_tiny_family

N_PROMPTS, G, MAX_NEW = 2, 2, 4


def _dataset(with_image=(True, True)):
    rows = []
    for r, img in zip(make_count_records(len(with_image), seed=1), with_image):
        text = {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=r["problem"])}
        content = [{"type": "image"}, text] if img else [text]
        # TRL's "images" column: an empty list is a prompt without image (None in an "image" column crashes TRL)
        rows.append({"images": [r["image"]] if img else [], "answer": r["answer"],
                     "prompt": [{"role": "user", "content": content}]})
    return datasets.Dataset.from_list(rows)


def _reward(completions, **kwargs):
    # any deterministic function of the text that varies across samples: non-zero advantages
    return [float(sum(map(ord, c[0]["content"])) % 7) for c in completions]


def _config(tmp_path, **kw):
    kw = {"per_device_train_batch_size": N_PROMPTS * G, "max_steps": 2, **kw}
    return PGPOConfig(output_dir=str(tmp_path), num_generations=G, max_completion_length=MAX_NEW,
                      learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                      bf16=False, seed=0, pgpo_backend="torch", **kw)


class _Recording(PGPOGRPOTrainer):
    """Keeps the weights of every rollout batch."""

    def _pgpo_weights(self, output, mask):
        w, s = super()._pgpo_weights(output, mask)
        self.recorded = [*getattr(self, "recorded", []), (w.clone(), mask.clone())]
        return w, s


def _nonuniform(recorded) -> bool:
    return any(float(w[m].max() - w[m].min()) > 1e-3 for w, m in recorded)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_two_real_steps_on_every_family(tmp_path, family):
    model, processor = build_tiny_family(family, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path), train_dataset=_dataset(),
                         processing_class=processor)
    assert set(model_family.special_ids(model)) <= set(trainer.generation_config.suppress_tokens)
    trainer.train()
    assert len(trainer.recorded) == 2
    for w, m in trainer.recorded:
        torch.testing.assert_close(w.sum(-1), m.sum(-1).float())  # mass-conserving per sequence
    assert _nonuniform(trainer.recorded)  # PGPO did reshape
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # real optimizer steps ran
    logged = [r for r in trainer.state.log_history if "pgpo/kl_mean" in r]
    assert len(logged) == 2 and all(r["pgpo/no_image_frac"] == 0.0 for r in logged)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "idefics3", "internvl"])  # each pixel layout
def test_prompts_with_two_images(tmp_path, family):
    """TRL's "images" lists of 2 and 1 images in one batch: PGPO's passes select each prompt's images (TRL's
    num_images) and the text-only pass masks both images. LLaVA-OneVision is refused: TRL drops the
    batch_num_images its model needs for several images per prompt."""
    model, processor = build_tiny_family(family, seed=0)
    recs = make_count_records(4, seed=2)
    rows = []
    for i, images in enumerate([[recs[0]["image"], recs[1]["image"]], [recs[2]["image"]]]):
        text = {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question="How many shapes in the images?")}
        rows.append({"images": images, "answer": str(i),
                     "prompt": [{"role": "user", "content": [{"type": "image"}] * len(images) + [text]}]})
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path), processing_class=processor,
                         train_dataset=datasets.Dataset.from_list(rows))
    if family == "llava_onevision":  # TRL drops its batch_num_images: refused before any rollout
        with pytest.raises(ValueError, match="TRL does not pass LLaVA-OneVision's batch_num_images"):
            trainer.train()
        return
    trainer.train()
    assert len(trainer.recorded) == 2 and _nonuniform(trainer.recorded)
    for w, m in trainer.recorded:
        torch.testing.assert_close(w.sum(-1), m.sum(-1).float())
    logged = [r for r in trainer.state.log_history if "pgpo/kl_mean" in r]
    assert len(logged) == 2 and all(r["pgpo/no_image_frac"] == 0.0 and r["pgpo/kl_mean"] > 0 for r in logged)


def test_lora_on_qwen2_5_vl_trains_with_non_uniform_weights(tmp_path):
    peft = pytest.importorskip("peft")
    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path), train_dataset=_dataset(),
                         processing_class=processor,
                         peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, peft.PeftModel)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora
    trainer.train()
    assert _nonuniform(trainer.recorded)
    changed = [n for n, p in trainer.model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert changed  # the adapter trained


def test_no_image_batches_are_logged_once_counted_and_an_all_text_run_is_an_error(tmp_path):
    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    # one prompt per step, one with and one without an image
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path, per_device_train_batch_size=G),
                         train_dataset=_dataset((True, False)), processing_class=processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert sum("has no image" in str(w.message) for w in caught) == 1
    fracs = [r["pgpo/no_image_frac"] for r in trainer.state.log_history if "pgpo/no_image_frac" in r]
    assert sorted(fracs) == [0.0, 1.0]

    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    trainer = PGPOGRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1),
                              train_dataset=_dataset((False, False)), processing_class=processor)
    with pytest.warns(UserWarning, match="has no image"), pytest.raises(ValueError, match="none of the 1 rollout"):
        trainer.train()


def test_refused_before_loading_a_text_only_or_imageless_setup(tmp_path, monkeypatch):
    from transformers import Qwen2Config

    text_dir = tmp_path / "text-only"
    Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(text_dir)  # a config and no weights: loading would fail

    def no_init(*a, **k):
        raise AssertionError("GRPOTrainer.__init__ ran: the model was loaded before the refusal")

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", no_init)
    with pytest.raises(ValueError, match="supported families: Qwen2-VL"):
        PGPOGRPOTrainer(model=str(text_dir), reward_funcs=_reward, args=_config(tmp_path / "o"))
    model, _ = build_tiny_family("qwen2_5_vl")
    with pytest.raises(ValueError, match="no 'image' or 'images' column"):
        PGPOGRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path / "o"),
                        train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}]))


def test_without_args_a_default_pgpo_config_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    trainer = PGPOGRPOTrainer(model, _reward, train_dataset=_dataset(), processing_class=processor)
    assert isinstance(trainer.args, PGPOConfig)
    assert (trainer.args.pgpo_tau, trainer.args.pgpo_beta, trainer.args.pgpo_estimator) == (0.4, 2.0, "full")
    assert trainer.args.output_dir.endswith("-PGPO")


def test_k3_reuses_trls_visual_log_probs_with_identical_weights(tmp_path):
    """num_iterations=2: TRL computes the visual pass's per-token log-probs itself; k3 reuses them (one forward
    fewer) and gives the weights a fresh visual forward gives."""
    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper distributions: KLs well above rounding (see test_integration_trl)

    class Both(PGPOGRPOTrainer):
        calls, pairs = [], []

        def _pgpo_completion_logps(self, model, kwargs, labels, T):
            self.calls.append("pixel_values" in kwargs)
            return super()._pgpo_completion_logps(model, kwargs, labels, T)

        def _pgpo_weights(self, output, mask):
            assert output.get("old_per_token_logps") is not None
            n = len(self.calls)
            reused, _ = super()._pgpo_weights(output, mask)
            reused_visual_calls = sum(self.calls[n:])
            fresh, _ = super()._pgpo_weights({k: v for k, v in output.items() if k != "old_per_token_logps"}, mask)
            self.pairs.append((reused, fresh, reused_visual_calls, sum(self.calls[n:]) - reused_visual_calls))
            return reused, _

    trainer = Both(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1, num_iterations=2,
                                                                    pgpo_estimator="k3"),
                   train_dataset=_dataset(), processing_class=processor)
    trainer.train()
    assert trainer.pairs
    for reused, fresh, vis_reused, vis_fresh in trainer.pairs:
        assert vis_reused == 0 and vis_fresh >= 1  # the reuse skipped the visual forward
        assert torch.equal(reused, fresh)  # same policy, fused head, temperature, positions and chunks: bitwise
        assert float(fresh.max() - fresh.min()) > 0.1


def test_trl_example_shows_non_zero_reward_and_loss_on_its_defaults(tmp_path, monkeypatch, capsys):
    """On its defaults the example must learn something: a random policy never earns a reward, so loss, grad_norm and
    reward would be 0 every step."""
    import os
    import runpy

    monkeypatch.setenv("PGPO_CACHE", str(tmp_path / "cache"))
    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "trl_pgpo.py"),
                          run_name="example")["main"]
    trainer = main(["--output-dir", str(tmp_path / "run")])  # everything else at its default
    rows = [r for r in trainer.state.log_history if "pgpo/kl_mean" in r]
    assert len(rows) == 2
    assert any(r["reward"] > 0 for r in rows) and any(r["reward_std"] > 0 for r in rows)
    assert any(r["loss"] != 0 for r in rows) and any(r["grad_norm"] > 0 for r in rows)
    assert "SFT warm-up: 50 steps" in capsys.readouterr().out
