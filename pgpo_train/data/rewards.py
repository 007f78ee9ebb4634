"""Verifiable reward of the paper's recipe (docs/method.md#recipe): 0.9 x accuracy (math-verify) + 0.1 x format."""

from __future__ import annotations

import re

# `<think>...</think>` first, then an answer containing \boxed{...}, nothing required after it.
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>.*\\boxed\{.*\}.*$", re.DOTALL)
BOXED_RE = re.compile(r"\\boxed\{")


def format_reward(response: str) -> float:
    """1.0 when the response is `<think>...</think>` followed by a `\\boxed{}` answer, else 0.0."""
    return 1.0 if FORMAT_RE.match(response) and response.count("<think>") == 1 else 0.0


def last_boxed(response: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    starts = [m.end() for m in BOXED_RE.finditer(response)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(response)):
        if response[j] == "{":
            depth += 1
        elif response[j] == "}":
            depth -= 1
            if depth == 0:
                return response[i:j]
    return None


def accuracy_reward(response: str, answer: str) -> float:
    """1.0 when the last boxed answer equals the ground truth under math-verify, else 0.0.

    Args:
        response: the decoded model response.
        answer: ground truth, plain ("2", "\\frac{1}{2}") or already boxed / in $...$. None or blank scores 0.0: no
            response can match a missing answer (the data layer skips such records; this guards other callers).
    """
    from math_verify import parse
    from math_verify import verify

    if answer is None or not str(answer).strip():
        return 0.0
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        return 0.0
    gold_text = answer if ("\\boxed" in answer or "$" in answer) else f"${answer}$"
    try:
        gold = parse(gold_text)
        guess = parse(f"${pred}$")
        if not gold or not guess:
            return 0.0
        return 1.0 if verify(gold, guess) else 0.0
    except Exception:  # noqa: BLE001 -- math-verify can raise on pathological model text; that is a wrong answer
        return 0.0


def compute_score(response: str, answer: str, acc_weight: float = 0.9, format_weight: float = 0.1) -> dict:
    """The paper's reward: acc_weight * accuracy + format_weight * format.

    Returns:
        {"score": float, "acc": float, "format": float}
    """
    acc = accuracy_reward(response, answer)
    fmt = format_reward(response)
    return {"score": acc_weight * acc + format_weight * fmt, "acc": acc, "format": fmt}
