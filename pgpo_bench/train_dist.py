"""Data parallel pgpo-train throughput: rollout and update tokens/s at 1 vs N processes, and what unsharding the
FSDP2 policy once per rollout saves over an all-gather per generated token. Not a test: numbers, written to disk.

    python -m pgpo_bench.train_dist --nproc 1,2 --steps 4 --out benchmarks/results/train_dist   # CPU, gloo
    python -m pgpo_bench.train_dist --nproc 1,8 --device cuda --out $OUT/train_dist              # a GPU node

`throughput`: the tiny model on the embedded count task through the real CLI (`python -m pgpo_train` for 1,
`torchrun --nproc-per-node N -m pgpo_train` otherwise), dynamic sampling off so every response is updated on.
Rollout tokens/s = the step's response tokens (all ranks) / timing/rollout (the slowest rank); update tokens/s =
the same tokens / timing/update. The first step (warm-up) is left out; the median of the rest is reported.
`unshard`: 2 ranks, one generate() of B x T tokens with the policy sharded (FSDP2 all-gathers every layer in every
forward, i.e. per token) and inside distributed.full_params (one all-gather per layer for the whole rollout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from .roofline import cpu_model


def run_throughput(nproc: int, a, data: str) -> dict:
    out_dir = os.path.join(a.work, f"np{nproc}")
    shutil.rmtree(out_dir, ignore_errors=True)
    flags = [
        "--dataset", data, "--prompt-template", "tiny", "--out-dir", out_dir, "--steps", str(a.steps),
        "--sft-steps", "0", "--prompts-per-step", str(a.prompts), "--group-size", str(a.group_size),
        "--max-new-tokens", str(a.max_new_tokens), "--mini-batch-size", str(a.prompts * a.group_size),
        "--micro-batch-size", str(a.micro_batch_size), "--dynamic-sampling", "off", "--eval-every", "0",
        "--save-every", "0", "--no-progress", "--no-tensorboard", "--device", a.device, "--algo", a.algo,
    ]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "pgpo_train", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "pgpo_train", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f if x.strip()][1:]  # step 1: warm-up
    B = a.prompts * a.group_size
    tokens = [r["response/length_mean"] * B for r in rows]
    roll = [t / r["timing/rollout"] for t, r in zip(tokens, rows)]
    upd = [t / r["timing/update"] for t, r in zip(tokens, rows) if r.get("timing/update")]
    return {
        "nproc": nproc,
        "command": " ".join(cmd),
        "steps_timed": len(rows),
        "tokens_per_step": statistics.median(tokens),
        "rollout_tok_s": statistics.median(roll),
        "update_tok_s": statistics.median(upd) if upd else None,
        "step_s": statistics.median(r["timing/step"] for r in rows),
        "wall_s": wall,
    }


def _unshard_worker(rank: int, world: int, port: int, a, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import torch

    from pgpo_train.models.tiny import build_tiny
    from pgpo_train.run import distributed

    torch.set_num_threads(1)
    device = torch.device(a.device)
    dp = distributed.setup(device.type)
    model, _ = build_tiny(seed=0)
    model = distributed.shard_policy(model.to(device), device).eval()
    ids = torch.randint(10, 300, (a.gen_batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    res = {}
    for mode in ("per_token_all_gather", "unshard_once") * 2:  # second round timed (the first warms up)
        ctx = dp.full_params(model) if mode == "unshard_once" else contextlib.nullcontext()
        dp.barrier()
        t0 = time.perf_counter()
        with torch.no_grad(), ctx:
            o = model.generate(input_ids=ids, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False)
        res[mode] = a.gen_batch * (o.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    distributed.teardown()


def run_unshard(a) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(a.work, "unshard.json")
    mp.spawn(_unshard_worker, args=(2, port, a, out), nprocs=2, join=True)
    with open(out) as f:
        res = json.load(f)
    res["speedup"] = res["unshard_once"] / res["per_token_all_gather"]
    res.update(batch=a.gen_batch, new_tokens=a.gen_tokens, ranks=2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgpo_bench.train_dist", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", default="1,2", help="process counts, comma separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--algo", default="pgpo")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=24)
    p.add_argument("--skip-unshard", action="store_true")
    p.add_argument("--work", default="/tmp/pgpo_train_dist")
    p.add_argument("--out", default="benchmarks/results/train_dist", help="directory for results.json / results.md")
    p.add_argument("--machine", default="", help="free text stored with the results (load, sharing, ...)")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    from pgpo_train.data.loading import tiny_dataset_path

    data = tiny_dataset_path(seed=0)
    import torch

    machine = {
        "cpu": cpu_model(),
        "cpu_cores_visible": os.cpu_count(),
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if a.device == "cuda" else 0,
        "torch": torch.__version__,
        "note": a.machine,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    rows = []
    for n in [int(x) for x in a.nproc.split(",")]:
        r = run_throughput(n, a, data)
        print(json.dumps(r), flush=True)
        rows.append(r)
    unshard = None if a.skip_unshard else run_unshard(a)
    if unshard:
        print(json.dumps(unshard), flush=True)
    doc = {"machine": machine, "config": vars(a), "throughput": rows, "unshard": unshard}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = [
        f"# pgpo-train data parallel, {machine['device']} ({machine['cpu']}, {machine['cpu_cores_visible']} cores)",
        "",
        f"{machine['date_utc']} UTC, torch {machine['torch']}. {a.machine}",
        "",
        (
            f"Tiny model, {a.algo}, {a.prompts} prompts x {a.group_size} responses, up to {a.max_new_tokens} new "
            f"tokens, {a.steps} steps (the first left out), dynamic sampling off. Median over steps."
        ),
        "",
        "| processes | tokens/step | rollout tok/s | update tok/s | step s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        upd = f"{r['update_tok_s']:.0f}" if r["update_tok_s"] else "-"
        lines.append(
            f"| {r['nproc']} | {r['tokens_per_step']:.0f} | {r['rollout_tok_s']:.0f} | {upd} | {r['step_s']:.2f} |"
        )
    if unshard:
        lines += [
            "",
            f"Generation under FSDP2, 2 ranks, {unshard['batch']} x {unshard['new_tokens']} new tokens (greedy):",
            "",
            "| policy during generate | tok/s (per rank) |",
            "|---|---|",
            f"| sharded (all-gather of every layer per token) | {unshard['per_token_all_gather']:.0f} |",
            f"| unsharded once (distributed.full_params) | {unshard['unshard_once']:.0f} |",
            "",
            f"Unsharding once: {unshard['speedup']:.2f}x.",
        ]
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
