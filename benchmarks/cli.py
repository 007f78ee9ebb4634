"""pgpo-bench command line (placeholder until the benchmark issue lands: times token_kl once per backend)."""

from __future__ import annotations

import argparse
import time

import torch

from pgpo_kernels import token_kl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgpo-bench")
    parser.add_argument("op", choices=["kl"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args(argv)
    a, b = torch.randn(args.tokens, args.vocab), torch.randn(args.tokens, args.vocab)
    t0 = time.perf_counter()
    kl = token_kl(a, b, backend="torch")
    dt = time.perf_counter() - t0
    print(f"token_kl torch backend (CPU) tokens={args.tokens} vocab={args.vocab}: {dt * 1e3:.2f} ms, "
          f"mean KL {kl.mean().item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
