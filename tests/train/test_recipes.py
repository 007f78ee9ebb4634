"""Config files and recipes: `pgpo-train --config FILE` (command-line flags win), one clear error per bad file, the
run's config.yaml repeating it, the recipes/ files (every number sourced), and the tiny recipe end to end:
train -> export -> eval."""

import dataclasses
import json
import os
import pathlib
import re

import pytest
import torch
import yaml

from pgpo_train.cli import main
from pgpo_train.cli import parse_train_argv
from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.config_file import config_yaml
from pgpo_train.run.config_file import read_config_file

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "recipes"


def _write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_values_and_command_line_override(tmp_path):
    path = _write(tmp_path, "algo: dapo\nsteps: 7\nlr: 1e-6\nmax-new-tokens: 12\npgpo:\n  tau: 0.3\npgpo.beta: 1\n")
    cfg = parse_train_argv(["--config", path, "--steps", "3"])
    assert (cfg.algo, cfg.steps, cfg.lr, cfg.max_new_tokens) == ("dapo", 3, 1e-6, 12)
    assert (cfg.pgpo.tau, cfg.pgpo.beta) == (0.3, 1.0) and isinstance(cfg.pgpo.beta, float)
    assert parse_train_argv([f"--config={path}", "--pgpo.tau", "0.5"]).pgpo.tau == 0.5


@pytest.mark.parametrize(
    "text, words",
    [
        ("stepz: 3\n", ["unknown key 'stepz'", "did you mean 'steps'"]),
        ("pgpo:\n  taux: 0.1\n", ["unknown key 'pgpo.taux'"]),
        ("steps: many\n", ["steps must be int", "'many'"]),
        ("lr: fast\n", ["lr must be a number"]),
        ("algo: ppo\n", ["algo must be one of grpo, dapo, pgpo"]),
        ("- steps\n", ["must be a mapping"]),
        ("steps: [1\n", ["not valid YAML"]),
    ],
)
def test_bad_config_file_is_one_error_naming_the_key_and_file(tmp_path, capsys, text, words):
    path = _write(tmp_path, text)
    assert main(["--config", path, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--config {path}" in err
    for w in words:
        assert w in err
    assert not os.path.exists(tmp_path / "run"), "nothing ran"


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_config_yaml_round_trips_a_resolved_config(tmp_path):
    cfg = TrainConfig(algo="dapo", lr=3e-5, out_dir=str(tmp_path / "r"), steps=5).resolved()
    path = _write(tmp_path, config_yaml(cfg))
    again = parse_train_argv(["--config", path, "--out-dir", cfg.out_dir])
    assert again.resolved() == cfg


def test_recipes_parse_resolve_and_source_every_number(tmp_path):
    files = sorted(RECIPES.glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny.yaml", "qwen2.5-vl-3b-virl39k.yaml", "qwen2.5-vl-7b-virl39k.yaml"}
    for f in files:
        values = read_config_file(str(f))
        assert values, f
        cfg = parse_train_argv(["--config", str(f), "--out-dir", str(tmp_path / f.stem)]).resolved()
        for line in f.read_text().splitlines():
            m = re.match(r"\s*([\w.-]+):\s*([^#]*?)\s*(#.*)?$", line)
            if not m or not m.group(2) or line.lstrip().startswith("#"):
                continue
            assert m.group(3), f"{f.name}: {line!r} says nowhere where its value comes from"
            if re.fullmatch(r"[-+0-9.e]+", m.group(2)):
                assert re.search(r"paper|EasyR1|our choice", m.group(3)), f"{f.name}: {line!r}"
        if f.stem.startswith("qwen"):  # the paper's recipe (docs/method.md#11-the-papers-recipe)
            assert (cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, cfg.lr) == (384, 5, 2048, 1e-6)
            assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.top_p, cfg.steps) == (0.2, 0.28, 0.99, 200)
            assert (cfg.acc_weight, cfg.format_weight, cfg.dynamic_sampling) == (0.9, 0.1, "on")
            assert (cfg.image_column, cfg.problem_column, cfg.answer_column) == ("images", "problem", "answer")


def test_recipe_whose_dataset_lacks_a_column_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = save_count_dataset(tmp_path / "count", n_train=16, n_test=4, seed=0)
    path = _write(tmp_path, f"dataset: {data}\nimage_column: images\nsft_steps: 0\n")
    import pgpo_train.recipe.train

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pgpo_train.recipe.train, "load_policy", no_model)
    assert main(["--config", path, "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s) image='images'" in err and "available:" in err


# %% the tiny recipe, end to end


def test_tiny_recipe_train_export_eval(tmp_path, capsys):
    """The tiny recipe with CI-sized steps (flags override the file): train, the final model folder, an earlier
    checkpoint exported, both evaluated with pgpo-train eval; the run's config.yaml repeats the run's settings."""
    run = tmp_path / "tiny"
    small = ["--sft-steps", "6", "--sft-stop-acc", "0", "--sft-batch-size", "8", "--steps", "2",
             "--prompts-per-step", "4", "--eval-every", "0", "--save-every", "1", "--no-progress",
             "--no-tensorboard", "--export-checkpoints"]
    assert main(["--config", str(RECIPES / "tiny.yaml"), "--out-dir", str(run), *small]) == 0
    assert "model folder" in capsys.readouterr().out
    assert os.path.isfile(run / "model" / "model.safetensors")
    # --export-checkpoints: a folder beside every checkpoint (save-every 1: 6 warm-up + 2 RL steps), kept after
    # --keep-checkpoints (4) rotated the checkpoints themselves away
    assert sorted(os.listdir(run / "models")) == [f"step-{i:08d}" for i in range(1, 9)]
    assert len(os.listdir(run / "checkpoints")) == 4 + 1  # 4 kept + the `latest` pointer
    from safetensors.torch import load_file

    in_run = load_file(run / "models" / "step-00000008" / "model.safetensors")
    final = load_file(run / "model" / "model.safetensors")
    assert in_run.keys() == final.keys() and all(torch.equal(in_run[k], final[k]) for k in final)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["algo"] == "pgpo" and "out_dir" not in saved
    repeat = parse_train_argv(["--config", str(run / "config.yaml"), "--out-dir", str(run)]).resolved()
    with open(run / "config.json") as f:
        assert json.load(f) == dataclasses.asdict(repeat)

    loop_export = load_file(run / "models" / "step-00000006" / "model.safetensors")
    assert main(["export", str(run), "--step", "6"]) == 0  # the warm-up's last step: the policy before RL
    again = load_file(run / "models" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(loop_export[k], again[k]) for k in again), "the loop's folder = pgpo-train export's"
    before = run / "models" / "step-00000006"
    for target in (before, run):
        out = tmp_path / f"eval-{target.name}"
        assert main(["eval", str(target), "--k", "2", "--max-samples", "6", "--out", str(out), "--no-progress"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
        assert summary["n"] == 6 and len(rows) == 6 * 3
        assert summary["max_new_tokens"] == 24 and summary["prompt_template"] == "tiny", "the run's settings"
        for key in ("greedy/acc", "avg@2", "pass@2"):
            assert 0.0 <= summary[key] <= 1.0
        assert summary["pass@2"] >= summary["avg@2"]
    table = capsys.readouterr().out
    assert "avg@2" in table and "pass@2" in table and "greedy acc" in table
