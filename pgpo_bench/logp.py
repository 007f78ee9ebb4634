"""pgpo-bench logp: the policy update's loss head, forward + backward of sum(logp) (+ entropy), per provider.

    python -m pgpo_bench.cli logp --tokens 256,1024,4096 --vocab 152064 --hidden 64 --dtype fp32 --json r.json --md r.md

Providers (same inputs: hidden [N, H] and lm_head [V, H] requiring grad, N targets with every 17th ignored):

    logits         torch eager as a trainer without a fused head: logits = F.linear(h, W).float() / T, log_softmax,
                   gather, entropy, backward                                       [N, V] fp32 and its autograd
    compile        the same function under torch.compile (timed after its compile)
    liger          Liger 0.8.5 LigerFusedLinearCrossEntropyFunction, reduction='none' (logp = -loss; it has no
                   temperature and no entropy output, so it computes less; on a CPU its Triton kernels run in the
                   interpreter: its time is not comparable there)
    liger_scaled   Liger 0.8.5 LigerFusedLinearScaledCrossEntropyFunction (per-token NLL + entropy, temperature; logp =
                   -nll): its CuTe-DSL kernel on an H100 (sm_90, needs nvidia-cutlass-dsl), its torch fallback
                   (512-token chunks) anywhere else; the loss head Liger publishes H100 times for
    trl_chunked    TRL 1.16's ChunkedLogProbFunction (the kernel of trl's add_fused_lm_head), entropy on
    ours_torch     fused_linear_logp(backend='torch'): row chunks of ~8 MiB fp32 logits
    ours_triton    fused_linear_logp(backend='triton') (CUDA only; the interpreter is never timed), its default
                   gradient filter (CCE's finfo(dtype).eps / 32); these random inputs are far from peaked (logits
                   ~ N(0, 9) over V): next to no tile falls under it, so this times the filter's check, not its skips
    ours_triton_exact
                   the same with grad_filter=0 (the exact backward, no filter code)
    ours_triton_bwd64
                   the same with the backward's previous 64 x 128 x 64 tiles, to time the static tile choice
                   (docs/design/fused_ops.md) against the one it replaced on the first GPU

Each (provider, N) runs in a fresh subprocess. Peak extra memory: on the CPU the process's peak RSS (VmHWM, reset with
/proc/self/clear_refs after the inputs are built and a warm-up at a small N) minus its RSS just before the call; on CUDA
torch.cuda.max_memory_allocated minus memory_allocated before the call. Both include the gradients of hidden and
weight ([N, H] + [V, H]), which every provider must produce. Time: median of --reps calls after one warm-up call at the
measured size, per token, one torch thread on the CPU (ratios between providers in one run are what it is good for).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time

PROVIDERS = ("logits", "compile", "liger", "liger_scaled", "trl_chunked", "ours_torch", "ours_triton",
             "ours_triton_exact", "ours_triton_bwd64")
# the backward tiles before the static sweep (benchmarks/results/logp/bwd_tile_sweep.md)
BWD64_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3, "GROUP_N": 16}
# bytes per token x vocab entry the logits path was measured to need (~20, benchmarks/results/logp/); used only to
# skip a size that would not fit in the host's available memory
LOGITS_BYTES_PER_ENTRY = 20
# Liger on a CPU runs in Triton's interpreter (~0.4 ms per token at V = 152064 here): sizes above this are skipped
LIGER_CPU_MAX_ENTRIES = 2e8


# %% worker (one provider at one size, in its own process) ---------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so it cannot hide the next call's peak
    except OSError:  # pragma: no cover - not glibc
        pass


def _logits_fn(temperature):
    import torch.nn.functional as F

    def fn(h, w, t):
        z = F.linear(h, w).float() / temperature
        logp = z.log_softmax(-1)
        valid = t != -100
        lp = logp.gather(-1, t.clamp_min(0)[:, None]).squeeze(-1) * valid
        ent = -(logp.exp() * logp).sum(-1) * valid
        return lp, ent
    return fn


def make_provider(name: str, temperature: float, device):
    """-> fn(h, w, t) returning (logp, entropy | None), differentiable w.r.t. h and w."""
    import torch

    if name == "logits":
        return _logits_fn(temperature)
    if name == "compile":
        return torch.compile(_logits_fn(temperature), dynamic=False)
    if name == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        if temperature != 1.0:
            raise RuntimeError("Liger's fused linear cross-entropy takes no temperature")

        def liger(h, w, t):
            loss = LigerFusedLinearCrossEntropyFunction.apply(h, w, t, None, None, -100, 0.0, 0.0, "none")[0]
            return -loss, None
        return liger
    if name == "trl_chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer import utils as trl_utils

        chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 4096)

        def trl(h, w, t):
            valid = t != -100
            out = ChunkedLogProbFunction.apply(h, w, None, t.clamp_min(0), temperature, chunk, None, 1.0,
                                               ("entropy",))
            return out[0] * valid, out[1] * valid
        return trl
    if name == "liger_scaled":
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction

        def liger_scaled(h, w, t):
            nll, ent = LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, t, temperature, -100, 1, True)
            return -nll, ent
        return liger_scaled
    if name in ("ours_torch", "ours_triton", "ours_triton_exact", "ours_triton_bwd64"):
        from pgpo_kernels import fused_linear_logp

        backend = "torch" if name == "ours_torch" else "triton"
        if name == "ours_triton_bwd64":  # this provider's own process: a module-level swap touches no other row
            import pgpo_kernels.fused_logp as fl

            fl.BWD_BLOCKS = dict(BWD64_BLOCKS)
        if backend == "triton" and device.type != "cuda":
            raise RuntimeError("the Triton kernels run on CUDA (the interpreter is never timed)")
        grad_filter = 0.0 if name == "ours_triton_exact" else None
        return lambda h, w, t: fused_linear_logp(h, w, t, temperature=temperature, with_entropy=True,
                                                 backend=backend, grad_filter=grad_filter)
    raise ValueError(f"unknown provider {name!r}")


def _inputs(n, v, hdim, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, hdim, generator=g) / math.sqrt(hdim) * 3).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::17] = -100
    return h, w, t


def _step(fn, h, w, t):
    h.grad = w.grad = None
    lp, ent = fn(h, w, t)
    loss = lp.sum() if ent is None else lp.sum() + 0.01 * ent.sum()
    loss.backward()
    return lp.detach()


def worker(args) -> dict:
    import torch

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    interpreted = args.provider == "liger" and device.type == "cpu"
    if interpreted and args.tokens * args.vocab > LIGER_CPU_MAX_ENTRIES:
        return {"provider": args.provider, "tokens": args.tokens, "status": "skipped",
                "reason": f"Liger's Triton kernels run in the interpreter on a CPU: N x V over "
                          f"{LIGER_CPU_MAX_ENTRIES:.1e} would take hours"}
    fn = make_provider(args.provider, args.temperature, device)
    h, w, t = _inputs(args.tokens, args.vocab, args.hidden, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # one warm-up at the measured size (compiles; liger/trl pick tiles), then the memory-measured call; Liger in the
    # interpreter compiles nothing: no warm-up, and its one call is also its time
    if not interpreted:
        _step(fn, h, w, t)
        sync()
    h.grad = w.grad = None
    _trim()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_hwm()
        base = _rss_bytes()
    t0 = time.perf_counter()
    lp = _step(fn, h, w, t)
    sync()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _hwm_bytes()) - base
    times = [first] if interpreted else []
    for _ in range(0 if interpreted else args.reps):
        t0 = time.perf_counter()
        _step(fn, h, w, t)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    # the answer against the float64 reference on a few rows (a provider that is fast but wrong shows up here)
    from pgpo_kernels.reference import fused_linear_logp_ref

    k = min(8, args.tokens)
    ref = fused_linear_logp_ref(h.detach()[:k].cpu(), w.detach().cpu(), t[:k].cpu(), None, args.temperature)[0]
    err = float((lp[:k].double().cpu() - ref).abs().max())
    rec = {"provider": args.provider, "tokens": args.tokens, "peak_extra_bytes": int(peak),
           "time_ms": 1e3 * times[len(times) // 2], "us_per_token": 1e6 * times[len(times) // 2] / args.tokens,
           "max_abs_err_logp": err, "status": "ok"}
    if args.provider == "ours_triton":
        rec["skipped_tile_fraction"] = triton_skip_fraction(h.detach(), w.detach(), t, args.temperature)
        rec["note"] = f"filter skipped {rec['skipped_tile_fraction']:.1%} of backward tiles"
    return rec


def triton_skip_fraction(h, w, t, temperature: float, grad_filter: float | None = None) -> float:
    """The share of the Triton backward's tiles its gradient filter skips on these inputs (the kernel's own count:
    one forward for the row stats, one backward of sum(logp) + 0.01 sum(entropy), as timed)."""
    import torch

    import pgpo_kernels.fused_logp as fl

    eps = fl.resolve_grad_filter(grad_filter, h.dtype)
    valid = t != -100
    tt = t.long().contiguous()
    _, ent, lse = fl.logp_forward(h, w, None, tt, temperature, True)
    grads = torch.stack([valid.float(), 0.01 * valid.float()], -1)
    counter = torch.zeros(1, dtype=torch.int32, device=h.device)
    fl.logp_backward(h, w, None, tt, torch.stack([lse, ent], -1), grads, temperature, True, (True, True, False),
                     filter_eps=eps, skip_counter=counter)
    cfg = fl.logp_launch_configs(h.dtype, h.device)[1]
    tiles = -(-h.shape[0] // cfg["BLOCK_N"]) * -(-w.shape[0] // cfg["BLOCK_V"])
    return int(counter.item()) / tiles


# %% driver --------------------------------------------------------------------------------------------------------
def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run(args) -> dict:
    records = []
    for n in args.tokens:
        for prov in args.providers:
            need = LOGITS_BYTES_PER_ENTRY * n * args.vocab if prov in ("logits", "compile") else 0
            if prov.startswith("ours_triton") and args.device != "cuda":
                rec = {"provider": prov, "tokens": n, "status": "skipped",
                       "reason": "CUDA only (the interpreter is never timed)"}
            elif args.device == "cpu" and need > args.memory_share * _available_bytes():
                rec = {"provider": prov, "tokens": n, "status": "skipped",
                       "reason": f"would need ~{need / 2**30:.1f} GiB, over {args.memory_share:.0%} of the host's "
                                 f"available memory"}
            else:
                cmd = [sys.executable, "-m", f"{__package__}.logp", "--worker", prov, "--tokens", str(n), "--vocab",
                       str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
                       "--temperature", str(args.temperature), "--reps", str(args.reps)]
                env = dict(os.environ)
                env["TRITON_INTERPRET"] = "1" if (prov == "liger" and args.device == "cpu") else "0"
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOGP-RESULT ")]
                if proc.returncode == 0 and lines:
                    rec = json.loads(lines[-1][len("LOGP-RESULT "):])
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                    rec = {"provider": prov, "tokens": n, "status": "failed", "reason": tail[0][:300]}
                if prov == "liger" and args.device == "cpu" and rec["status"] == "ok":
                    rec["note"] = "Triton interpreter on CPU: time not comparable"
            records.append(rec)
            if args.json:  # after every case: a run cut short (a time limit) keeps what finished
                with open(args.json, "w") as f:
                    json.dump(_report(args, records), f, indent=1)
            if not args.quiet:
                what = (f"{rec['peak_extra_bytes'] / 2**20:.1f} MiB, {rec['us_per_token']:.1f} us/token"
                        if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}")
                print(f"  N={n:<6} {prov:<12} {what}", file=sys.stderr, flush=True)
    return _report(args, records)


def _report(args, records) -> dict:
    return {"tool": "pgpo-bench logp", "argv": sys.argv[1:], "config": {k: getattr(args, k) for k in (
        "tokens", "vocab", "hidden", "dtype", "device", "temperature", "reps")}, "records": records}


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"V = {cfg['vocab']}, H = {cfg['hidden']}, {cfg['dtype']}, {cfg['device']}, T = {cfg['temperature']}; "
             "forward + backward of sum(logp) + 0.01 sum(entropy). Extra peak: "
             + ("peak RSS of a fresh process minus RSS before the call" if cfg["device"] == "cpu"
                else "max_memory_allocated minus memory_allocated before the call")
             + "; it includes the fp32 gradients of hidden and weight.", ""]
    by = {}
    for r in report["records"]:
        by.setdefault(r["tokens"], {})[r["provider"]] = r
    head = "| N | provider | extra peak MiB | vs logits | us / token | max abs err logp |"
    lines += [head, "|---|---|---|---|---|---|"]
    for n, rows in by.items():
        base = rows.get("logits", {}).get("peak_extra_bytes")
        for prov, r in rows.items():
            if r["status"] != "ok":
                lines.append(f"| {n} | {prov} | {r['status']}: {r['reason']} | | | |")
                continue
            mib = r["peak_extra_bytes"] / 2**20
            ratio = f"{r['peak_extra_bytes'] / base:.1%}" if base else "-"
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {n} | {prov} | {mib:.1f} | {ratio} | {r['us_per_token']:.1f}{note} | "
                         f"{r['max_abs_err_logp']:.2e} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpo-bench logp", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="256,1024,4096", help="comma list of N")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory-share", type=float, default=0.6,
                   help="CPU: skip the logits providers where they would need more than this share of MemAvailable")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        args.provider, args.tokens = args.worker, int(args.tokens)
        print("LOGP-RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    args.tokens = [int(x) for x in str(args.tokens).split(",") if x.strip()]
    args.providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {list(PROVIDERS)}")
    report = run(args)
    md = markdown(report)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
