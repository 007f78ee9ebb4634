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


# %% custom verifiable rewards (--reward module:function)


def _as_score(value, where: str, response: str) -> dict:
    """A reward function's return value -> {"score", "acc", "format"}: a number is the score (and the accuracy the
    logs report); a dict needs "score" and may give "acc" / "format"; the format falls back to format_reward."""
    import math
    import numbers

    parts = value if isinstance(value, dict) else {"score": value}
    if "score" not in parts:
        raise ValueError(f"{where} returned a dict without 'score': {sorted(parts)}")
    out = {}
    for key in ("score", "acc", "format"):
        v = parts.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{where} returned {key} = {v!r} ({type(v).__name__}), not a finite number")
        out[key] = float(v)
    out.setdefault("acc", out["score"])
    out.setdefault("format", format_reward(response))
    return out


class Reward:
    """The step's verifiable reward over a batch: the paper's (compute_score) or a user function.

    A user function is either per sample, fn(response: str, record: dict) -> float | dict, or batched,
    fn(responses: list[str], records: list[dict]) -> list (its first parameter is named `responses`). A record holds
    "problem", "answer" and "image" (PIL). Values: a number (the score), or {"score": ..., "acc": ..., "format": ...}.
    """

    def __init__(self, spec: str = "", acc_weight: float = 0.9, format_weight: float = 0.1):
        self.spec, self.acc_weight, self.format_weight = spec, acc_weight, format_weight
        self.fn, self.batched = (load_reward_fn(spec) if spec else (None, False))

    def __call__(self, responses: list[str], records: list[dict]) -> list[dict]:
        if self.fn is None:
            return [compute_score(t, r["answer"], self.acc_weight, self.format_weight) for t, r in zip(responses, records)]
        where = f"--reward {self.spec}"
        if self.batched:
            values = self.fn(list(responses), list(records))
            if not isinstance(values, (list, tuple)) or len(values) != len(responses):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise ValueError(f"{where} (batched) must return a list of {len(responses)} values, got {got}")
        else:
            values = [self.fn(t, r) for t, r in zip(responses, records)]
        return [_as_score(v, where, t) for v, t in zip(values, responses)]

    def probe(self, record: dict) -> None:
        """Start-up check on one real record and a well-formed response: ValueError naming --reward when the
        function raises or returns something other than a number."""
        if self.fn is None:
            return
        response = f"<think>probe</think>\\boxed{{{record.get('answer', '')}}}"
        try:
            self([response], [record])
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure of user code is reported as one line naming the flag
            raise ValueError(f"--reward {self.spec} raised {type(e).__name__}: {e} on a probe response") from e


def load_reward_fn(spec: str):
    """(function, batched) of "module:function" or "path/to/file.py:function"; ValueError naming --reward when it
    cannot be imported, lacks the function, or is not callable."""
    import importlib
    import importlib.util
    import inspect
    import os
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward must be module:function or path/to/file.py:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ValueError(f"--reward {spec}: no file {module_name}")
            mod_spec = importlib.util.spec_from_file_location(f"pgpo_reward_{abs(hash(module_name))}", module_name)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a module beside the run, as `python -m` would find it
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- import errors of user code: one line naming the flag
        raise ValueError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from e
    if not hasattr(module, attr):
        raise ValueError(f"--reward {spec}: {module_name} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {attr} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: taken as per-sample
        return fn, False
    params = sig.parameters.values()
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(pos) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ValueError(f"--reward {spec}: {attr} must take (response, record) or (responses, records)")
    return fn, bool(pos) and pos[0].name == "responses"
