"""DAPO's dynamic sampling with refill (Yu et al. 2025, sec. 3.2 and Algorithm 1): groups whose G rewards are all
equal carry no advantage and are dropped; more prompts are sampled until the batch again holds the requested number
of groups, or a cap on extra rounds is reached. Without refill (max_refill = 0) the batch simply shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pgpo_train.rl import core_algos


def refill_groups(
    sample_round: Callable[[int], dict],
    n_groups: int,
    group_size: int,
    max_refill: int,
    dynamic_sampling: bool = True,
    dp=None,
) -> tuple[list[dict], dict]:
    """Samples rounds of prompts until n_groups groups with unequal rewards are kept, or max_refill extra rounds ran.

    Args:
        sample_round: n_prompts -> a rollout batch with "rewards" [n_prompts * G] (each prompt's G responses
            adjacent); called with n_groups first, then with the refill sizes.
        n_groups: groups wanted (prompts_per_step).
        max_refill: cap on extra rounds (0: no refill: the first round's kept groups, as before refill existed).
        dynamic_sampling: False keeps every group (GRPO) and never refills.
        dp: torchrun (pgpo_train.run.distributed): sample_round(n) samples this rank's share of n prompts; the counts
            below are global (gathered) and a round's surplus groups are dropped from the last ranks' last groups.

    Returns:
        (rounds, metrics): rounds is a list of (batch, keep [rows] bool) pairs as dicts {"batch", "keep"}, whose kept
        groups total at most n_groups (the last round's surplus groups are dropped, as DAPO truncates); metrics holds
        data/kept_frac (kept / sampled groups over all rounds), data/groups (groups used), data/refill_rounds.
    """
    rounds: list[dict] = []
    kept_total, sampled_total, n_prompts = 0, 0, n_groups
    while True:
        batch = sample_round(n_prompts)
        rewards = batch["rewards"]
        if dynamic_sampling:
            keep = core_algos.dynamic_sampling_keep(rewards, group_size)  # [rows]
        else:
            keep = torch.ones_like(rewards, dtype=torch.bool)
        groups = keep.view(-1, group_size)[:, 0]  # [prompts]
        n_kept = int(groups.sum())  # host sync: one per round, it decides whether to sample again
        room = n_groups - kept_total
        mine, before, n_sampled = n_kept, 0, len(groups)
        if dp is not None and dp.world > 1:  # torchrun: every rank's counts, in rank order
            counts = dp.gather_objects((n_kept, len(groups)))
            before = sum(k for k, _ in counts[: dp.rank])
            n_kept, n_sampled = sum(k for k, _ in counts), sum(n for _, n in counts)
        if n_kept > room:  # drop the surplus groups (the last ones kept), as DAPO truncates to the batch size
            allowed = max(0, min(mine, room - before))  # one process: room
            last = groups.nonzero().squeeze(-1)[allowed:]
            groups = groups.clone()
            groups[last] = False
            keep = groups.repeat_interleave(group_size)
            n_kept = room
        rounds.append({"batch": batch, "keep": keep})
        kept_total += n_kept
        sampled_total += n_sampled
        missing = n_groups - kept_total
        if not dynamic_sampling or missing == 0 or len(rounds) > max_refill:
            break
        # our choice: sample about as many prompts as the keep rate so far says will fill the batch (at least the
        # missing count, at most a full step's prompts), not a full batch every round as verl's DAPO recipe does
        rate = max(kept_total / sampled_total, 1.0 / n_groups)
        n_prompts = min(n_groups, max(missing, math.ceil(missing / rate)))
        if dp is not None and dp.world > 1:  # whole prompts per rank (n_groups already splits over the ranks)
            n_prompts = min(n_groups, math.ceil(n_prompts / dp.world) * dp.world)
    return rounds, {
        "data/kept_frac": kept_total / sampled_total,
        "data/groups": float(kept_total),
        "data/refill_rounds": float(len(rounds) - 1),
    }
