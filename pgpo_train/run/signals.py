"""Graceful stop: SIGINT / SIGTERM finish the current step, then the loop checkpoints and raises TrainingInterrupted.

    with StopOnSignal() as stop:      handlers are installed only once armed (a Ctrl-C during model loading still
        ...load...                    aborts at once) and the previous handlers come back on exit
        stop.arm()
        while ...:
            if stop.requested: save; raise TrainingInterrupted(...)

A second signal while stopping gets the previous handler's behaviour (Ctrl-C twice: KeyboardInterrupt now).
Multi-rank callers combine the ranks' flags with `stop_requested_anywhere(stop.requested)` so all stop together.
"""

from __future__ import annotations

import os
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run in out_dir stopped on a signal after a completed step; `checkpoint` holds it (None: nothing to save)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, out_dir: str = ""):
        self.signum, self.step, self.checkpoint, self.out_dir = signum, step, checkpoint, out_dir
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing to save yet)"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopOnSignal:
    """Records the first SIGINT/SIGTERM instead of dying; `requested` is the signal number (0: none)."""

    def __init__(self):
        self.requested = 0
        self._previous: dict[int, object] = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; elsewhere signals keep their default
        for s in HANDLED:
            self._previous[s] = signal.signal(s, self._handle)

    def disarm(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        # the next signal acts as it would have without us (SIGINT: KeyboardInterrupt, SIGTERM: exit)
        for s, h in self._previous.items():
            signal.signal(s, h)
        msg = f"\npgpo-train: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint\n"
        os.write(2, msg.encode())  # not print(): a handler may run inside another print

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()


def stop_requested_anywhere(requested: int, device=None) -> int:
    """The largest signal number any rank saw (0: none); `requested` itself when torch.distributed is not running."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return requested
    flag = torch.tensor([requested], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
