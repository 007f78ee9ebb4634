"""FSDP2's backward prefetch follows a record of the forwards since the last backward, no-grad ones included.

A rank that ran extra no-grad passes through the inner modules (the fused lm head's text-only pass) and a rank that
kept no rows then prefetched different modules in the update's backward: one all-gather more on one rank, a hang
under torchrun (seen in tests/train/test_distributed.py). distributed.Distributed.full_params now clears that
record on exit (distributed.forget_forward_order). This test runs the pattern on 2 gloo processes with a short
collective timeout, so the bug shows as an error, not a hang.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.multiprocessing as mp

from pgpo_train.run import distributed


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.inner(x))


def _worker(rank: int, port: int, forget: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = Stack()
    for layer in model.inner:
        fully_shard(layer)
    fully_shard(model)
    dp = distributed.Distributed()
    if not forget:  # the behaviour before the fix, to show the test can fail
        distributed.forget_forward_order = lambda mods: None
    x = torch.randn(2, 8)
    with torch.no_grad():
        model(x)  # the root forward first: FSDP picks its root there (shard_policy fixes it the same way)
    status = "ok"
    try:
        for _ in range(2):
            with dp.full_params(model):
                if rank == 1:  # this rank kept rows: a no-grad pass through the inner modules only
                    with torch.no_grad():
                        model.inner(x)
            model(x).sum().backward()  # both ranks: the update's forward + backward
        dist.barrier()  # pairs with a collective one rank has left over
    except Exception as e:  # gloo's timeout / a collective mismatch: the ranks diverged
        status = f"{type(e).__name__}: {str(e)[:200]}"
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(status)
    os._exit(0)  # a diverged process group cannot be torn down cleanly


def _run(forget: bool, tmp_path) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, forget, str(tmp_path)), nprocs=2, join=True)
    return [(tmp_path / f"rank{r}").read_text() for r in range(2)]


def test_ranks_with_different_no_grad_passes_run_the_same_backward(tmp_path):
    status = _run(True, tmp_path)
    assert status == ["ok", "ok"], status


def test_without_forgetting_the_ranks_diverge(tmp_path):
    """The control: with the record kept, the same pattern fails (so the test above can fail)."""
    status = _run(False, tmp_path)
    assert status != ["ok", "ok"], status
    assert all(x.startswith("RuntimeError") for x in status if x != "ok"), status  # gloo's timeout / mismatch
