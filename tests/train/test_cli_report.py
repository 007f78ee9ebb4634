"""What a newcomer reads matches what happens: --help documents every option with its default, the run's last lines
say what was learned (eval accuracy after the warm-up and at the end, +- SE), curves.png is written into the run
dir, `plot` on a non-run dir is a one-line error; and the --pgpo.min-spread guard."""

import json
import math

import pytest
import torch

from pgpo_train.cli import _train_parser
from pgpo_train.cli import learned_lines
from pgpo_train.cli import main
from pgpo_train.rl import core_algos
from pgpo_train.run.config import TrainConfig


def test_every_train_option_has_help_and_default():
    parser = _train_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        text = parser.formatter_class(prog="x")._get_help_string(action)
        assert "%(default)" in text or "(default: auto)" in text, action.option_strings


def test_help_text_lives_in_the_fields_metadata_and_auto_is_none():
    """Each config field carries its help (no comment parsing); every 'auto' default is None and reads 'auto'."""
    import dataclasses

    from pgpo_train.run.config import LoraOptions
    from pgpo_train.run.config import PGPOWeightsConfig
    from pgpo_train.run.config import TrainConfig

    for cls in (TrainConfig, PGPOWeightsConfig, LoraOptions):
        for f in dataclasses.fields(cls):
            if f.name != "pgpo":
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help metadata"
            if f.default is None:
                assert "auto" in f.metadata["help"], f"{f.name}: a None default must say what auto means"
    ns = _train_parser().parse_args(["--lr", "auto", "--sft-steps", "5", "--threads", "auto"])
    assert (ns.lr, ns.sft_steps, ns.threads) == (None, 5, None)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for line in ("plot RUN_DIR...", "inspect --run RUN_DIR", "--task"):
        assert line in out, line


def test_plot_on_a_non_run_dir_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a pgpo-train run directory" in err


def test_learned_lines_report_both_evals_with_se():
    s = {
        "rl_steps": 60,
        "eval/n": 256,
        "eval/acc_sft": 0.5,
        "eval/acc_sft_se": math.sqrt(0.25 / 256),
        "eval/acc_final": 0.75,
        "eval/acc_final_se": math.sqrt(0.75 * 0.25 / 256),
    }
    (line,) = learned_lines(s)
    assert "0.500 +- 0.031 after the warm-up -> 0.750 +- 0.027 after RL (+0.250)" in line
    assert "256 prompts" in line


def test_eval_summary_reads_the_log(tmp_path):
    from pgpo_train.run.run_log import eval_summary

    rows = [
        {"step": 5, "phase": "sft", "eval/acc": 0.25},
        {"step": 6, "phase": "rl"},
        {"step": 10, "phase": "rl", "eval/acc": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = eval_summary(str(tmp_path / "metrics.jsonl"), 5, 16)
    assert s["eval/acc_sft"] == 0.25 and s["eval/acc_final"] == 0.5
    assert s["eval/acc_sft_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 16))
    assert eval_summary(str(tmp_path / "metrics.jsonl"), 5, 0) == {}


def _cfg(min_spread):
    c = TrainConfig()
    c.pgpo.min_spread = min_spread
    return c


def pgpo_weights(scores, mask, cfg):
    return core_algos.pgpo_weights(scores, mask, **cfg.pgpo.weight_kwargs())


def test_min_spread_uniform_weights_on_flat_sequences():
    from pgpo_train.rl.core_algos import flat_sequences

    scores = torch.tensor(
        [
            [0.0, 0.01, 0.02, 0.0],  # log1p spread ~0.0198: flat under 0.05
            [0.0, 2.0, 0.1, 0.0],  # spread log1p(2) = 1.10: kept
            [0.5, 0.5, 9.0, 0.51],  # the 9.0 is masked out: spread over the valid ones ~0.0066: flat
            [0.0, float("inf"), 0.0, 0.0],  # +inf: an infinite spread, never flat
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]])
    assert flat_sequences(scores, mask, 0.05).tolist() == [True, False, True, False]
    paper = pgpo_weights(scores, mask, _cfg(0.0))
    guarded = pgpo_weights(scores, mask, _cfg(0.05))
    assert torch.equal(guarded[0], torch.ones(4)) and torch.equal(guarded[2], mask[2].float())
    assert torch.equal(guarded[1], paper[1]) and torch.equal(guarded[3], paper[3])
    assert not torch.equal(paper[0], torch.ones(4))  # without the guard the noise is stretched to full weights
    assert torch.equal(pgpo_weights(scores, mask, _cfg(1e9)), mask.float().where(~scores.isinf().any(-1, True), paper))


def test_cli_run_reports_learning_writes_png_and_stops_sft_early(tmp_path, monkeypatch, capsys):
    """End to end through `pgpo-train`: the warm-up stops once its exact-match probe reaches --sft-stop-acc (forced
    here), the last lines give both evals with their SE, and RUN_DIR/curves.png exists."""
    from pgpo_train.data.tasks import save_count_dataset
    from pgpo_train.models.tiny import save_tiny_checkpoint
    from pgpo_train.recipe import train as train_mod

    real = train_mod.sft_step
    monkeypatch.setattr(train_mod, "sft_step", lambda *a, **k: {**real(*a, **k), "sft/seq_acc": 1.0})
    model = save_tiny_checkpoint(tmp_path / "m", seed=0)
    data = save_count_dataset(tmp_path / "d", n_train=16, n_test=4, seed=0)
    out = tmp_path / "run"
    argv = ["--model", model, "--dataset", data, "--prompt-template", "tiny", "--out-dir", str(out), "--steps", "1"]
    argv += ["--sft-steps", "10", "--sft-stop-acc", "0.5", "--sft-batch-size", "2", "--prompts-per-step", "2"]
    argv += ["--max-new-tokens", "8", "--eval-every", "1", "--eval-size", "4", "--no-progress", "--no-tensorboard"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 SFT warm-up steps + 1 PGPO steps" in text
    assert "eval accuracy (greedy, 4 prompts):" in text and "after the warm-up ->" in text and "after RL" in text
    assert (out / "curves.png").stat().st_size > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["sft", "sft", "sft", "rl"] and "eval/acc" in lines[2]
