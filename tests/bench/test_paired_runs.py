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
