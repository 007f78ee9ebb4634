"""`pgpo-train eval`: avg@k, pass@k and greedy accuracy counted right (responses whose correctness is known), the
settings a model folder carries, and bad input refused before any work."""

import json
import math

import pytest
import torch

from pgpo_train.cli import main
from pgpo_train.data.tasks import make_count_records
from pgpo_train.models.tiny import build_tiny
from pgpo_train.recipe import evaluation
from pgpo_train.run.config import PAPER_PROMPT_TEMPLATE
from pgpo_train.run.config import TrainConfig


def test_pass_at_k_is_the_unbiased_estimator():
    assert evaluation.pass_at_k(8, 0, 8) == 0.0
    assert evaluation.pass_at_k(8, 1, 8) == 1.0
    assert evaluation.pass_at_k(10, 2, 5) == pytest.approx(1 - math.comb(8, 5) / math.comb(10, 5))
    assert evaluation.pass_at_k(4, 1, 1) == pytest.approx(0.25)


def test_counts_on_responses_of_known_correctness(monkeypatch, tmp_path):
    """Prompt i gets i right samples of k = 4 (i = 0..3) and a right greedy answer when i is even."""
    model, processor = build_tiny()
    records = [{**r, "index": i} for i, r in enumerate(make_count_records(4, seed=1))]
    k = 4
    calls = []

    def generate(model, processor, recs, cfg, n, sample, device):
        calls.append((len(recs), n, sample))
        out = []
        for r in recs:
            right = f"<think>ok</think>\\boxed{{{r['answer']}}}"
            wrong = f"<think>no</think>\\boxed{{{int(r['answer']) + 1}}}"
            if sample:
                out += [right if s < r["index"] else wrong for s in range(n)]
            else:
                out.append(right if r["index"] % 2 == 0 else "no box")
        return out

    monkeypatch.setattr(evaluation, "generate", generate)
    cfg = TrainConfig(prompt_template="tiny").resolved()
    path = tmp_path / "responses.jsonl"
    rows = evaluation.run_eval(model, processor, cfg, records, k, True, torch.device("cpu"), batch_size=8,
                               progress=False, responses_path=str(path))
    assert calls[0] == (2, 1, False) and calls[1] == (2, 4, True), "8 sequences per call: 2 prompts x 4 samples"
    s = evaluation.summarize(rows, k, True)
    assert s["n"] == 4
    assert s["greedy/acc"] == 0.5 and s["greedy/format"] == 0.5
    assert s["avg@4"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert s["pass@4"] == 0.75
    assert s["format@4"] == 1.0
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert written == rows and len(rows) == 4 * 5
    assert {r["extracted"] for r in rows if r["mode"] == "greedy"} == {None, records[0]["answer"], records[2]["answer"]}
    assert "avg@4" in evaluation.table(s, k)


def test_model_folder_without_a_run_config_gets_the_paper_template(tmp_path):
    from pgpo_train.models.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    kind, model_dir, cfg = evaluation.resolve_target(folder)
    assert (kind, model_dir) == ("model", folder)
    a = evaluation.eval_parser().parse_args([folder])
    cfg = evaluation.eval_settings(a, cfg)
    assert cfg.prompt_template == PAPER_PROMPT_TEMPLATE and cfg.max_new_tokens == 2048


@pytest.mark.parametrize(
    "args, words",
    [
        (["--k", "-1"], "--k must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--k", "0", "--no-greedy"], "evaluates nothing"),
    ],
)
def test_bad_flags(tmp_path, capsys, args, words):
    assert main(["eval", str(tmp_path), *args]) == 2
    assert words in capsys.readouterr().err


def test_not_a_model_or_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "neither a model folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err
