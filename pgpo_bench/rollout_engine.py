"""Rollouts through HF generate vs a colocated vLLM engine (--rollout-engine hf|vllm), timed inside pgpo-train's own
loop: wall time per RL step and its rollout phase, rollout tokens/s, the weight sync, the engine's start-up.

Each engine runs in its own process (the same config, seed and data), so vLLM's process-wide state (its KV cache
reservation, its torch.compile / thread settings) never touches the HF run. Dynamic sampling is off, so every step
samples exactly one round of prompts_per_step x group_size responses with either engine; the first RL step is
reported apart (warm-up) and the rest averaged.

    python -m pgpo_bench.rollout_engine --out benchmarks/results/rollout_engine            # CPU, embedded tiny model
    python -m pgpo_bench.rollout_engine --device cuda --model Qwen/Qwen2.5-VL-3B-Instruct --max-new-tokens 256 ...

Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def run_one(engine: str, args) -> dict:
    """pgpo-train with --rollout-engine `engine` (in this process); the per-step timings of its metrics.jsonl."""
    from pgpo_train.step import vllm_engine

    if vllm_engine.vllm_available():
        vllm_engine.prepare_vllm()  # the torchvision guard, for the HF run's image processor too
    from pgpo_train.recipe.train import train
    from pgpo_train.run.config import TrainConfig

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=args.model, out_dir=os.path.join(out, "run"), steps=args.steps, sft_steps=0, eval_every=0,
            dynamic_sampling="off", prompts_per_step=args.prompts_per_step, group_size=args.group_size,
            max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed, rollout_engine=engine,
            tensorboard=False, progress=False, save_every=0, mini_batch_size=args.prompts_per_step * args.group_size,
            tiny_head_dim=args.tiny_head_dim,  # the same model for both engines (vLLM needs 32)
        )
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "run", "metrics.jsonl")) as f:
            lines = [json.loads(x) for x in f if '"phase": "rl"' in x]
    B = args.prompts_per_step * args.group_size
    steps = [
        {
            "step_s": x["timing/step"],
            "rollout_s": x["timing/rollout"],
            "sync_s": x.get("timing/vllm_sync", 0.0),
            "tokens": x["response/length_mean"] * B,
            "gap_max": x.get("rollout/vllm_logp_gap_max"),
        }
        for x in lines
    ]
    rest = steps[1:] or steps
    mean = lambda k: statistics.fmean(s[k] for s in rest)
    tokens = sum(s["tokens"] for s in rest)
    return {
        "engine": engine,
        "steps": len(steps),
        "first_step_s": steps[0]["step_s"],
        "step_s": mean("step_s"),
        "rollout_s": mean("rollout_s"),
        "sync_s": mean("sync_s"),
        "rollout_tokens_per_s": tokens / sum(s["rollout_s"] for s in rest),
        "tokens_per_step": tokens / len(rest),
        "run_wall_s": wall,
        "startup_s": wall - sum(s["step_s"] for s in steps),  # model + data + (vllm) engine start, and the last save
        "gap_max": max((s["gap_max"] for s in steps if s["gap_max"] is not None), default=None),
        "wall_s_summary": summary["wall_s"],
    }


def to_markdown(results: list[dict], meta: dict) -> str:
    head = (f"# Rollout engine: HF generate vs colocated vLLM ({meta['machine']})\n\n"
            f"`{meta['command']}`\n\n{meta['setup']}\n\n"
            "| engine | RL step (s) | rollout (s) | weight sync (s) | rollout tokens/s | tokens/step | first step (s) "
            "| start-up + save (s) | max logp gap |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        gap = "" if r["gap_max"] is None else f"{r['gap_max']:.1e}"
        rows.append(f"| {r['engine']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['sync_s']:.3f} | "
                    f"{r['rollout_tokens_per_s']:.0f} | {r['tokens_per_step']:.0f} | {r['first_step_s']:.2f} | "
                    f"{r['startup_s']:.1f} | {gap} |\n")
    return head + "".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    p.add_argument("--model", default="", help="empty: the embedded tiny model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6, help="RL steps per engine (the first is reported apart)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny-head-dim", type=int, default=32, help="embedded model's head size (vLLM needs 32)")
    p.add_argument("--out", default="benchmarks/results/rollout_engine")
    p.add_argument("--machine", default="", help="described in the report (default: platform + CPU count)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run this engine, print its JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0
    results = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, "-m", "pgpo_bench.rollout_engine", "--one", engine,
               *[a for a in (argv if argv is not None else sys.argv[1:])]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{engine}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(found[-1][len("RESULT "):]))
        print(json.dumps(results[-1]))
    machine = args.machine or f"{platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}"
    meta = {
        "machine": machine,
        "command": "python -m pgpo_bench.rollout_engine " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": (f"pgpo-train's loop, {args.model or f'embedded tiny model (head size {args.tiny_head_dim})'}, "
                  f"{args.steps} RL steps "
                  f"(first apart), {args.prompts_per_step} prompts x {args.group_size} responses of <= "
                  f"{args.max_new_tokens} tokens, dynamic sampling off, seed {args.seed}; means over steps 2.."),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(to_markdown(results, meta))
    print(to_markdown(results, meta))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
