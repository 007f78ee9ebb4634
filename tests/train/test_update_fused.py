"""With --pgpo.fused-lm-head on, every pass of a step (old log-probs, text-only, policy update, SFT warm-up)
goes through hidden states + pgpo_kernels' fused lm_head, and the run is the logits path's: same metrics to 1e-5
(fp32 tiny model) and the same parameters, for grpo, dapo and pgpo, in one process and under torchrun (gloo, 2
ranks). With it on, the logits builder is never called outside generation."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_distributed import _cfg
from test_distributed import _full_params
from test_distributed import _patched_rollout
from test_distributed import _spawn

from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models import policy
from pgpo_train.recipe import train as train_mod
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig
from pgpo_train.step import sampling
from pgpo_train.step import scoring
from pgpo_train.step import update

ALGOS = ("grpo", "dapo", "pgpo")
# keys that measure the machine, not the run
_SKIP = ("timing/", "perf/", "time", "pgpo/fused_lm_head")


def _lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _same_metrics(a: list[dict], b: list[dict]) -> int:
    assert len(a) == len(b) and a
    n = 0
    for la, lb in zip(a, b):
        for k, v in la.items():
            if k.startswith(_SKIP) or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            assert k in lb, k
            assert math.isclose(lb[k], v, rel_tol=1e-5, abs_tol=1e-5), (k, v, lb[k])
            n += 1
    return n


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return save_count_dataset(tmp_path_factory.mktemp("data") / "count", n_train=64, n_test=8, seed=0)


def _run_cfg(data, out, algo, fused, **kw):
    return _cfg(data, out, algo=algo, steps=2, sft_steps=1, sft_batch_size=4, sft_lr=1e-3, max_refill=0, seed=3,
                save_every=0, pgpo=PGPOWeightsConfig(fused_lm_head=fused, backend="torch"), **kw)


def _train(cfg: dict, monkeypatch, forbid_logits: bool):
    monkeypatch.setattr(sampling, "rollout", _patched_rollout("inject"))
    if forbid_logits:
        def no_logits(*a, **k):
            raise AssertionError("a pass built [mb, T, V] logits with the fused lm head on")
        for mod in (policy, scoring, update):  # every module that imports the logits builder
            monkeypatch.setattr(mod, "response_logits", no_logits)
    return _full_params(train_mod.train(TrainConfig(**cfg))["model"])


@pytest.mark.parametrize("algo", ALGOS)
def test_fused_lm_head_run_equals_logits_run(data, tmp_path, monkeypatch, algo):
    off = _train(_run_cfg(data, tmp_path / "off", algo, "off"), monkeypatch, forbid_logits=False)
    on = _train(_run_cfg(data, tmp_path / "on", algo, "on"), monkeypatch, forbid_logits=True)
    l_off, l_on = _lines(tmp_path / "off"), _lines(tmp_path / "on")
    assert [x.get("phase") for x in l_on] == [x.get("phase") for x in l_off]
    assert {"sft", "rl"} <= {x.get("phase") for x in l_on}
    assert all(x["pgpo/fused_lm_head"] == 1.0 for x in l_on if x.get("phase") == "rl")
    assert all(x["pgpo/fused_lm_head"] == 0.0 for x in l_off if x.get("phase") == "rl")
    assert _same_metrics(l_off, l_on) > 10
    assert any("actor/loss" in x for x in l_on)
    assert _max_diff(on, off) < 1e-5


def test_fused_lm_head_two_ranks_equal_logits_two_ranks(data, tmp_path):
    jobs = []
    for algo in ALGOS:
        for fused in ("off", "on"):
            cfg = _run_cfg(data, tmp_path / f"{algo}-{fused}", algo, fused)
            jobs.append({"cfg": cfg, "answers": "inject", "dump": str(tmp_path / f"{algo}-{fused}.pt")})
    _spawn(jobs)
    for algo in ALGOS:
        l_off, l_on = _lines(tmp_path / f"{algo}-off"), _lines(tmp_path / f"{algo}-on")
        assert _same_metrics(l_off, l_on) > 10
        assert all(x["pgpo/fused_lm_head"] == 1.0 for x in l_on if x.get("phase") == "rl")
        on, off = torch.load(tmp_path / f"{algo}-on.pt"), torch.load(tmp_path / f"{algo}-off.pt")
        assert _max_diff(on, off) < 1e-5, algo
