"""One whole PGPO step of pgpo-train on the tiny Qwen2.5-VL with Qwen's vocabulary size (V = 152064), fused lm head on
vs off: peak RSS of the training process and time per response token.

    PYTHONPATH=$PWD python benchmarks/results/logp/train_step_memory.py --tokens 256,1024,4096 \
        --out benchmarks/results/logp/train_step_v152064

The tiny model's tokenizer gets filler tokens up to 152064 entries, so its embeddings and lm_head are [152064, 64]
(hidden 64, as in the issue) and sampled ids decode. Each run is a fresh `python -m pgpo_train` process: 1 RL step,
no SFT, 1 prompt x 2 responses, micro-batch 1 (one response of T tokens per forward + backward), dynamic sampling off
(the random model's rewards are all 0; the update still runs every micro-batch's forward and backward); the random
model over 152064 ids rarely samples a stop id, so responses run to about T tokens (the mean length is recorded).
Extra peak = the step's peak RSS minus that of the same command with --steps 0 (model, data, optimizer set-up). Time: timing/update and timing/old_logp from metrics.jsonl per response token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

V = 152064


def build_checkpoint(path: str) -> str:
    from pgpo_train.models.processor import make_processor
    from pgpo_train.models.tiny import build_image_processor
    from pgpo_train.models.tiny import build_tiny_model
    from pgpo_train.models.tiny import build_tokenizer
    from pgpo_train.models.tiny import save_tiny_checkpoint

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = build_tokenizer()
    tok.add_tokens([f"<v{i}>" for i in range(V - len(tok))])
    assert len(tok) == V
    model = build_tiny_model(tok, seed=0)
    assert model.lm_head.out_features == V
    return save_tiny_checkpoint(path, model=model, processor=make_processor(tok, build_image_processor()))


def run(ckpt: str, data: str, out_dir: str, tokens: int, fused: str, steps: int) -> dict:
    argv = [sys.executable, "-m", "pgpo_train", "--model", ckpt, "--dataset", data, "--prompt-template", "tiny",
            "--out-dir", out_dir, "--overwrite", "--steps", str(steps), "--sft-steps", "0", "--prompts-per-step", "1",
            "--group-size", "2", "--mini-batch-size", "2", "--micro-batch-size", "1", "--max-new-tokens", str(tokens),
            "--dynamic-sampling", "off", "--eval-every", "0", "--save-every", "0", "--no-progress",
            "--no-tensorboard", "--pgpo.fused-lm-head", fused, "--lr", "1e-4"]
    env = dict(os.environ)
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far: one child at a time
    if proc.returncode != 0:
        return {"status": "failed", "reason": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    rec = {"status": "ok", "peak_rss_bytes": peak_kb * 1024, "wall_s": wall, "monotone_warning": peak_kb < before}
    if steps:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rl = [json.loads(x) for x in f][-1]
        rec.update({k: rl.get(k) for k in ("timing/update", "timing/old_logp", "timing/text_only",
                                           "timing/kl_reshape", "pgpo/fused_lm_head", "actor/entropy")})
        rec["response_len_mean"] = rl.get("response/length_mean")
        n_tok = 2 * (rec["response_len_mean"] or tokens)
        rec["update_ms_per_token"] = 1e3 * rl["timing/update"] / n_tok
    return rec


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="256,1024,4096")
    p.add_argument("--out", default="benchmarks/results/logp/train_step_v152064")
    p.add_argument("--work", default="/tmp/pgpo_logp_step")
    p.add_argument("--modes", default="on,off", help="--pgpo.fused-lm-head values to run")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    ckpt = build_checkpoint(os.path.join(a.work, "tiny-v152064"))
    from pgpo_train.data.tasks import save_count_dataset

    data = save_count_dataset(os.path.join(a.work, "count"), n_train=16, n_test=4, seed=0)
    rows = []
    for n in [int(x) for x in a.tokens.split(",")]:
        for fused in a.modes.split(","):
            # a fresh getrusage high-water mark per measurement: each in its own driver process
            cmd = [sys.executable, __file__, "--one", json.dumps([ckpt, data, a.work, n, fused])]
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
            line = [x for x in res.stdout.splitlines() if x.startswith("STEP ")]
            rec = json.loads(line[-1][5:]) if line else {"status": "failed", "reason": res.stderr[-300:]}
            rec.update({"tokens": n, "fused_lm_head": fused})
            rows.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
            with open(a.out + ".json", "w") as f:
                json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    lines = [("| T | fused lm head | mean response len | step peak RSS MiB | set-up peak MiB | extra MiB | "
             "update ms / token | old-logp s | update s |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['tokens']} | {r['fused_lm_head']} | {r.get('status')}: {r.get('reason')} | | | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['fused_lm_head']} | {r['response_len_mean']:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['base_peak_rss_bytes'] / 2**20:.0f} | {r['extra_bytes'] / 2**20:.0f} | "
                     f"{r['update_ms_per_token']:.2f} | {r['timing/old_logp']:.2f} | {r['timing/update']:.2f} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def one(spec: str) -> None:
    ckpt, data, work, n, fused = json.loads(spec)
    base = run(ckpt, data, os.path.join(work, f"base-{n}-{fused}"), n, fused, steps=0)
    step = run(ckpt, data, os.path.join(work, f"step-{n}-{fused}"), n, fused, steps=1)
    if base["status"] == "ok" and step["status"] == "ok":
        step["base_peak_rss_bytes"] = base["peak_rss_bytes"]
        step["extra_bytes"] = step["peak_rss_bytes"] - base["peak_rss_bytes"]
    print("STEP " + json.dumps(step), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[2])
        raise SystemExit(0)
    raise SystemExit(main())
