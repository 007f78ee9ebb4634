"""Atomic checkpoints: everything a run needs to continue exactly (model, optimizer, RNG, step, data position).

A checkpoint is written into a temporary directory, fsynced, then renamed into place; the `latest` pointer is
replaced atomically afterwards. A run killed at any moment leaves every earlier checkpoint and the pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: str, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> str:
    """Writes ckpt_dir/step-{step:08d} atomically and points ckpt_dir/latest at it.

    Args:
        ckpt_dir: parent directory of all checkpoints.
        step: global step (names the checkpoint).
        model, optimizer: their state_dicts are saved.
        trainer_state: JSON-able dict (step, data position, phase, config, counters).
        keep: newest checkpoints to keep (older ones are deleted after the pointer moves).

    Returns:
        the checkpoint directory.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    publish_checkpoint(ckpt_dir, tmp, name, keep)
    return final


def publish_checkpoint(ckpt_dir: str, tmp: str, name: str, keep: int) -> None:
    """Renames the finished tmp dir to ckpt_dir/name, moves the `latest` pointer atomically, drops old checkpoints.

    Shared by the one-process and the sharded (torch.distributed.checkpoint) saves: a kill at any point leaves
    `latest` on a complete checkpoint."""
    final = os.path.join(ckpt_dir, name)
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    pointer_tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp-{os.getpid()}")
    with open(pointer_tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
    _fsync_dir(ckpt_dir)
    old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and d != name)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint `latest` points at, or None. Temporary (unfinished) directories are never returned."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    return path if os.path.exists(os.path.join(path, "trainer_state.json")) else None


def read_trainer_state(path: str) -> dict:
    """A checkpoint's trainer state (step, phase, data position, ...) without loading its tensors."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restores model, optimizer and RNG states from path; returns the trainer state dict."""
    payload = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng"])
    return read_trainer_state(path)
