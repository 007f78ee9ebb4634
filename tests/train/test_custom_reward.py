"""--reward module:function: per-sample and batched user rewards, checked at start-up (one error naming --reward when
the function cannot be imported, is not callable, raises or returns a non-number on a probe), used by the rollouts,
the in-run eval and `pgpo-train eval`."""

import json
import textwrap

import pytest

from pgpo_train.cli import main
from pgpo_train.data.rewards import Reward
from pgpo_train.data.tasks import save_count_dataset

REWARDS = textwrap.dedent(
    """
    def quarter(response, record):
        return 0.25

    def by_answer(response, record):
        return {"score": 1.0 if record["answer"] in response else 0.0, "format": 0.5}

    def batched(responses, records):
        return [float(len(r) > 3) for r in responses]

    def short_batch(responses, records):
        return [1.0]

    def raises(response, record):
        raise KeyError("category")

    def text(response, record):
        return "1.0"

    def nan(response, record):
        return float("nan")

    def one_arg(response):
        return 1.0

    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return str(path)


def test_per_sample_batched_and_dict_rewards(rewards_file, tmp_path, monkeypatch):
    recs = [{"answer": "7", "problem": "p"}, {"answer": "2", "problem": "p"}]
    assert [s["score"] for s in Reward(f"{rewards_file}:quarter")(["a", "b"], recs)] == [0.25, 0.25]
    out = Reward(f"{rewards_file}:by_answer")(["\\boxed{7}", "\\boxed{7}"], recs)
    assert [(s["score"], s["acc"], s["format"]) for s in out] == [(1.0, 1.0, 0.5), (0.0, 0.0, 0.5)]
    batched = Reward(f"{rewards_file}:batched")
    assert batched.batched and [s["score"] for s in batched(["abcd", "ab"], recs)] == [1.0, 0.0]
    monkeypatch.chdir(tmp_path)  # module:function resolves beside the run, as `python -m` would
    assert Reward("my_rewards:quarter")(["x"], recs[:1])[0]["score"] == 0.25
    default = Reward("")(["<think>a</think>\\boxed{7}"], recs[:1])[0]
    assert default == {"score": 1.0, "acc": 1.0, "format": 1.0}


@pytest.mark.parametrize(
    "fn, words",
    [
        ("nosuchmodule_xyz:f", "cannot import nosuchmodule_xyz"),
        ("FILE:missing", "has no attribute 'missing'"),
        ("FILE:NOT_CALLABLE", "is a int, not a function"),
        ("FILE:one_arg", "must take (response, record)"),
        ("FILE:raises", "raised KeyError: 'category' on a probe response"),
        ("FILE:text", "returned score = '1.0' (str), not a finite number"),
        ("FILE:nan", "not a finite number"),
        ("FILE:short_batch", "must return a list of 1 values, got 1 values"),
        ("no_colon", "must be module:function"),
    ],
)
def test_bad_reward_is_one_error_before_the_model_loads(rewards_file, tmp_path, capsys, monkeypatch, fn, words):
    if fn == "FILE:short_batch":  # the probe scores one response: a batch of 1 is the right length there
        with pytest.raises(ValueError, match="must return a list of 2 values, got 1 values"):
            Reward(f"{rewards_file}:short_batch")(["a", "b"], [{}, {}])
        return
    import pgpo_train.recipe.train

    monkeypatch.setattr(pgpo_train.recipe.train, "load_policy", lambda *a, **k: pytest.fail("the model must not load"))
    data = save_count_dataset(tmp_path / "count", n_train=8, n_test=4, seed=0)
    spec = fn.replace("FILE", rewards_file)
    capsys.readouterr()
    code = main(["--dataset", data, "--prompt-template", "tiny", "--sft-steps", "0", "--reward", spec,
                 "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # datasets' progress lines come before it
    assert err.count("pgpo-train: error") == 1 and last.startswith("pgpo-train: error: --reward") and words in last


def test_the_loop_and_eval_use_the_reward(rewards_file, tmp_path):
    data = save_count_dataset(tmp_path / "count", n_train=16, n_test=4, seed=0)
    run = tmp_path / "run"
    assert main(["--dataset", data, "--prompt-template", "tiny", "--sft-steps", "0", "--steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "1",
                 "--eval-size", "2", "--reward", f"{rewards_file}:quarter", "--out-dir", str(run), "--no-progress",
                 "--no-tensorboard"]) == 0
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["reward/mean"] == 0.25 and line["reward/acc"] == 0.25 and line["eval/reward"] == 0.25
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--k", "2", "--out", str(out), "--no-progress"]) == 0  # the run's reward
    summary = json.loads((out / "summary.json").read_text())
    assert summary["avg@2"] == 0.25 and summary["greedy/acc"] == 0.25 and summary["pass@2"] == 0.0  # 0.25 < 0.5: none right
    assert main(["eval", str(run), "--k", "0", "--reward", "", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["greedy/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
