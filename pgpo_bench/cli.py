"""pgpo-bench: our kernels side by side with torch eager, torch.compile and Liger, against the measured copy bandwidth.

    pgpo-bench kl --vocab 152064                      token KL, 4096 tokens (CUDA) / small sizes on the CPU
    pgpo-bench reshape                                PGPO reshape, 256 x 2048 tokens (CUDA)
    pgpo-bench weights                                token KL + reshape
    pgpo-bench linear                                 fused lm_head + KL (fused_linear_token_kl)
    pgpo-bench stats                                  fused log p / entropy / KL (token_stats)
    pgpo-bench all --tokens 1..16384 --json r.json --plot r.png
    pgpo-bench sass --vocab 152064 --tokens 4096 --arch 90a,80   static SASS report, CPU only (pgpo_bench/sass.py)
    pgpo-bench logp --tokens 256,1024,4096 --hidden 64   loss head fwd+bwd: peak extra memory per provider (logp.py)
    pgpo-bench model --liger                          bytes, FLOPs, modeled H100/H200 ms per kernel (model.py)

--tokens takes one value, a list (space or comma separated) or A..B for the powers of two from A to B. On the CPU
the defaults are small and the output says CPU; our Triton kernels are then listed as not run (the interpreter is
never timed). See benchmarks/README.md for what each column means and the JSON schema.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .cases import OPS
from .cases import build_case
from .providers import OP_BACKENDS
from .report import build_report
from .report import plot
from .report import print_table
from .report import write_json
from .roofline import device_info
from .roofline import measure_copy_bandwidth
from .runner import run_case
from .timing import peak_memory_note

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

# Defaults per device. CUDA: the Qwen2.5-VL shapes of the issue. CPU: small enough for a few seconds per op.
CUDA_DEFAULTS = {"vocab": 152064, "hidden": 3584, "seq_len": 2048,
                 "tokens": {"kl": 4096, "reshape": 256 * 2048, "weights": 4096, "linear": 4096, "stats": 4096}}
CPU_DEFAULTS = {"vocab": 32768, "hidden": 256, "seq_len": 256,
                "tokens": {"kl": 256, "reshape": 64 * 256, "weights": 256, "linear": 64, "stats": 256}}
CPU_TIMING = {"warmup_ms": 50.0, "rep_ms": 300.0}
CUDA_TIMING = {"warmup_ms": 25.0, "rep_ms": 100.0}


def parse_tokens(values: list[str]) -> list[int]:
    """["1..8", "16,32"] -> [1, 2, 4, 8, 16, 32]: lists, comma lists and A..B power-of-two ranges, sorted, unique."""
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ".." in part:
                    lo, hi = (int(x) for x in part.split(".."))
                    if lo < 1 or hi < lo:
                        raise ValueError
                    n = 1
                    while n < lo:
                        n *= 2
                    while n <= hi:
                        out.append(n)
                        n *= 2
                else:
                    out.append(int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"--tokens takes positive integers, comma lists or A..B ranges, got {part!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--tokens must give at least one value >= 1, got {values!r}")
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpo-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See benchmarks/README.md for the columns and the JSON schema.")
    p.add_argument("op", choices=(*OPS, "all", "sass"),
                   help="which op to time ('all': every op; 'sass': the static SASS report, see `sass --help`)")
    p.add_argument("--tokens", nargs="+", default=None,
                   help="token rows N: one value, a list, or A..B (powers of two); default depends on op and device")
    p.add_argument("--vocab", type=int, default=None, help="vocab size V (default 152064 on CUDA, 32768 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H of the linear op (3584 CUDA, 256 CPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence T for reshape/weights; B = N / T (2048 CUDA, 256 CPU)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="logits / hidden dtype (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of backends, shown in the order given (default: all that apply to the op)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON here")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of GB/s vs tokens per backend here")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per measurement")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement")
    p.add_argument("--check-rows", type=int, default=32, help="rows checked against the float64 reference")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch intra-op threads (default 1: steady on a shared host; 0 = torch's choice)")
    p.add_argument("--no-copy-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    p.add_argument("--quiet", action="store_true", help="no per-measurement progress lines")
    return p


def _backends(op: str, requested: list[str] | None) -> list[str]:
    allowed = OP_BACKENDS[op]
    if requested is None:
        return list(allowed)
    return [b for b in requested if b in allowed]


def measure(args, ops, tokens, defaults, device, dtype, vocab, hidden, seq_len, warmup_ms, rep_ms, info,
            checkpoint=None):
    """Copy bandwidth, then every (op, tokens) case on its backends -> (copy dict or None, records).

    checkpoint(copy, records), if given, is called after each case (the CLI saves a partial JSON there).
    """

    def progress(rec: dict) -> None:
        if args.quiet:
            return
        what = f"{rec['time_ms']['median']:.4g} ms" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"
        print(f"  {rec['op']:>8} N={rec['tokens']:<6} {rec['backend']:<14} {what}", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"pgpo-bench on {info['name']} ({'CPU: not GPU kernel speed' if device.type == 'cpu' else 'CUDA'})",
              file=sys.stderr)
    copy = None if args.no_copy_bandwidth else measure_copy_bandwidth(device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy's 2 GiB go back before the cases are built
    records: list[dict] = []
    for op in ops:
        backends = _backends(op, args.backends)
        for n in tokens or [defaults["tokens"][op]]:
            case = build_case(op, n, vocab=vocab, hidden=hidden, seq_len=seq_len, dtype=dtype, device=device,
                              check_rows=args.check_rows)
            records += run_case(case, backends, copy_gbps=copy and copy["GBps"], warmup_ms=warmup_ms, rep_ms=rep_ms,
                                on_record=progress)
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if checkpoint is not None:
                checkpoint(copy, records)
    return copy, records


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sass"]:  # compiles, never times: its own options and process (pgpo_bench/sass.py)
        from .sass import run_in_subprocess

        return run_in_subprocess(argv[1:])
    if argv[:1] == ["model"]:  # bytes, FLOPs and modeled times per kernel, no GPU needed (pgpo_bench/model.py)
        from .model import main as model_main

        return model_main(argv[1:])
    if argv[:1] == ["logp"]:  # forward + backward of the loss head, one fresh process per case (pgpo_bench/logp.py)
        from .logp import main as logp_main

        return logp_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)

    # -- resolve device, sizes and backends; every check before any tensor is built -----------------------------
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    timing = CUDA_TIMING if device.type == "cuda" else CPU_TIMING
    warmup_ms = timing["warmup_ms"] if args.warmup_ms is None else args.warmup_ms
    rep_ms = timing["rep_ms"] if args.rep_ms is None else args.rep_ms
    vocab = defaults["vocab"] if args.vocab is None else args.vocab
    hidden = defaults["hidden"] if args.hidden is None else args.hidden
    seq_len = defaults["seq_len"] if args.seq_len is None else args.seq_len
    for name, value in (("--vocab", vocab), ("--hidden", hidden), ("--seq-len", seq_len), ("--check-rows",
                                                                                           args.check_rows)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    try:
        tokens = parse_tokens(args.tokens) if args.tokens else None
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    known = {b for bs in OP_BACKENDS.values() for b in bs}
    unknown = [b for b in args.backends or [] if b not in known]
    if unknown:
        parser.error(f"--backends: unknown {unknown}; choose from {sorted(known)}")
    if args.threads is not None and args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    ops = list(OPS) if args.op == "all" else [args.op]
    dtype = DTYPES[args.dtype]

    # -- measure --------------------------------------------------------------------------------------------------
    prev_threads = torch.get_num_threads()
    if device.type == "cpu":
        # our choice: one thread by default; on a loaded host OpenMP threads wait on each other and the timings
        # swing by ~1000x (0.04 ms or 48 ms for one 16 x 2048 eager KL with 2 threads on the 2-core CI-like host).
        # The count is recorded in the JSON's device entry.
        threads = 1 if args.threads is None else args.threads
        if threads > 0:
            torch.set_num_threads(threads)
    config = {"ops": ops, "tokens": tokens, "vocab": vocab, "hidden": hidden, "seq_len": seq_len,
              "dtype": str(dtype).removeprefix("torch."), "warmup_ms": warmup_ms, "rep_ms": rep_ms,
              "check_rows": args.check_rows, "backends": args.backends, "complete": False}

    def save_partial(copy, records):
        # a run cut short (a time limit, a crash) still leaves every finished case in the JSON, marked incomplete
        write_json(build_report(argv=argv, device=info, copy=copy, config=config, records=records,
                                peak_memory_method=peak_memory_note(device)), args.json)

    try:
        info = device_info(device)
        copy, records = measure(args, ops, tokens, defaults, device, dtype, vocab, hidden, seq_len, warmup_ms, rep_ms,
                                info, checkpoint=save_partial if args.json else None)
    finally:
        torch.set_num_threads(prev_threads)  # in-process callers (tests) get their thread count back

    # -- report ---------------------------------------------------------------------------------------------------
    config["complete"] = True
    report = build_report(argv=argv, device=info, copy=copy, config=config, records=records,
                          peak_memory_method=peak_memory_note(device))
    print_table(report)
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
