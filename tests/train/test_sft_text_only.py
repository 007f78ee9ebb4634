"""--sft-text-only-prob: warm-up rows trained on exactly the text-only pass's inputs (the scoring pass's builder), a
seeded share of each batch, the stop criterion on the visual rows only; and the gradient-norm metrics (pre-clip,
post-clip, clip fraction) of every optimizer step."""

import json
import math
import os

import pytest
import torch

from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models.policy import logp_entropy
from pgpo_train.models.policy import make_optimizer
from pgpo_train.models.policy import response_logits
from pgpo_train.models.tiny import build_tiny
from pgpo_train.recipe.train import train
from pgpo_train.run.config import TrainConfig
from pgpo_train.step import update
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import text_only_kwargs
from pgpo_train.step.batching import visual_kwargs

CPU = torch.device("cpu")


def _cfg(**kw) -> TrainConfig:
    base = {"prompt_template": "tiny", "out_dir": "unused", "dataset": "unused", "sft_steps": 1}
    base.update(kw)
    return TrainConfig(**base).resolved()


def test_text_rows_seeded_share():
    a = update.sft_text_rows(seed=3, step=7, n=32, prob=0.3)
    assert a.dtype == torch.bool and int(a.sum()) == round(0.3 * 32)
    assert torch.equal(a, update.sft_text_rows(3, 7, 32, 0.3)), "the same (seed, step) draws the same rows"
    assert not torch.equal(a, update.sft_text_rows(3, 8, 32, 0.3))
    assert not update.sft_text_rows(3, 7, 32, 0.0).any()
    assert int(update.sft_text_rows(0, 0, 4, 0.01).sum()) == 1  # at least one text row when prob > 0
    assert int(update.sft_text_rows(0, 0, 4, 0.99).sum()) == 3  # at least one visual row left
    assert not update.sft_text_rows(0, 0, 1, 0.5).any()


@pytest.mark.parametrize("fused", [False, True])
def test_text_rows_see_the_scoring_pass_text_only_logits(fused):
    """The warm-up's text-only rows get the scoring pass's text-only log-probs (to 1e-5), computed in a different
    batch (other rows, other padding); the visual rows do not (the test can fail)."""
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions: the image changes the log-probs visibly
    cfg = _cfg()
    records = make_count_records(4, seed=5)
    sft = update.sft_batch(model, processor, records, cfg, CPU)
    rows = torch.tensor([1, 3])
    part = update.select_rows(model, sft, rows)
    lp_txt, _ = update.sft_forward(model, part, True, cfg, fused)
    lp_vis, _ = update.sft_forward(model, part, False, cfg, fused)
    # the scoring pass: a rollout-layout batch of these two records (G = 2 each), its text-only logits
    tok = processor.tokenizer
    recs = [records[1], records[3]]
    prompt = encode_prompts(processor, recs, cfg.prompt_template, 2, CPU)
    sols = [r["solution"] + tok.eos_token for r in recs for _ in range(2)]
    enc = tok(sols, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="right")
    rollout = build_sequences(model, prompt, enc["input_ids"], enc["attention_mask"], tok.pad_token_id)
    T = rollout["responses"].shape[1]
    ref_txt, _ = logp_entropy(response_logits(model, text_only_kwargs(model, rollout), T, 1.0), rollout["responses"])
    ref_vis, _ = logp_entropy(response_logits(model, visual_kwargs(model, rollout), T, 1.0), rollout["responses"])
    m = part["response_mask"].bool()
    t = m.shape[1]
    assert rollout["response_mask"][::2, :t].bool().equal(m)
    torch.testing.assert_close(lp_txt.detach()[m], ref_txt[::2, :t][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_vis.detach()[m], ref_vis[::2, :t][m], atol=1e-5, rtol=1e-5)
    assert (lp_txt.detach() - lp_vis.detach())[m].abs().max() > 1e-2, "text-only and visual rows must differ"


def test_sft_step_mixes_rows_and_logs_both_kinds():
    torch.manual_seed(0)
    model, processor = build_tiny(seed=0)
    cfg = _cfg(sft_text_only_prob=0.5, grad_clip=1e-3)
    records = make_count_records(4, seed=2)
    text_rows = torch.tensor([False, True, False, True])
    # the expected loss: token mean of the NLL over all rows, each kind with its own inputs
    batch = update.sft_batch(model, processor, records, cfg, CPU)
    nll, n = 0.0, 0.0
    for text_only, idx in ((False, torch.tensor([0, 2])), (True, torch.tensor([1, 3]))):
        part = update.select_rows(model, batch, idx)
        lp, _ = update.sft_forward(model, part, text_only, cfg)
        nll += float((-lp.detach() * part["response_mask"]).sum())
        n += float(part["response_mask"].sum())
    opt = make_optimizer(model, 1e-3, 0.0)
    seen = []
    real_step = opt.step

    def step(*a, **k):  # the norm the optimizer really sees: the post-clip one
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                                 if p.grad is not None]))))
        return real_step(*a, **k)

    opt.step = step
    m = update.sft_step(model, opt, processor, records, cfg, CPU, text_rows=text_rows)
    assert math.isclose(m["sft/loss"], nll / n, rel_tol=1e-5)
    assert m["sft/text_rows"] == 2.0 and m["sft/seq_acc"] == m["sft/visual_seq_acc"]
    assert {"sft/text_seq_acc", "sft/text_loss", "sft/visual_loss"} <= m.keys()
    assert m["sft/grad_norm"] > 1e-3 and m["sft/grad_clip_frac"] == 1.0
    assert math.isclose(m["sft/grad_norm_post_clip"], seen[0], rel_tol=1e-4)
    assert math.isclose(seen[0], 1e-3, rel_tol=1e-3)
    with pytest.raises(ValueError, match="text_rows"):
        update.sft_step(model, opt, processor, records, cfg, CPU, text_rows=torch.ones(3, dtype=torch.bool))


def test_grad_norm_metrics():
    cfg = _cfg(grad_clip=1.0)
    assert update.grad_norm_metrics(torch.tensor(4.0), cfg) == pytest.approx(
        {"actor/grad_norm": 4.0, "actor/grad_norm_post_clip": 1.0, "actor/grad_clip_frac": 1.0}, rel=1e-5)
    assert update.grad_norm_metrics(0.5, cfg)["actor/grad_clip_frac"] == 0.0
    off = update.grad_norm_metrics(4.0, _cfg(grad_clip=0.0))
    assert off["actor/grad_norm_post_clip"] == 4.0 and off["actor/grad_clip_frac"] == 0.0


def test_flag_range():
    with pytest.raises(ValueError, match="--sft-text-only-prob"):
        _cfg(sft_text_only_prob=1.0)


@pytest.mark.parametrize("algo", ["grpo", "pgpo"])
def test_loop_logs_both_kinds_and_grad_norms(tmp_path, algo):
    """A run with a text share: every SFT line has both kinds' metrics; every RL update line the three norms."""
    data = save_count_dataset(tmp_path / "d", n_train=32, n_test=4, seed=0)
    cfg = TrainConfig(dataset=data, prompt_template="tiny", out_dir=str(tmp_path / "run"), sft_steps=2,
                      sft_batch_size=4, sft_text_only_prob=0.5, steps=2, prompts_per_step=2, group_size=2,
                      max_new_tokens=8, eval_every=0, tensorboard=False, progress=False, save_every=0, algo=algo,
                      dynamic_sampling="off", lr=1e-3, seed=0)
    train(cfg)
    with open(os.path.join(tmp_path / "run", "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    sft = [x for x in lines if x["phase"] == "sft"]
    rl = [x for x in lines if x["phase"] == "rl"]
    assert len(sft) == 2 and len(rl) == 2
    for x in sft:
        assert x["sft/text_rows"] == 2.0
        assert {"sft/text_seq_acc", "sft/visual_seq_acc", "sft/grad_norm_post_clip", "sft/grad_clip_frac"} <= x.keys()
    for x in rl:
        assert x["actor/grad_norm_post_clip"] <= min(x["actor/grad_norm"], 1.0) + 1e-6
        assert x["actor/grad_clip_frac"] == float(x["actor/grad_norm"] > 1.0)
