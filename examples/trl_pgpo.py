"""PGPO with TRL's GRPOTrainer on a Qwen2.5-VL: the tiny embedded model by default, a real checkpoint by flag.

    python examples/trl_pgpo.py                                   # tiny Qwen2.5-VL, SFT-warmed, count task, CPU
    python examples/trl_pgpo.py --model Qwen/Qwen2.5-VL-3B-Instruct --dataset /path/to/local/dataset \
        --max-steps 200 --bf16 --num-generations 5 --max-completion-length 2048

`--dataset` is anything `datasets.load_dataset` reads with image / problem / answer columns (names by flag); by
default the synthetic count task is generated locally. The reward is the paper's 0.9 * accuracy + 0.1 * format.
Everything PGPO adds is `PGPOConfig(pgpo_*)` and `PGPOGRPOTrainer` in place of GRPOConfig / GRPOTrainer.

The tiny default model is random, so it first gets a short supervised warm-up on the count task's reference
responses (`--sft-steps`, 50 by default, ~10 s on a CPU), as `pgpo-train` does: a random policy never writes
`<think>...</think>\boxed{}`, every reward is 0, every advantage 0, and GRPO logs loss 0 and grad_norm 0. After the
warm-up it sometimes counts right, so rewards differ within a group and the PGPO steps have something to learn from.
"""

from __future__ import annotations

import argparse

from pgpo_train.data.loading import build_prompt
from pgpo_train.data.loading import decode_image
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.data.rewards import compute_score
from pgpo_train.integrations import PGPOConfig
from pgpo_train.integrations import PGPOGRPOTrainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--model", default=None, help="HF checkpoint path/name (default: the tiny random Qwen2.5-VL)")
    p.add_argument("--dataset", default=None, help="datasets.load_dataset path/name (default: synthetic count task)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default="image")
    p.add_argument("--problem-column", default="problem")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--prompt-template", default="tiny", help="'tiny' or a format string with {question}")
    p.add_argument("--max-samples", type=int, default=64, help="records to keep (0 = all)")
    # GRPO / DAPO-style optimisation (TRL's names)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--batch-size", type=int, default=8, help="completions per device per step")
    p.add_argument("--num-generations", type=int, default=4, help="G responses per prompt")
    p.add_argument("--max-completion-length", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss-type", default="dapo", help="TRL loss type (dapo = token-level mean, the paper's)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output-dir", default="runs/trl_pgpo")
    p.add_argument("--sft-steps", type=int, default=-1,
                   help="supervised warm-up steps before RL (-1 = 50 for the tiny default model, 0 with --model)")
    # PGPO
    p.add_argument("--estimator", default="full", choices=["full", "k3"])
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--beta", type=float, default=2.0, help="PGPO amplification (not the KL coefficient)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    return p.parse_args(argv)


def load_policy(path: str | None):
    """(model, processor): a checkpoint, or the tiny embedded Qwen2.5-VL built in memory."""
    if path is None:
        from pgpo_train.models.tiny import build_tiny

        return build_tiny(seed=0)
    from transformers import AutoModelForImageTextToText

    from pgpo_train.models.processor import (
        load_processor,  # AutoProcessor, or its parts where the video processor cannot load
    )

    return AutoModelForImageTextToText.from_pretrained(path, dtype="auto"), load_processor(path)


def load_dataset(args):
    """TRL's multimodal format: {"prompt": chat messages with an image slot, "image": PIL, "answer": str}."""
    import datasets

    columns = {"image": args.image_column, "problem": args.problem_column, "answer": args.answer_column}
    raw = load_split(args.dataset or tiny_dataset_path(), args.split, columns, args.max_samples)
    rows = []
    for r in raw:
        image = decode_image(r[args.image_column])
        if image is None:
            continue  # undecodable image: skipped, as the trainer's own loader does
        rows.append({"prompt": build_prompt(r[args.problem_column], args.prompt_template), "image": image,
                     "answer": str(r[args.answer_column])})
    return datasets.Dataset.from_list(rows)


def warm_up(model, processor, steps: int, seed: int = 0) -> None:
    """`steps` supervised steps (pgpo-train's SFT step, batch 16, lr 2e-3) on the count task's reference responses."""
    if steps <= 0:
        return
    import torch

    from pgpo_train.data.tasks import make_count_records
    from pgpo_train.models.policy import make_optimizer
    from pgpo_train.run.config import TrainConfig
    from pgpo_train.step.update import sft_step

    cfg = TrainConfig(sft_lr=2e-3).resolved()  # the tiny task's prompt template and token budget
    optimizer = make_optimizer(model, cfg.sft_lr, 0.0)
    records = make_count_records(16 * steps, seed=seed + 7)  # not the RL prompts' seed
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(steps):
            m = sft_step(model, optimizer, processor, records[16 * s:16 * (s + 1)], cfg, device)
    print(f"SFT warm-up: {steps} steps, last loss {m['sft/loss']:.3f}")


def paper_reward(completions, answer, **kwargs):
    """0.9 * accuracy + 0.1 * format (`<think>...</think>` then `\\boxed{}`), per completion."""
    return [compute_score(c[0]["content"], a)["score"] for c, a in zip(completions, answer)]


def main(argv=None):
    args = parse_args(argv)
    model, processor = load_policy(args.model)
    warm_up(model, processor, (50 if args.model is None else 0) if args.sft_steps < 0 else args.sft_steps)
    config = PGPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=args.temperature, loss_type=args.loss_type,
        epsilon=0.2, epsilon_high=0.28, beta=0.0,  # DAPO: clip 0.2 / 0.28, no KL penalty (docs/method.md#recipe)
        bf16=args.bf16, use_cpu=not _cuda(), logging_steps=1, report_to=[], save_strategy="no",
        pgpo_estimator=args.estimator, pgpo_tau=args.tau, pgpo_beta=args.beta, pgpo_backend=args.backend,
    )
    trainer = PGPOGRPOTrainer(model=model, reward_funcs=paper_reward, args=config, train_dataset=load_dataset(args),
                              processing_class=processor)
    trainer.train()
    for row in trainer.state.log_history:
        if "pgpo/kl_mean" in row:
            print({k: row[k] for k in ("step", "loss", "reward", "reward_std", "pgpo/kl_mean", "pgpo/weight_max",
                                       "pgpo/frac_above_tau")})
    return trainer


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
