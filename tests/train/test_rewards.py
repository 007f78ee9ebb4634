"""The verifiable reward: 0.9 x accuracy (math-verify) + 0.1 x format."""

import pytest

from pgpo_train.data.rewards import compute_score
from pgpo_train.data.rewards import format_reward
from pgpo_train.data.rewards import last_boxed


@pytest.mark.parametrize(
    "response, answer, acc, fmt",
    [
        ("<think>red none red blue</think>\\boxed{2}", "2", 1.0, 1.0),  # well-formed, right
        ("<think>two halves</think> so \\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),  # equivalent forms (math-verify)
        ("<think>x</think>\\boxed{3}", "2", 0.0, 1.0),  # well-formed, wrong
        ("\\boxed{2}", "2", 1.0, 0.0),  # right but no <think>
        ("<think>2</think> the answer is 2", "2", 0.0, 0.0),  # no box: no answer
        ("<think>a</think>\\boxed{}", "2", 0.0, 1.0),  # empty box
        ("<think><think>x</think>\\boxed{2}", "2", 1.0, 0.0),  # malformed: two <think>
        ("</think><think>\\boxed{2}", "2", 1.0, 0.0),  # malformed order
        ("<think>a</think>\\boxed{1} then \\boxed{2}", "2", 1.0, 1.0),  # last box counts
        ("<think>a</think>\\boxed{{2}", "2", 0.0, 1.0),  # unbalanced braces: no parsable answer
        ("", "2", 0.0, 0.0),
    ],
)
def test_reward_cases(response, answer, acc, fmt):
    s = compute_score(response, answer)
    assert s["acc"] == acc and s["format"] == fmt
    assert s["score"] == pytest.approx(0.9 * acc + 0.1 * fmt)


def test_last_boxed_nested():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert format_reward("  <think>\nmulti\nline</think>\n\\boxed{x}\n") == 1.0


def test_prompt_drops_image_placeholder_and_uses_paper_template():
    from pgpo_train.data.loading import build_prompt
    from pgpo_train.run.config import PAPER_PROMPT_TEMPLATE

    msgs = build_prompt("<image>Find x.", PAPER_PROMPT_TEMPLATE)
    content = msgs[0]["content"]
    assert content[0] == {"type": "image"}
    assert content[1]["text"].startswith("Find x. You FIRST think") and "<image>" not in content[1]["text"]
    assert "\\boxed{}" in content[1]["text"]


def test_prompt_template_resolves_in_config():
    from pgpo_train.run.config import PAPER_PROMPT_TEMPLATE
    from pgpo_train.run.config import TrainConfig

    assert TrainConfig(out_dir="o").resolved().prompt_template == "tiny"  # the embedded task
    assert TrainConfig(out_dir="o", dataset="d").resolved().prompt_template == PAPER_PROMPT_TEMPLATE
    assert (
        TrainConfig(out_dir="o", model="m", prompt_template="{question}?").resolved().prompt_template == "{question}?"
    )


def test_config_refuses_unknown_choices():
    from pgpo_train.run.config import TrainConfig

    with pytest.raises(ValueError, match="--algo must be grpo, dapo or pgpo"):
        TrainConfig(out_dir="o", algo="ppo").resolved()
    # caught at start-up, not at the first policy update after a rollout
    with pytest.raises(ValueError, match="--loss-agg-mode must be token-mean, seq-mean-token-mean or seq-mean-token"):
        TrainConfig(out_dir="o", loss_agg_mode="seq-sum").resolved()
