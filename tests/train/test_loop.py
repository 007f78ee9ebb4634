"""End to end on the tiny model through the real-run path: from_pretrained on a saved tiny checkpoint, load_dataset
on a generated local dataset; one step, exact resume, PGPO(tau=0, beta=0) == DAPO, clear errors."""

import io
import json
import math
import os

import pytest
import torch

from pgpo_train.cli import main
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models.tiny import save_tiny_checkpoint
from pgpo_train.recipe.train import train
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.config import TrainConfig


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    raw = save_tiny_checkpoint(root / "tiny-random", seed=0)
    data = save_count_dataset(root / "count", n_train=64, n_test=8, seed=0)
    # a short SFT so sampled rewards are mixed: RL steps then have non-zero advantages and really update
    warm = train(
        TrainConfig(
            model=raw,
            dataset=data,
            prompt_template="tiny",
            out_dir=str(root / "sft"),
            steps=0,
            sft_steps=50,
            sft_batch_size=16,
            sft_lr=4e-3,
            eval_every=0,
            tensorboard=False,
            progress=False,
        )
    )
    model = save_tiny_checkpoint(root / "tiny-model", model=warm["model"], processor=warm["processor"])
    return {"model": model, "data": data, "root": root}


def _lines(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def _rl_lines(run_dir):
    return [x for x in _lines(run_dir) if x["phase"] == "rl"]


def _cfg(assets, out, **kw):
    base = {
        "model": assets["model"],
        "dataset": assets["data"],
        "prompt_template": "tiny",
        "out_dir": str(out),
        "steps": 2,
        "prompts_per_step": 2,
        "group_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 3,
        "max_new_tokens": 16,
        "sft_steps": 2,
        "sft_batch_size": 4,
        "eval_every": 0,
        "tensorboard": False,
        "progress": False,
        "save_every": 1,
        "seed": 3,
        "lr": 1e-4,
    }
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_end_to_end_pgpo(assets, tmp_path):
    out = train(_cfg(assets, tmp_path / "run", steps=1, eval_every=1, eval_size=4))
    lines = _lines(tmp_path / "run")
    assert [x["phase"] for x in lines] == ["sft", "sft", "rl"]
    rl = lines[-1]
    for key in ("reward/mean", "reward/acc", "response/length_mean", "timing/rollout", "timing/step", "eval/acc"):
        assert key in rl, key
    if rl["data/kept_frac"] > 0:  # an update happened: the PGPO phases ran and logged
        for key in (
            "actor/loss",
            "actor/clip_frac",
            "actor/entropy",
            "pgpo/kl_mean",
            "pgpo/kl_max",
            "pgpo/frac_above_tau",
            "pgpo/weight_mean",
            "timing/text_only",
            "timing/kl_reshape",
            "timing/update",
        ):
            assert key in rl, key
        assert rl["pgpo/kl_mean"] >= 0 and rl["pgpo/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert latest_checkpoint(str(tmp_path / "run" / "checkpoints")) is not None
    assert out["steps"] == 3


@pytest.mark.parametrize("estimator", ["k3"])
def test_update_changes_params_k3_no_dynamic_sampling(assets, tmp_path, estimator):
    """With dynamic sampling off every step updates (unless all advantages are 0): k3 path runs and moves weights."""
    cfg = _cfg(
        assets, tmp_path / "k3", steps=1, sft_steps=0, dynamic_sampling="off", group_size=4, lr=1e-2, weight_decay=0.0
    )
    cfg.pgpo.estimator = estimator
    from pgpo_train.models.policy import load_policy

    before = _params(load_policy(cfg.resolved(), torch.device("cpu"))[0])
    out = train(cfg)
    rl = _lines(tmp_path / "k3")[-1]
    assert "pgpo/kl_mean" in rl and "actor/loss" in rl
    after = _params(out["model"])
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    assert moved == (rl["adv/mean_abs"] > 0)


def test_resume_equals_uninterrupted(assets, tmp_path):
    full = train(_cfg(assets, tmp_path / "full", steps=3))
    train(_cfg(assets, tmp_path / "cut", steps=1))  # "killed" after SFT + 1 RL step (checkpointed)
    resumed = train(_cfg(assets, tmp_path / "cut", steps=3, resume=True))
    assert resumed["resumed_from"] is not None
    assert sum("actor/loss" in x for x in _rl_lines(tmp_path / "full")) >= 2, "test needs real updates"
    a, b = _params(full["model"]), _params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("timing/")}
    la = [strip(x) for x in _lines(tmp_path / "full")]
    lb = [strip(x) for x in _lines(tmp_path / "cut")]
    assert la == lb
    with pytest.raises(ValueError, match="already holds checkpoints"):  # never silently mixes two runs
        train(_cfg(assets, tmp_path / "full", steps=3))


def test_pgpo_tau0_beta0_equals_dapo_run(assets, tmp_path, monkeypatch):
    # the same old-log-prob code in both runs: Adam turns 1e-7 rounding differences into visible parameter
    # differences; the fused token_stats path is compared with the unfused one in its own test below
    # (the logits path: with the fused lm head, pgpo's old log-probs come from fused_linear_token_stats and dapo's
    # from fused_linear_logp, equal to ~1e-7; tests/train/test_update_fused.py compares fused with logits runs)
    monkeypatch.setenv("PGPO_NO_TOKEN_STATS", "1")
    cfg = _cfg(assets, tmp_path / "dapo", algo="dapo", sft_steps=0, dynamic_sampling="off", lr=1e-2)
    cfg.pgpo.fused_lm_head = "off"
    dapo = train(cfg)
    cfg = _cfg(assets, tmp_path / "pgpo", algo="pgpo", sft_steps=0, dynamic_sampling="off", lr=1e-2)
    cfg.pgpo.tau, cfg.pgpo.beta, cfg.pgpo.fused_lm_head = 0.0, 0.0, "off"
    pgpo = train(cfg)
    lines = _rl_lines(tmp_path / "pgpo")
    assert any(x["adv/mean_abs"] > 0 for x in lines), "test needs non-zero advantages"
    assert all(x["pgpo/weight_std"] < 1e-5 for x in lines if "pgpo/weight_std" in x)
    a, b = _params(dapo["model"]), _params(pgpo["model"])
    moved = _params(train(_cfg(assets, tmp_path / "none", algo="dapo", sft_steps=0, steps=0))["model"])
    assert any(not torch.equal(a[k], moved[k]) for k in a), "the runs must actually train"
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_missing_column_is_a_clear_error(assets, tmp_path):
    with pytest.raises(ValueError, match=r"lacks column\(s\) problem='question'"):
        train(_cfg(assets, tmp_path / "bad", problem_column="question"))
    assert (
        main(
            [
                "--model",
                assets["model"],
                "--dataset",
                assets["data"],
                "--problem-column",
                "question",
                "--out-dir",
                str(tmp_path / "bad2"),
                "--no-progress",
                "--no-tensorboard",
            ]
        )
        == 2
    )


def test_undecodable_image_is_skipped_and_counted(assets, tmp_path):
    import datasets

    recs = make_count_records(12, seed=9)
    rows = []
    for i, r in enumerate(recs):
        buf = io.BytesIO()
        r["image"].save(buf, format="PNG")
        rows.append({**r, "image": {"bytes": b"not an image" if i % 3 == 0 else buf.getvalue(), "path": None}})
    path = tmp_path / "broken"
    os.makedirs(path)
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path / "train.parquet"))
    out = train(_cfg({**assets, "data": str(path)}, tmp_path / "run", steps=1, sft_steps=2, sft_batch_size=4))
    assert out["skipped_images"] >= 1


def test_model_without_image_tokens_is_refused(assets):
    from types import SimpleNamespace

    from pgpo_train.models.model_family import check_processor
    from pgpo_train.models.processor import load_processor

    processor = load_processor(assets["model"])
    with pytest.raises(ValueError, match="no image tokens"):
        check_processor(SimpleNamespace(config=SimpleNamespace()), processor)


def test_fused_token_stats_path_matches_unfused(assets, tmp_path, monkeypatch):
    """The loop's token_stats old-log-prob/KL path (one read of each logit tensor) gives the unfused results."""
    from pgpo_train.models import policy
    from pgpo_train.step import sampling
    from pgpo_train.step import scoring

    for estimator in ("full", "k3"):
        cfg = _cfg(assets, tmp_path / estimator, steps=1, sft_steps=0).resolved()
        cfg.pgpo.estimator = estimator
        model, processor = policy.load_policy(cfg, torch.device("cpu"))
        records = make_count_records(2, seed=4)
        batch, _ = sampling.rollout(model, processor, records, cfg, torch.device("cpu"), {})
        batch.pop("texts")
        fused = scoring.old_logp_and_scores(model, batch, cfg, {})
        monkeypatch.setenv("PGPO_NO_TOKEN_STATS", "1")
        plain = scoring.old_logp_and_scores(model, batch, cfg, {})
        monkeypatch.delenv("PGPO_NO_TOKEN_STATS")
        m = batch["response_mask"].bool()
        for key in ("old_logp", "entropy", "scores"):
            assert torch.allclose(fused[key][m], plain[key][m], atol=1e-4, rtol=1e-4), (estimator, key)


# %% controls, variants and the grid-reason task, one short step each


@pytest.mark.parametrize(
    "over", [{"control": "shuffled"}, {"control": "inverted"}, {"tau_mode": "quantile", "floor": 0.1}]
)
def test_one_step_with_each_control_and_variant(assets, tmp_path, over):
    cfg = _cfg(assets, tmp_path / "v", steps=1, sft_steps=0, dynamic_sampling="off", lr=1e-2)
    for k, v in over.items():
        setattr(cfg.pgpo, k, v)
    train(cfg)
    rl = _rl_lines(tmp_path / "v")[-1]
    assert rl["adv/mean_abs"] > 0, "test needs non-zero advantages"
    for key in ("pgpo/weight_gini", "pgpo/eff_token_ratio", "pgpo/top1_mass", "pgpo/top10_mass", "pgpo/weight_max"):
        assert key in rl and math.isfinite(rl[key]), key
    assert rl["pgpo/weight_mean"] == pytest.approx(1.0, abs=1e-4)  # renormalized: every variant keeps the mass
    assert 0 <= rl["pgpo/weight_gini"] < 1 and 0 < rl["pgpo/eff_token_ratio"] <= 1 + 1e-6
    assert 0 < rl["pgpo/top1_mass"] <= rl["pgpo/top10_mass"] <= 1


def test_shuffled_control_resumes_exactly(assets, tmp_path):
    def cfg(out, steps, **kw):
        c = _cfg(assets, tmp_path / out, steps=steps, sft_steps=0, dynamic_sampling="off", lr=1e-2, **kw)
        c.pgpo.control = "shuffled"
        return c

    full = train(cfg("full", 2))
    train(cfg("cut", 1))
    resumed = train(cfg("cut", 2, resume=True))
    a, b = _params(full["model"]), _params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grid_reason_end_to_end(tmp_path, monkeypatch):
    """The embedded grid-reason task with a little filler: SFT, one PGPO step and an eval run and log."""
    monkeypatch.setenv("PGPO_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(
        task="grid-reason",
        task_filler=4,
        out_dir=str(tmp_path / "gr"),
        steps=1,
        sft_steps=3,
        sft_batch_size=4,
        prompts_per_step=2,
        mini_batch_size=8,
        eval_every=1,
        eval_size=4,
        tensorboard=False,
        progress=False,
        save_every=0,
        dynamic_sampling="off",
    )
    out = train(cfg)
    lines = _lines(tmp_path / "gr")
    assert [x["phase"] for x in lines] == ["sft"] * 3 + ["rl"]
    assert out["steps"] == 4 and "eval/acc" in lines[-1] and "pgpo/eff_token_ratio" in lines[-1]
    assert lines[-1]["response/length_max"] <= 42  # grid_reason_max_tokens(4)
