"""`pgpo-train eval MODEL_DIR|RUN_DIR`: the paper's evaluation of a policy on a dataset split.

Per prompt: one greedy response and k sampled ones (the paper reports avg@8). avg@k is the mean accuracy over the k
samples, averaged over prompts; pass@k the share of prompts with at least one right sample (the unbiased estimator
1 - C(n - c, k) / C(n, k) with n = k; a sample is right when its accuracy is >= 0.5); greedy accuracy the greedy response's. Accuracy is the training reward's
(math-verify on the last \\boxed{}), with the training prompt template. Every response goes to responses.jsonl, the
numbers to summary.json, a table to stdout.

Where the settings come from: a run dir's config.json, or the pgpo_config.yaml an exported model folder carries (the
run's prompt template, columns, dataset, lengths); flags override them. Without a dataset: the embedded task's test
split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

from pgpo_train.data.loading import decode_images
from pgpo_train.data.loading import is_empty
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.rewards import last_boxed
from pgpo_train.models import model_family
from pgpo_train.models.policy import eos_ids
from pgpo_train.run.config import TrainConfig
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import model_inputs
from pgpo_train.step.sampling import reward_of

# %% the command line


def eval_parser(parser_cls=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_cls(
        prog="pgpo-train eval",
        description="avg@k, pass@k and greedy accuracy of a model on a dataset split (math-verify answers, the "
        "training prompt template); every response to RESULTS/responses.jsonl, a summary table to stdout.",
    )
    p.add_argument("target", help="a model folder (pgpo-train export, or any supported VLM) or a run directory")
    p.add_argument("--dataset", default="", help="hub name or local path (default: the run's; else the embedded task)")
    p.add_argument("--split", default="", help="split to evaluate (default: the run's --eval-split, test)")
    p.add_argument("--k", type=int, default=8, help="sampled responses per prompt for avg@k / pass@k (0: greedy only)")
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="also one greedy response")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the run's, 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length cap (0: the run's)")
    p.add_argument("--max-samples", type=int, default=0, help="first N prompts of the split (0: all)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per generate call (0: sized to the model)")
    p.add_argument("--prompt-template", default="", help="'{question}' format string (default: the run's)")
    p.add_argument("--image-column", default="", help="(default: the run's, image)")
    p.add_argument("--problem-column", default="", help="(default: the run's, problem)")
    p.add_argument("--answer-column", default="", help="(default: the run's, answer)")
    p.add_argument("--reward", default=None, help="module:function verifiable reward (default: the run's; the "
                   "paper's accuracy + format)")
    p.add_argument("--out", default="", help="results folder (default: TARGET/eval/DATASET-SPLIT)")
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def _check_args(a) -> None:
    for name, ok, expected in (
        ("--k", a.k >= 0, ">= 0"),
        ("--max-new-tokens", a.max_new_tokens >= 0, ">= 0 (0: the run's)"),
        ("--max-samples", a.max_samples >= 0, ">= 0 (0: all)"),
        ("--batch-size", a.batch_size >= 0, ">= 0 (0: sized to the model)"),
        ("--temperature", a.temperature is None or a.temperature > 0, "> 0"),
        ("--top-p", a.top_p is None or 0 < a.top_p <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {getattr(a, name[2:].replace('-', '_'))}")
    if a.k == 0 and not a.greedy:
        raise ValueError("--k 0 with --no-greedy evaluates nothing")


# %% what to evaluate


def resolve_target(target: str) -> tuple[str, str, TrainConfig]:
    """(kind "run" | "model", the model folder or "" for a run's checkpoint, the settings it was trained with)."""
    from pgpo_train.models.hf_export import MODEL_DIR
    from pgpo_train.models.hf_export import RUN_CONFIG
    from pgpo_train.models.hf_export import run_config

    if os.path.isdir(os.path.join(target, "checkpoints")) or (
        os.path.isfile(os.path.join(target, "config.json")) and os.path.isfile(os.path.join(target, "metrics.jsonl"))
    ):
        cfg = run_config(target)
        final = os.path.join(target, MODEL_DIR)
        return "run", final if os.path.isfile(os.path.join(final, "config.json")) else "", cfg
    if os.path.isdir(target):
        from pgpo_train.run.validate import check_model_dir

        check_model_dir(target, "pgpo-train eval")
        saved = os.path.join(target, RUN_CONFIG)
        if os.path.isfile(saved):
            from pgpo_train.run.config_file import config_from_file

            cfg = config_from_file(saved)
        else:  # a model pgpo-train did not train: the paper's template, dataset from the flags
            cfg = TrainConfig(model=target)
        return "model", target, cfg
    raise ValueError(f"pgpo-train eval: {target} is neither a model folder (config.json) nor a run directory")


def eval_settings(a, cfg: TrainConfig) -> TrainConfig:
    """The run's settings with the flags' overrides, 'auto' values resolved as training resolves them."""
    over = {"device": a.device, "out_dir": cfg.out_dir or "runs/eval", "resume": False}
    for name in ("dataset", "prompt_template", "image_column", "problem_column", "answer_column"):
        if getattr(a, name):
            over[name] = getattr(a, name)
    if a.split:
        over["eval_split"] = a.split
    if a.max_new_tokens:
        over["max_new_tokens"] = a.max_new_tokens
    if a.temperature is not None:
        over["temperature"] = a.temperature
    if a.top_p is not None:
        over["top_p"] = a.top_p
    if a.reward is not None:
        over["reward"] = a.reward
    return dataclasses.replace(cfg, **over).resolved()


def load_records(cfg: TrainConfig, max_samples: int) -> tuple[list[dict], int, str]:
    """(records in split order, records skipped for an undecodable image or empty text, the dataset's path)."""
    path = cfg.dataset or tiny_dataset_path(seed=0, task=cfg.task, filler=cfg.task_filler)
    columns = {"image": cfg.image_column, "problem": cfg.problem_column, "answer": cfg.answer_column}
    ds = load_split(path, cfg.eval_split, columns, max_samples)
    records, skipped = [], 0
    for i, row in enumerate(ds):
        images = decode_images(row[cfg.image_column])
        if images is None or is_empty(row[cfg.problem_column]) or is_empty(row[cfg.answer_column]):
            skipped += 1
            continue
        records.append({"index": i, "images": images, "problem": str(row[cfg.problem_column]),
                        "answer": str(row[cfg.answer_column])})
    if not records:
        raise ValueError(f"dataset {path!r} split {cfg.eval_split!r}: no record has a decodable image and text")
    return records, skipped, path


# %% generation


def auto_batch_size(model, prompt_len: int, max_new_tokens: int, device: torch.device) -> int:
    """Sequences per generate call: on CUDA as many as half the free memory holds in KV cache (prompt + response
    tokens of every layer); on CPU 64 for a small model, 8 otherwise (our choice)."""
    n_params = sum(p.numel() for p in model.parameters())
    if device.type != "cuda":
        return 64 if n_params < 50_000_000 else 8
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(512, 0.5 * free // (per_token * (prompt_len + max_new_tokens)))))


@torch.no_grad()
def generate(model, processor, records: list[dict], cfg: TrainConfig, n: int, sample: bool, device) -> list[str]:
    """n responses per record (adjacent), sampled at cfg's temperature / top-p or greedy, decoded as training
    decodes them."""
    prompt = encode_prompts(processor, records, cfg.prompt_template, n, device)
    kw = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0} if sample else {
        "do_sample": False}
    stop = eos_ids(model, processor)
    out = model.generate(
        **model_inputs(prompt),
        **kw,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=model_family.special_ids(model),
        repetition_penalty=1.0,  # as the rollouts: the policy's own distribution
    )
    return processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


# %% the numbers


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c right (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(rows: list[dict], k: int, greedy: bool) -> dict:
    """summary.json's numbers from responses.jsonl's rows, each with its standard error over prompts."""
    out = {}
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        if r["mode"] == "sample":
            by_prompt.setdefault(r["index"], []).append(r)
    n_prompts = len({r["index"] for r in rows})
    out["n"] = n_prompts
    if greedy:
        acc = np.array([r["acc"] for r in rows if r["mode"] == "greedy"])
        out["greedy/acc"] = float(acc.mean())
        out["greedy/acc_se"] = float(math.sqrt(acc.mean() * (1 - acc.mean()) / len(acc)))
        out["greedy/format"] = float(np.mean([r["format"] for r in rows if r["mode"] == "greedy"]))
    if k:
        per = np.array([np.mean([r["acc"] for r in s]) for s in by_prompt.values()])  # [prompts]
        # a sample is right when its accuracy is >= 0.5: the default's is 0 or 1; a custom reward's may be graded
        passed = np.array([pass_at_k(len(s), sum(r["acc"] >= 0.5 for r in s), k) for s in by_prompt.values()])
        out[f"avg@{k}"] = float(per.mean())
        out[f"avg@{k}_se"] = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0
        out[f"pass@{k}"] = float(passed.mean())
        out[f"pass@{k}_se"] = float(passed.std(ddof=1) / math.sqrt(len(passed))) if len(passed) > 1 else 0.0
        out[f"format@{k}"] = float(np.mean([r["format"] for s in by_prompt.values() for r in s]))
    return out


def table(summary: dict, k: int) -> str:
    lines = [f"{'metric':<14}{'value':>8}{'+- se':>9}"]
    keys = [("greedy acc", "greedy/acc"), (f"avg@{k}", f"avg@{k}"), (f"pass@{k}", f"pass@{k}")]
    for label, key in keys:
        if key in summary:
            lines.append(f"{label:<14}{summary[key]:>8.3f}{summary[key + '_se']:>9.3f}")
    for label, key in (("greedy format", "greedy/format"), (f"format@{k}", f"format@{k}")):
        if key in summary:
            lines.append(f"{label:<14}{summary[key]:>8.3f}")
    return "\n".join(lines)


# %% the command


def run_eval(model, processor, cfg: TrainConfig, records: list[dict], k: int, greedy: bool, device,
             batch_size: int = 0, progress: bool = True, responses_path: str | None = None) -> list[dict]:
    """Every response's row (index, mode, sample, response, extracted, acc, format, reward), written to
    responses_path as they come (JSONL)."""
    model.eval()
    probe = encode_prompts(processor, records[:1], cfg.prompt_template, 1, device)
    bs = batch_size or auto_batch_size(model, probe["input_ids"].shape[1], cfg.max_new_tokens, device)
    per_prompt = k + int(greedy)
    prompts_per_call = max(1, bs // max(k, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records) * per_prompt, desc="eval", unit="resp", dynamic_ncols=True)
    rows = []
    f = open(responses_path, "w") if responses_path else None
    try:
        for i in range(0, len(records), prompts_per_call):
            recs = records[i : i + prompts_per_call]
            jobs = []
            if greedy:
                for j in range(0, len(recs), bs):  # greedy: one response per prompt, bs prompts per call
                    part = recs[j : j + bs]
                    jobs += [("greedy", r, 0, t) for r, t in zip(part, generate(model, processor, part, cfg, 1,
                                                                                   False, device))]
            if k:
                texts = generate(model, processor, recs, cfg, k, True, device)
                jobs += [("sample", r, s, texts[n * k + s]) for n, r in enumerate(recs) for s in range(k)]
            scores = reward_of(cfg)([t for *_, t in jobs], [rec for _, rec, _, _ in jobs])
            for (mode, rec, s, text), score in zip(jobs, scores):
                row = {"index": rec["index"], "mode": mode, "sample": s, "problem": rec["problem"],
                       "answer": rec["answer"], "response": text, "extracted": last_boxed(text),
                       "acc": score["acc"], "format": score["format"], "reward": score["score"]}
                rows.append(row)
                if f:
                    f.write(json.dumps(row) + "\n")
            if bar:
                bar.update(len(jobs))
    finally:
        if f:
            f.close()
        if bar:
            bar.close()
    return rows


def eval_main(a) -> dict:
    """The `pgpo-train eval` command: settings, model, records, generation, summary; returns the summary."""
    from pgpo_train.models.policy import load_policy
    from pgpo_train.models.policy import resolve_device
    from pgpo_train.models.policy import seed_everything

    _check_args(a)
    kind, folder, run_cfg = resolve_target(a.target)
    cfg = eval_settings(a, run_cfg)
    records, skipped, data_path = load_records(cfg, a.max_samples)  # a wrong column fails before the model loads
    reward_of(cfg).probe(records[0])  # a custom reward that cannot score fails here too
    device = resolve_device(cfg)
    t0 = time.perf_counter()
    if folder:
        # an exported folder holds merged weights: no LoRA adapters on top
        plain = dataclasses.replace(cfg, model=folder, gradient_checkpointing=False, freeze_vision=False,
                                    lora=dataclasses.replace(cfg.lora, rank=0))
        model, processor = load_policy(plain, device)
    else:  # a run without a final model folder: its latest checkpoint
        from pgpo_train.models.hf_export import load_checkpoint_model

        model, processor, _ = load_checkpoint_model(a.target)
        model = model.to(device)
    if device.type == "cpu" and not cfg.threads and sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)  # as training: a tiny model's matmuls only thrash with more threads
    seed_everything(a.seed)
    name = os.path.basename(os.path.normpath(data_path)) or "dataset"
    out = a.out or os.path.join(a.target, "eval", f"{name}-{cfg.eval_split}")
    os.makedirs(out, exist_ok=True)
    rows = run_eval(model, processor, cfg, records, a.k, a.greedy, device, a.batch_size, a.progress,
                    os.path.join(out, "responses.jsonl"))
    summary = {
        "target": a.target,
        "model": folder or "(latest checkpoint)",
        "dataset": data_path,
        "split": cfg.eval_split,
        "k": a.k,
        **summarize(rows, a.k, a.greedy),
        "skipped": skipped,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "prompt_template": cfg.prompt_template,
        "seed": a.seed,
        "wall_s": time.perf_counter() - t0,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"pgpo-train eval: {a.target} on {data_path} [{cfg.eval_split}], {summary['n']} prompts"
          + (f" ({skipped} skipped)" if skipped else "") + f", {summary['wall_s']:.0f}s")
    print(table(summary, a.k))
    print(f"pgpo-train eval: responses {os.path.join(out, 'responses.jsonl')}, summary {os.path.join(out, 'summary.json')}")
    return summary
