"""The trainer stops on a non-finite advantage or PGPO token weight, naming the step, before it reaches the weights.

The kernels answer NaN for a row with a NaN/+inf logit or a NaN/-inf/< -1 score (docs/method.md#nonfinite); an update
with such a token advantage would turn every parameter NaN, silently. One host sync per step, off the hot path.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(FloatingPointError):
    """A non-finite value met by the trainer; the message names the step and where it came from."""


def check_token_advantages(step: int, advantages: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor) -> None:
    """Raises NonFiniteError when a sequence advantage [B] or a valid token advantage [B, T] is NaN/inf.

    Args:
        step: the global step being computed (1-based, as metrics.jsonl numbers it).
        advantages: [B] group-normalized sequence advantages.
        token_adv: [B, T] advantages times the PGPO token weights (grpo/dapo: broadcast).
        mask: [B, T] response mask; padding is not checked.
    """
    bad_seq = ~torch.isfinite(advantages)
    if bad_seq.any():
        raise NonFiniteError(
            f"step {step}: {int(bad_seq.sum())} of {advantages.numel()} sequence advantages are not finite "
            "(a NaN/inf reward); stopping before the update"
        )
    bad_tok = ~torch.isfinite(token_adv) & mask.bool()
    if bad_tok.any():
        rows = bad_tok.any(-1)
        raise NonFiniteError(
            f"step {step}: the PGPO token weights of {int(rows.sum())} of {rows.numel()} responses are not finite "
            f"({int(bad_tok.sum())} tokens; a NaN/inf logit or KL score); stopping before the update"
        )


def check_finite_metrics(step: int, metrics: dict, keys: tuple[str, ...]) -> None:
    """Raises NonFiniteError when a step's loss / gradient norm is NaN/inf: its update made the weights non-finite,
    so the run stops before a checkpoint could save them (the previous checkpoint stays intact)."""
    bad = [f"{k} = {metrics[k]}" for k in keys if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        raise NonFiniteError(f"step {step}: {', '.join(bad)}; stopping before the weights are saved")
