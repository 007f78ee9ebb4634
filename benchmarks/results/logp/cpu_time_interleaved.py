"""Time per token of the loss head's forward + backward, providers interleaved in ONE process (round-robin, median
of the rounds), so the ratios see the same machine load; pgpo-bench logp's own times come from one process per
provider, run one after another on a shared 2-core host.

    PYTHONPATH=$PWD python benchmarks/results/logp/cpu_time_interleaved.py --tokens 1024 --rounds 5 \
        > benchmarks/results/logp/cpu_time_interleaved.md
"""

import argparse
import statistics
import time

import torch

from pgpo_bench.logp import _inputs
from pgpo_bench.logp import _step
from pgpo_bench.logp import make_provider


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--providers", default="logits,compile,trl_chunked,ours_torch")
    a = p.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    h, w, t = _inputs(a.tokens, a.vocab, a.hidden, torch.float32, cpu)
    fns = {name: make_provider(name, 1.0, cpu) for name in a.providers.split(",")}
    for fn in fns.values():  # warm-up (torch.compile compiles here)
        _step(fn, h, w, t)
    times = {name: [] for name in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _step(fn, h, w, t)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["logits"]) if "logits" in times else None
    print(f"N = {a.tokens}, V = {a.vocab}, H = {a.hidden}, fp32, 1 thread, {a.rounds} interleaved rounds, "
          f"forward + backward of sum(logp) + 0.01 sum(entropy)\n")
    print("| provider | median ms | us / token | vs logits |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {name} | {1e3 * med:.0f} | {1e6 * med / a.tokens:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
