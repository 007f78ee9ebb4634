"""pgpo_bench.paired_runs: the one script behind the paired RL studies under benchmarks/results/."""

import json

import pytest

from pgpo_bench import paired_runs


def test_unknown_variant_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        paired_runs.main(["--out", str(tmp_path), "--variants", "dapo,pgpo-nope"])
    assert "pgpo-nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_seed_dirs_keep_the_committed_studies_names():
    assert paired_runs.seed_dir("o", "grid-count", 0, 3) == "o/grid-count-s3"
    assert paired_runs.seed_dir("o", "grid-reason", 24, 0) == "o/grid-reason-f24-s0"


def test_variants_share_one_warm_up_and_differ_only_in_their_options(tmp_path):
    """Two variants from one warm-up: each run's config says the same model, data, seed, lr and steps."""
    paired_runs.main(["--task", "count-copy", "--seed", "1", "--out", str(tmp_path), "--variants",
                      "dapo,pgpo-shuffled", "--rl-steps", "1", "--eval-every", "0", "--sft-steps", "2",
                      "--sft-stop-acc", "0"])
    base = tmp_path / "count-copy-s1"
    assert (base / "sft-model" / "config.json").exists()
    cfgs = {v: json.loads((base / v / "config.json").read_text()) for v in ("dapo", "pgpo-shuffled")}
    for key in ("model", "dataset", "seed", "lr", "steps", "max_new_tokens", "prompt_template"):
        assert cfgs["dapo"][key] == cfgs["pgpo-shuffled"][key], key
    assert cfgs["dapo"]["model"] == str(base / "sft-model") and cfgs["dapo"]["sft_steps"] == 0
    assert (cfgs["dapo"]["algo"], cfgs["pgpo-shuffled"]["pgpo"]["control"]) == ("dapo", "shuffled")
    assert all((base / v / "summary.json").exists() for v in cfgs)


def test_fair_comparison_options(tmp_path):
    """variant@lr, --text-prob, --eval-split validation (a third split), the dev preset, the clip-off reference and
    the role table: what benchmarks/results/train_fair/run.sh asks of the script."""
    paired_runs.main(["--task", "count-copy", "--seed", "1", "--out", str(tmp_path), "--variants",
                      "dapo-noclip@3e-4,pgpo-dev@1e-4", "--rl-steps", "1", "--eval-every", "1", "--eval-size", "2",
                      "--sft-steps", "2", "--sft-stop-acc", "0", "--text-prob", "0.5", "--eval-split", "validation",
                      "--roles", "1"])
    base = tmp_path / "count-copy-p0.5-s1"
    assert json.loads((base / "sft" / "config.json").read_text())["sft_text_only_prob"] == 0.5
    assert "roles" in json.loads((base / "roles.json").read_text())
    noclip = json.loads((base / "validation" / "dapo-noclip-lr3e-4" / "config.json").read_text())
    dev = json.loads((base / "validation" / "pgpo-dev-lr1e-4" / "config.json").read_text())
    assert (noclip["algo"], noclip["lr"], noclip["grad_clip"], noclip["eval_split"]) == ("dapo", 3e-4, 0.0,
                                                                                        "validation")
    assert (dev["lr"], dev["grad_clip"], dev["pgpo"]["estimator"], dev["pgpo"]["k3_score_max"]) == (1e-4, 1.0, "k3",
                                                                                                     10.0)
    assert (tmp_path / "data" / "count-copy-with-validation" / "validation.parquet").exists()
    assert noclip["dataset"] == dev["dataset"] == str(tmp_path / "data" / "count-copy-with-validation")
