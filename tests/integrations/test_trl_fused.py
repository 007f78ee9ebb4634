"""TRL adapter: the 'full' estimator's passes stop at hidden states (no [b, T, V] logits, as TRL 1.16's
own passes hold none), and use_liger_kernel=True trains a real step where TRL only applies Liger's layer kernels.

The weights themselves are checked against a logits oracle in test_integration_trl.py (which runs this same path)."""

import os
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_trl import _config
from test_trl import _dataset
from test_trl import _reward
from test_trl import _tiny_policy

import pgpo_train.integrations.trl as pgpo_trl
from pgpo_train.integrations import PGPOGRPOTrainer
from pgpo_train.integrations import fused_passes


class _Recording(PGPOGRPOTrainer):
    advantages: list = []  # noqa: RUF012 - per-test, reset by each test

    def _compute_loss(self, model, inputs):
        type(self).advantages.append(inputs["advantages"].detach().clone())
        return super()._compute_loss(model, inputs)


def _no_logits(self, *a, **k):
    raise AssertionError("the full estimator built [b, T, V] logits although the lm_head is plain")


def test_full_estimator_builds_no_logits(tmp_path, monkeypatch):
    calls = []
    real = fused_passes.fused_token_kl
    monkeypatch.setattr(fused_passes, "fused_token_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(PGPOGRPOTrainer, "_pgpo_completion_logits", _no_logits)
    model, processor = _tiny_policy()
    _Recording.advantages = []
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1),
                         train_dataset=_dataset(), processing_class=processor)
    assert fused_passes.is_trl_fused_head(trainer.model)  # TRL 1.16 patched its fused head on the instance
    assert fused_passes.plain_head_problem(trainer.model) is None
    trainer.train()
    assert calls, "the hidden-state KL was not used"
    adv = _Recording.advantages[0]
    assert adv.dim() == 2


def test_full_estimator_keeps_logits_for_a_head_it_cannot_reproduce(tmp_path, monkeypatch):
    model, processor = _tiny_policy()
    model.config.text_config.final_logit_softcapping = 30.0  # the lm_head rules refuse it: logits path
    assert "final_logit_softcapping" in (fused_passes.plain_head_problem(model) or "")
    monkeypatch.setattr(fused_passes, "fused_token_kl", lambda *a, **k: pytest.fail("fused path on a softcapped head"))
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1),
                         train_dataset=_dataset(), processing_class=processor)
    trainer.train()


def test_liger_layer_kernels_step(tmp_path):
    """TRL 1.16 with use_liger_kernel=True: Liger's layer kernels (in Triton's interpreter on this CPU), TRL's own
    loss with PGPO's [B, T] advantages."""
    pytest.importorskip("liger_kernel")
    assert pgpo_trl.liger_problem() is None
    try:  # what transformers' apply_liger_kernel imports for this model
        import liger_kernel.transformers.model.qwen2_5_vl  # noqa: F401
    except ImportError as e:  # liger 0.8.5 with transformers 5.24: its Qwen2.5-VL output class no longer imports
        # (tried on tiny Gemma 3 too, which Liger does patch: its layer_norm kernel fails in Triton 3.9's
        # interpreter, "'float' object has no attribute 'to'", so no Liger step runs on this CPU box)
        pytest.skip(f"Liger cannot patch Qwen2.5-VL under this transformers ({e}); PGPO allows the flag, the run "
                    "would fail inside Liger's import at train start")
    model, processor = _tiny_policy()
    _Recording.advantages = []
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _Recording(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1, use_liger_kernel=True),
                         train_dataset=_dataset(), processing_class=processor)
    trainer.train()
    norms = {type(m).__name__ for m in trainer.model.modules()}
    assert any(n.startswith("Liger") for n in norms), f"no Liger layer applied: {sorted(norms)[:20]}"
    adv = _Recording.advantages[0]
    assert adv.dim() == 2 and bool(torch.isfinite(adv).all())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

