"""The run directory survives faults: one writer at a time, no orphaned temporaries, a metrics log that resumes.

    RunDirLock(out_dir)          exclusive flock on out_dir/.lock; a second writer gets one line naming the pid
    remove_orphans(ckpt_dir)     .tmp-step-* dirs and .latest.tmp-* files a killed save left behind
    repair_metrics(path, step)   drop a torn last line and the rows after the resumed checkpoint's step
    open_run_dir(out_dir, ...)   all of the above for train(); removes the dir again if it made it and the run
                                 failed before writing anything worth keeping

Multi-rank callers: only rank 0 opens the run dir (lock, cleanup, writes); the others only read checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager

LOCK_NAME = ".lock"


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """Exclusive, non-blocking flock on out_dir/.lock holding the owner's pid; released on close or process exit.

    The lock file itself stays (deleting it would let two processes lock two different files of one name).
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"{os.path.dirname(self.path)} is in use by another run (pid {holder}): wait for it to end, "
                "or choose another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_orphans(ckpt_dir: str) -> list[str]:
    """Deletes the temporaries of unfinished checkpoint saves (safe only while holding the run dir's lock).

    Returns:
        the names removed.
    """
    if not os.path.isdir(ckpt_dir):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(".tmp-step-"):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
        elif name.startswith(".latest.tmp-"):
            os.remove(path)
            removed.append(name)
    return removed


def repair_metrics(path: str, last_step: int) -> dict:
    """Rewrites metrics.jsonl (atomically) keeping only complete rows with step <= last_step.

    A row that does not parse (a write torn by a full disk or a kill) is dropped, as is every row after the
    checkpoint a run resumes from, so the resumed log has each step once, as an uninterrupted run would.

    Returns:
        {"kept": rows kept, "torn": unparsable rows dropped, "after": rows past last_step dropped}
    """
    counts = {"kept": 0, "torn": 0, "after": 0}
    if not os.path.exists(path):
        return counts
    kept = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                step = row["step"]
            except (ValueError, KeyError, TypeError):
                counts["torn"] += 1
                continue
            if step > last_step:
                counts["after"] += 1
                continue
            kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
    counts["kept"] = len(kept)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return counts


def _worth_keeping(out_dir: str) -> bool:
    """True once a run dir holds anything beyond what start-up writes (config.json/.yaml, the lock, empty logs)."""
    for name in os.listdir(out_dir):
        if name in (LOCK_NAME, "config.json", "config.yaml", "tb"):
            continue
        return True
    return False


def _missing_dirs(path: str) -> list[str]:
    out = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _remove_made(made: list[str]) -> None:
    """Removes the run dir this process made, then each parent it made while empty (another run may share one)."""
    if not made:
        return
    shutil.rmtree(made[0], ignore_errors=True)
    for parent in made[1:]:
        try:
            os.rmdir(parent)
        except OSError:
            return


@contextmanager
def open_run_dir(out_dir: str, resume: bool, overwrite: bool, log=print):
    """Creates (unless resuming) and locks out_dir, and removes checkpoint orphans, for the duration of a run.

    Args:
        out_dir: the run directory.
        resume: continue a run (the directory must exist: check_sources said so).
        overwrite: an existing run's checkpoints are deleted (under the lock) instead of refusing to start.
        log: where one-line notes go.

    Raises:
        RunDirBusy: another process holds the lock.
        ValueError: out_dir holds checkpoints, and neither resume nor overwrite was asked for.
    """
    from pgpo_train.run.checkpoint import latest_checkpoint

    made = _missing_dirs(out_dir)  # out_dir and its parents that do not exist yet (leaf first)
    os.makedirs(out_dir, exist_ok=True)
    lock = RunDirLock(out_dir)
    try:
        lock.acquire()
    except RunDirBusy:
        _remove_made(made)
        raise
    try:
        ckpt_dir = os.path.join(out_dir, "checkpoints")
        if not resume and latest_checkpoint(ckpt_dir) is not None:
            if not overwrite:
                raise ValueError(
                    f"{out_dir} already holds checkpoints: pass --resume to continue or --overwrite to start over"
                )
            shutil.rmtree(ckpt_dir)
        removed = remove_orphans(ckpt_dir)
        if removed:
            log(f"pgpo-train: removed {len(removed)} unfinished checkpoint temporaries from {ckpt_dir}")
        yield lock
    except BaseException:
        if made and not _worth_keeping(out_dir):
            _remove_made(made)  # a run that failed at start-up leaves no empty run dir (nor runs/ made for it)
        raise
    finally:
        lock.release()
