"""The fused-lm-head old-log-prob path (hidden states + pgpo_kernels.fused_linear_token_stats) on the tiny model:
same old_logp / entropy / scores as the logits path, the vision tower still runs, no logits are built, a whole
train step runs with --pgpo.fused-lm-head on, and an lm_head the fused path cannot reproduce is refused."""

import json
import math

import pytest
import torch

from pgpo_train.cli import main
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models.lm_head import check_fused_lm_head
from pgpo_train.models.lm_head import use_fused_lm_head
from pgpo_train.models.tiny import build_tiny
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.sampling import rollout
from pgpo_train.step.scoring import old_logp_and_scores

CPU = torch.device("cpu")


def _cfg(**kw) -> TrainConfig:
    base = {"prompt_template": "tiny", "out_dir": "unused", "group_size": 4, "micro_batch_size": 3}
    base.update(kw)
    return TrainConfig(**base).resolved()


@pytest.fixture(scope="module")
def tiny_batch():
    """A tiny model with peaked output distributions (scaled lm_head) and one rollout batch of 8 responses."""
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # random init is near-uniform: make entropy and KL far from 0
    cfg = _cfg(max_new_tokens=12, temperature=0.7)
    batch, _ = rollout(model, processor, make_count_records(2, seed=4), cfg, CPU, {})
    batch.pop("texts")
    return model, batch


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "estimator, backend", [("full", "torch"), ("k3", "torch"), ("full", "triton"), ("k3", "triton")]
)
def test_fused_lm_head_matches_logits_path(tiny_batch, estimator, backend):
    model, batch = tiny_batch
    cfg = _cfg(max_new_tokens=12, temperature=0.7)
    cfg.pgpo.estimator, cfg.pgpo.backend = estimator, backend  # triton: under the interpreter (conftest)
    plain = old_logp_and_scores(model, batch, cfg, {}, fused_lm_head=False)
    vis_calls, h1 = _count_calls(model.model.visual)
    head_calls, h2 = _count_calls(model.lm_head)
    try:
        times = {}
        fused = old_logp_and_scores(model, batch, cfg, times, fused_lm_head=True)
    finally:
        h1.remove()
        h2.remove()
    n_micro = -(-batch["responses"].shape[0] // cfg.micro_batch_size)
    assert len(vis_calls) == n_micro, "the visual pass must run the vision tower (docs/method.md#trainer-traps)"
    assert head_calls == [], "the fused path must not build logits with the lm_head"
    assert {"timing/old_logp", "timing/text_only", "timing/kl_reshape"} <= times.keys()
    m = batch["response_mask"].bool()
    ent = plain["entropy"][m]
    assert ent.mean() > 0.3 and plain["scores"][m].max() > 1e-3, "test needs non-trivial distributions"
    for key in ("old_logp", "entropy", "scores"):
        assert fused[key].shape == plain[key].shape
        torch.testing.assert_close(fused[key][m], plain[key][m], atol=2e-5, rtol=1e-5, msg=f"{estimator} {key}")
    assert (fused["old_logp"][m] <= 0).all() and (fused["scores"][m] >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_lm_head_bf16_ranges_and_agreement(tiny_batch, backend):
    """bf16 policy (docs/method.md#trainer-traps: ranges in bf16 too). The torch fallback rounds logit chunks to
    bf16 like lm_head(hidden) does; Triton keeps fp32 accumulators, so it differs from the bf16 logits by their
    rounding."""
    model, batch = tiny_batch
    model16, _ = build_tiny(seed=0)
    model16.load_state_dict(model.state_dict())
    model16 = model16.to(torch.bfloat16)
    batch = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    cfg = _cfg(max_new_tokens=12, temperature=0.7)
    cfg.pgpo.backend = backend
    plain = old_logp_and_scores(model16, batch, cfg, {}, fused_lm_head=False)
    fused = old_logp_and_scores(model16, batch, cfg, {}, fused_lm_head=True)
    m = batch["response_mask"].bool()
    lp, ent, kl = fused["old_logp"][m], fused["entropy"][m], fused["scores"][m]
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all() and (lp <= 0).all()
    assert (ent >= -1e-6).all() and (ent <= math.log(model.lm_head.out_features) + 1e-4).all()
    assert (kl >= 0).all()
    # bound: |logits| <= 13.5 here, bf16 rounds them by <= 2**-5, / T=0.7 -> 0.045; logp moves <= 2x that (~0.03 seen)
    atol = 1e-3 if backend == "torch" else 0.1
    for key in ("old_logp", "entropy", "scores"):
        torch.testing.assert_close(fused[key][m], plain[key][m], atol=atol, rtol=0, msg=f"{backend} {key}")


def test_tied_lm_head_is_accepted_and_matches(tiny_batch):
    """Tied embeddings (Qwen2.5-VL-3B ties them): lm_head.weight is what the model's forward multiplies by."""
    model, batch = tiny_batch
    model2, _ = build_tiny(seed=0)
    model2.load_state_dict(model.state_dict())
    model2.lm_head.weight = model2.model.language_model.embed_tokens.weight  # tie
    check_fused_lm_head(model2)
    cfg = _cfg(max_new_tokens=12, temperature=0.7)
    plain = old_logp_and_scores(model2, batch, cfg, {}, fused_lm_head=False)
    fused = old_logp_and_scores(model2, batch, cfg, {}, fused_lm_head=True)
    m = batch["response_mask"].bool()
    torch.testing.assert_close(fused["scores"][m], plain["scores"][m], atol=2e-5, rtol=1e-5)


class _PatchedHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "patch, match",
    [
        ("subclass", "not a plain torch.nn.Linear"),
        ("hook", "forward hooks"),
        ("instance_forward", "patched on the instance"),
        ("softcap", r"final_logit_softcapping = 30.0"),
        ("scaling", r"logits_scaling = 8.0"),
    ],
)
def test_unsupported_lm_head_is_refused(patch, match):
    model, _ = build_tiny(seed=0)
    if patch == "subclass":
        head = _PatchedHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        model.lm_head = head
    elif patch == "hook":
        model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    elif patch == "instance_forward":
        model.lm_head.forward = lambda x: torch.nn.functional.linear(x, model.lm_head.weight) * 2.0
    elif patch == "softcap":
        model.config.text_config.final_logit_softcapping = 30.0
    else:
        model.config.text_config.logits_scaling = 8.0
    with pytest.raises(ValueError, match=match) as err:
        use_fused_lm_head("on", model, CPU)
    assert "--pgpo.fused-lm-head off" in str(err.value)
    # auto never raises: it keeps the model's own logits path (on CUDA it would otherwise turn the fused path on)
    assert use_fused_lm_head("auto", model, torch.device("cuda")) is False


def test_fused_lm_head_mode_resolution():
    model, _ = build_tiny(seed=0)
    assert use_fused_lm_head("on", model, CPU) is True
    assert use_fused_lm_head("off", model, torch.device("cuda")) is False
    assert use_fused_lm_head("auto", model, CPU) is True  # every device alike: the fused update saves memory anywhere
    assert use_fused_lm_head("auto", model, torch.device("cuda")) is True  # only resolves, runs nothing on CUDA
    assert TrainConfig(out_dir="x").pgpo.fused_lm_head == "auto"
    cfg = TrainConfig(out_dir="x")
    cfg.pgpo.fused_lm_head = "yes"
    with pytest.raises(ValueError, match="--pgpo.fused-lm-head must be auto, on or off"):
        cfg.resolved()


def test_train_step_with_fused_lm_head_on(tmp_path):
    """A whole tiny RL step through the CLI flag: the fused path ran (logged) and the update happened."""
    data = save_count_dataset(tmp_path / "count", n_train=16, n_test=4, seed=0)
    out = tmp_path / "run"
    argv = ["--dataset", data, "--prompt-template", "tiny", "--out-dir", str(out), "--steps", "1"]
    argv += ["--sft-steps", "0", "--prompts-per-step", "2"]
    argv += ["--group-size", "4", "--micro-batch-size", "3", "--max-new-tokens", "8", "--dynamic-sampling", "off"]
    argv += ["--eval-every", "0", "--no-progress", "--no-tensorboard", "--pgpo.fused-lm-head", "on"]
    assert main(argv) == 0
    with open(out / "metrics.jsonl") as f:
        rl = [json.loads(x) for x in f][-1]
    assert rl["pgpo/fused_lm_head"] == 1.0
    for key in ("actor/loss", "actor/entropy", "pgpo/kl_mean", "timing/old_logp", "timing/text_only"):
        assert key in rl, key
    with open(out / "config.json") as f:
        assert json.load(f)["pgpo"]["fused_lm_head"] == "on"
