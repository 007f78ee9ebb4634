"""Data parallel training under torchrun: the process group, FSDP2 sharding, and the reductions the RL step needs.

`torchrun --nproc-per-node N -m pgpo_train ...` sets WORLD_SIZE/RANK/LOCAL_RANK; `setup()` then starts the process
group (nccl on CUDA, gloo on CPU) and returns a `Distributed`. Without torchrun (or with one process) it returns
`SINGLE`, whose every method is the identity or today's slicing: one process runs exactly as before.

How the step is split (docs/method.md#rl-step on N ranks):
  - every rank reads the same global record stream and keeps its contiguous share of the step's prompts, so all G
    responses of a prompt are on one rank (group advantages and dynamic sampling need no communication) and the
    data position is the same on every rank (a checkpoint resumes at any world size);
  - rollout, old log-probs, the PGPO text-only pass and the KL run on local rows with the policy unsharded once
    (`full_params`): no all-gather per generated token or per micro-batch;
  - the update: the token-mean loss divides by the global token count of the mini-batch, FSDP sums gradients
    (divide factor 1), so N ranks give the update one process gives on the same global batch. Every rank runs the
    same number of micro-batches (padding with zero-weight forwards) because each forward/backward is a collective.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from contextlib import contextmanager
from contextlib import nullcontext

import torch


class Single:
    """One process: identity reductions; mini/micro-batches exactly as the one-process loop slices them."""

    world, rank, local_rank = 1, 0, 0
    is_writer = True

    def sum(self, x: float) -> float:
        return x

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def check_config(self, cfg) -> None:
        pass

    def shard(self, items: list) -> list:
        return items

    def mini_batches(self, perm: torch.Tensor, size: int) -> list[torch.Tensor]:
        return [perm[i : i + size] for i in range(0, len(perm), size)]

    def micro_batches(self, mini: torch.Tensor, size: int) -> list[torch.Tensor]:
        return [mini[i : i + size] for i in range(0, len(mini), size)]

    def full_params(self, model):
        return nullcontext()

    def merge_metrics(self, metrics: dict, n_resp: float, n_tok: float) -> dict:
        return metrics

    def broadcast_object(self, obj):
        return obj


SINGLE = Single()


def teardown() -> None:
    """Ends the process group setup() started (the CLI, after train())."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_writer_env() -> bool:
    """Rank 0, or no torchrun: the process that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_type: str) -> Single:
    """SINGLE without torchrun (or WORLD_SIZE=1); else starts the process group and returns a Distributed."""
    if world_from_env() <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed()


class Distributed(Single):
    """N ranks of one torchrun job (process group already initialized)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_writer = self.rank == 0
        # gloo reduces CPU tensors, nccl CUDA ones
        self._dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._dev)
        self.dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, x: float) -> float:
        return self._reduce([x], self.dist.ReduceOp.SUM)[0]

    def max(self, x: float) -> float:
        return self._reduce([x], self.dist.ReduceOp.MAX)[0]

    def any(self, flag: bool) -> bool:
        return self.max(float(bool(flag))) > 0

    def barrier(self) -> None:
        self.dist.barrier()

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_config(self, cfg) -> None:
        """Start-up check (before any model loads): the step's prompts and the SFT batch split over the ranks."""
        for flag, n, used in (
            ("--prompts-per-step", cfg.prompts_per_step, cfg.steps > 0),
            ("--sft-batch-size", cfg.sft_batch_size, cfg.sft_steps > 0),
        ):
            if used and n % self.world:
                raise ValueError(f"{flag} {n} does not split over {self.world} ranks: use a multiple of the world size")

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global list (prompts: all G responses of one stay on one rank)."""
        if len(items) % self.world:
            raise ValueError(
                f"{len(items)} prompts/records per step do not split over {self.world} ranks: use a multiple of the "
                f"world size for --prompts-per-step and --sft-batch-size"
            )
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def mini_batches(self, perm: torch.Tensor, size: int) -> list[torch.Tensor]:
        """As many mini-batches on every rank as one process makes of the global rows; each rank splits its own."""
        n_global = int(self.sum(float(len(perm))))
        n_mini = max(1, math.ceil(n_global / size))
        return list(torch.tensor_split(perm, n_mini))

    def micro_batches(self, mini: torch.Tensor, size: int) -> list[torch.Tensor]:
        """This rank's micro-batches, padded with empty ones to the most any rank has (each is a collective)."""
        own = [mini[i : i + size] for i in range(0, len(mini), size)]
        n = int(self.max(float(len(own))))
        return own + [mini[:0]] * (n - len(own))

    @contextmanager
    def full_params(self, model):
        """Unshards every FSDP module once and keeps it so for the block (rollout, old log-probs, eval).

        Without it each forward all-gathers every layer and frees it again: once per generated token."""
        mods = fsdp_modules(model)
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
        for m in mods:
            m.unshard()
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
            for m in mods:  # fully_shard's defaults: the root keeps its params for the backward, the rest reshard
                m.set_reshard_after_forward(m is not model, recurse=False)
            forget_forward_order(mods)

    def merge_metrics(self, metrics: dict, n_resp: float, n_tok: float) -> dict:
        """One step's metrics over all ranks (rank 0's result is the one written). See `merge_rank_metrics`."""
        # 0-d tensors / numpy scalars (adv/mean_abs is one) become floats, as the Logger would write them
        plain = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in metrics.items()}
        return merge_rank_metrics(self.gather_objects((plain, n_resp, n_tok)))


@contextmanager
def on_writer(dp: Single, make_context):
    """Enters make_context() on rank 0 only (the run dir: lock, cleanup, removal on failure) for the block.

    The other ranks wait for it and raise the same error when rank 0 could not enter (a busy run dir, checkpoints
    without --resume), so no rank is left waiting in a collective."""
    with ExitStack() as stack:
        err = None
        if dp.is_writer:
            try:
                stack.enter_context(make_context())
            except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
                err = e
        if dp.world > 1:
            msg = dp.broadcast_object(None if err is None else str(err))
            if err is None and msg is not None:
                raise ValueError(msg)
        if err is not None:
            raise err
        yield


# keys the one-process loop computes over the whole (mini-)batch that each rank holds a part of
SUM_KEYS = ("actor/loss", "actor/clip_frac", "actor/ppo_kl", "sft/loss", "sft/text_rows")
SAME_KEYS = (
    "actor/grad_norm",
    "actor/grad_norm_post_clip",
    "actor/grad_clip_frac",
    "sft/grad_norm",
    "sft/grad_norm_post_clip",
    "sft/grad_clip_frac",
    "data/skipped_images",
    "data/skipped_empty",
    "data/epoch",
    "data/kept_frac",  # refill's counts are global (gathered in refill_groups)
    "data/groups",
    "data/refill_rounds",
    "pgpo/fused_lm_head",
)


def merge_rank_metrics(parts: list[tuple[dict, float, float]]) -> dict:
    """Combines each rank's (metrics, responses, tokens) into the global metrics.

    actor/loss, clip_frac, ppo_kl (already divided by global counts) are summed; maxima/minima and timings
    (the slowest rank) are maxed/minned; pgpo/* and actor/entropy are token-weighted means (a std is pooled from
    each rank's mean and std); other numbers are response-weighted means; anything else is rank 0's.
    """
    keys = []
    for m, _, _ in parts:
        keys += [k for k in m if k not in keys]
    out = {}
    for k in keys:
        have = [(m[k], nr, nt) for m, nr, nt in parts if k in m]
        vals = [v for v, _, _ in have]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) or k in SAME_KEYS:
            out[k] = parts[0][0].get(k, vals[0])
        elif k.startswith("timing/") or k.endswith("_max"):
            out[k] = max(vals)
        elif k.endswith("_min"):
            out[k] = min(vals)
        elif k in SUM_KEYS:
            out[k] = sum(vals)
        else:
            by_tok = k.startswith("pgpo/") or k == "actor/entropy"
            w = [nt if by_tok else nr for _, nr, nt in have]
            if sum(w) <= 0:
                w = [1.0] * len(have)
            if k.endswith("_std"):  # torch's (unbiased) std of the pooled values, each rank's n = its weight
                mean_k = k[: -len("_std")] + "_mean"
                means = [pm.get(mean_k, 0.0) for pm, _, _ in parts if k in pm]
                n = sum(w)
                mu = sum(wi * mi for wi, mi in zip(w, means)) / n
                sq = sum((wi - 1) * si**2 + wi * mi**2 for wi, si, mi in zip(w, vals, means))
                out[k] = math.sqrt(max((sq - n * mu**2) / max(n - 1, 1), 0.0))
            else:
                out[k] = sum(wi * v for wi, v in zip(w, vals)) / sum(w)
    return out


# %% sharding


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def forget_forward_order(mods: list) -> None:
    """Drops FSDP2's record of the forwards run so far (the no-grad ones of the block just left).

    Why: FSDP2 appends every forward of every sharded module to one list, no-grad forwards too, and clears it only
    when a backward ends; the backward prefetches, for each module, the entry before that module's last forward.
    A rank that ran the old-log-prob / text-only passes inside full_params and one that kept no rows (it only pairs
    the collectives) then prefetch different modules in the update's backward: an extra all-gather on one rank
    that gloo / NCCL pairs with the other's reduce-scatter, a hang. Seen with the text-only pass through the inner
    model (fused lm head), whose last recorded module is a resharded decoder layer. With the record cleared the
    prefetch follows only the update's own forward, the same on every rank. Private state (torch 2.6-2.13 name it
    alike); a torch without it leaves the record, as before."""
    for m in mods:
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        if state is None:
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older torch: one group per state
            one = getattr(state, "_fsdp_param_group", None)
            groups = [one] if one is not None else []
        for group in groups:
            indices = getattr(group, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()
        order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
        if order is not None:
            order.clear()


def shard_policy(model, device: torch.device, cpu_offload: bool = False):
    """FSDP2: fully_shard each decoder layer and vision block (the model's _no_split_modules), then the root.

    On CUDA the params are kept in fp32 (sharded masters) and all-gathered in bf16 with fp32 gradient reduction;
    on CPU everything stays fp32. Gradients are summed over ranks (divide factor 1): the losses divide by global
    counts themselves. cpu_offload: FSDP2's CPUOffloadPolicy (sharded params, grads and the optimizer step on CPU).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard

    kw = {}
    if device.type == "cuda":
        model = model.float()  # fp32 masters; compute in bf16 through the mixed precision policy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no _no_split_modules (decoder layer / vision block classes) to shard by"
        )
    for m in blocks:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM); the factor is 1 anyway
    # FSDP picks its root at the first forward; HF generate may call the vision tower on its own before the
    # model's forward, which would make a vision block a root. Fix the root now (torch has no public call for it).
    model._get_fsdp_state()._lazy_init()
    return model
