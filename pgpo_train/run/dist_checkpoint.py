"""Sharded checkpoints for torchrun runs: torch.distributed.checkpoint (DCP), atomic, loadable at any world size.

A checkpoint directory step-XXXXXXXX holds DCP's shard files and .metadata (model and optimizer, each rank writing
its own shards), rng-rank{r}.pt (every rank's RNG) and trainer_state.json (step, data position, ...). All ranks
write into one temporary directory; after a barrier rank 0 renames it into place and moves the `latest` pointer,
exactly as checkpoint.save_checkpoint does for one process, so a kill at any moment loses nothing already saved.

`load` reads either format into either world size: DCP reshards on load (2 -> 1, 1 -> 2, ...) through
get_state_dict / set_state_dict (torch.distributed.checkpoint.state_dict), and a one-process state.pt loads into
N ranks as a full state dict. The multi-node case needs ckpt_dir on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch

from pgpo_train.run.checkpoint import load_checkpoint
from pgpo_train.run.checkpoint import publish_checkpoint
from pgpo_train.run.checkpoint import rng_state
from pgpo_train.run.checkpoint import set_rng_state
from pgpo_train.run.distributed import SINGLE


def is_sharded(path: str) -> bool:
    return os.path.exists(os.path.join(path, ".metadata"))


def save(dp, ckpt_dir: str, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> str:
    """Collective: every rank calls it. Writes ckpt_dir/step-{step:08d} and points `latest` at it (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".tmp-{name}")  # one name on every rank (pids differ)
    if dp.is_writer:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        os.makedirs(tmp)
    dp.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)  # fsyncs its files (FileSystemWriter sync_files)
    with open(os.path.join(tmp, f"rng-rank{dp.rank}.pt"), "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    if dp.is_writer:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "world_size": dp.world}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    dp.barrier()  # every rank's shards and RNG are on disk
    if dp.is_writer:
        publish_checkpoint(ckpt_dir, tmp, name, keep)
    dp.barrier()
    return final


def load(path: str, model, optimizer, dp=SINGLE, seed: int = 0) -> dict:
    """Restores model, optimizer and this rank's RNG from a checkpoint of either format; returns the trainer state.

    One process on a one-process checkpoint is checkpoint.load_checkpoint, unchanged. A rank restores its own
    saved RNG stream when the checkpoint has one (same world size, or rank 0 of any); a rank the saving run did not
    have starts a fresh stream seeded from (seed, step, rank).
    """
    if not is_sharded(path) and dp.world == 1:
        return load_checkpoint(path, model, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict import set_state_dict

    rng_file = os.path.join(path, f"rng-rank{dp.rank}.pt")
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(model, optimizer)  # this world's layout; DCP reshards the saved one into it
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = torch.load(rng_file, weights_only=False) if os.path.exists(rng_file) else None
    else:  # a one-process checkpoint into N ranks: full tensors, each rank keeps its shard
        payload = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        opts = StateDictOptions(full_state_dict=True)
        optim = _fqn_keyed(model, payload["optimizer"])
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=optim, options=opts)
        rng = payload["rng"] if dp.rank == 0 else None
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if rng is not None:
        set_rng_state(rng)
    else:
        fresh_rng(seed, state["step"], dp.rank)
    return state


def fresh_rng(seed: int, step: int, rank: int) -> None:
    """A rank's own RNG stream where none was saved (distinct per rank, reproducible)."""
    import numpy as np

    s = (seed * 1_000_003 + step * 1009 + rank) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _fqn_keyed(model, osd: dict) -> dict:
    """torch optimizer state_dict (params as indices, in make_optimizer's order) -> keyed by parameter names."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [names[i] for i in g["params"]]})
    return {"state": {names[i]: s for i, s in osd["state"].items()}, "param_groups": groups}
