"""The PGPO recipe: the training loop and nothing else (nanoGPT's / torchtune's sense of a recipe; no module imports
it). Every phase of a step is a library function it calls:

  setup            pgpo_train.models.policy     device, seeds, the policy (tiny or from_pretrained), optimizers
  SFT warm-up      pgpo_train.step.update     sft_step: mean token NLL of the reference responses, with the image
  RL step (SPEC section 3):
  1. rollout       pgpo_train.step.sampling   G sampled responses per prompt (HF generate), scored by the reward, group
                                         advantages, DAPO's dynamic sampling and refill (pgpo_train.step.refill)
  2. scoring       pgpo_train.step.scoring    old log-probs with the image and (pgpo) the text-only pass, under no_grad,
                                         micro-batch by micro-batch; token KL -> PGPO weights -> A_t = A * w~_t
  3. update        pgpo_train.step.update     clipped policy-gradient loss (DAPO: clip 0.2/0.28, token-mean), AdamW
  eval, logging    pgpo_train.step.sampling (evaluate_on_ranks), pgpo_train.run.run_log (metrics.jsonl, curves, summary)
Batches and both passes' forward kwargs (explicit positions, SPEC section 4) are pgpo_train.step.batching's, built on
pgpo_train.models.model_family; the RL math is pgpo_train.rl.core_algos'.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import torch
from safetensors import SafetensorError

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import check_first_rows
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.models.lm_head import use_fused_lm_head
from pgpo_train.models.policy import load_policy
from pgpo_train.models.policy import make_optimizer
from pgpo_train.models.policy import resolve_device
from pgpo_train.models.policy import seed_everything
from pgpo_train.rl.nonfinite import check_finite_metrics
from pgpo_train.rl.nonfinite import check_token_advantages
from pgpo_train.run import dist_checkpoint
from pgpo_train.run import distributed
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.checkpoint import read_trainer_state
from pgpo_train.run.checkpoint import save_checkpoint
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.run_log import Logger
from pgpo_train.run.run_log import eval_summary
from pgpo_train.run.run_log import write_curves
from pgpo_train.run.rundir import open_run_dir
from pgpo_train.run.signals import StopOnSignal
from pgpo_train.run.signals import TrainingInterrupted
from pgpo_train.run.signals import stop_requested_anywhere
from pgpo_train.run.validate import check_sources
from pgpo_train.step.sampling import evaluate_on_ranks
from pgpo_train.step.sampling import sample_batch
from pgpo_train.step.scoring import old_logp_and_scores
from pgpo_train.step.scoring import token_advantages
from pgpo_train.step.update import policy_update
from pgpo_train.step.update import sft_step
from pgpo_train.step.update import sft_text_rows


def train(cfg: TrainConfig) -> dict:
    """Runs SFT warm-up (if any) then RL; returns a summary dict. Resumable from cfg.out_dir.

    Every setting, the model and the dataset are checked before any work (ValueError naming the flag). The run dir
    is locked for the run (one writer). SIGINT/SIGTERM finish the step, checkpoint, raise TrainingInterrupted.
    """
    cfg = cfg.resolved()
    check_sources(cfg)
    dp = distributed.setup(resolve_device(cfg).type)  # torchrun: process group + FSDP2; else SINGLE (no change)
    dp.check_config(cfg)
    run_dir = functools.partial(open_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
    with distributed.on_writer(dp, run_dir), StopOnSignal() as stop:  # torchrun: rank 0 locks and writes
        return _train(cfg, stop, dp)


def _train(cfg: TrainConfig, stop: StopOnSignal, dp=distributed.SINGLE) -> dict:
    """train()'s body, in a locked run dir."""
    device = resolve_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    if dp.is_writer:  # torchrun: rank 0 holds the run dir (train() opened it there only)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    # data: the generated tiny task unless a dataset is given
    data_path = cfg.dataset or tiny_dataset_path(seed=0, task=cfg.task, filler=cfg.task_filler)
    columns = {"image": cfg.image_column, "problem": cfg.problem_column, "answer": cfg.answer_column}
    if cfg.sft_steps > 0:
        columns["solution"] = cfg.solution_column
    train_ds = load_split(data_path, cfg.split, columns, cfg.max_samples)
    check_first_rows(train_ds, columns)  # wrong columns fail here, not after the model loaded

    try:
        model, processor = load_policy(cfg, device)
    except (OSError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {cfg.model or '(embedded tiny)'}: cannot load it: {first}") from e
    # resolved once, before any step: "on" with an unsupported lm_head fails here, not mid-run
    fused_lm_head = use_fused_lm_head(cfg.pgpo.fused_lm_head, model, device)  # every algo's passes (issue 16)
    small = sum(p.numel() for p in model.parameters()) < 50_000_000
    if not cfg.threads and device.type == "cpu" and small:
        # our choice: a tiny model's matmuls only thrash with more threads (4x slower on a busy 2-core box)
        torch.set_num_threads(1)
    if dp.world > 1:  # every rank built the same model; each keeps its shard and samples with its own RNG stream
        model = distributed.shard_policy(model, device, cfg.fsdp_cpu_offload)
        dist_checkpoint.fresh_rng(cfg.seed, 0, dp.rank)
    eval_records = []
    if cfg.eval_every > 0:
        try:
            eval_ds = load_split(
                data_path, cfg.eval_split, {k: v for k, v in columns.items() if k != "solution"}, cfg.eval_size
            )
            eval_records = RecordStream(eval_ds, columns | {"solution": None}, Sampler(len(eval_ds), 0)).next_batch(
                len(eval_ds)
            )
        except ValueError as e:
            print(f"pgpo-train: no eval ({e})")

    # state; resume restores all of it. Checkpoints are written in both phases; the optimizer a checkpoint holds is
    # the one of its phase ("sft" before step sft_end, "rl" from the SFT -> RL switch on).
    step, data_pos, skipped, skipped_empty, resumed_from = 0, 0, 0, 0, None
    sft_end, sft_accs = cfg.sft_steps, []  # sft_end: the step the warm-up ends at (earlier with --sft-stop-acc)
    optimizer = make_optimizer(model, cfg.sft_lr if cfg.sft_steps > 0 else cfg.lr, cfg.weight_decay)
    if cfg.resume:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
        saved = read_trainer_state(path)
        in_sft = saved["step"] < saved.get("sft_end", cfg.sft_steps)
        optimizer = make_optimizer(model, cfg.sft_lr if in_sft else cfg.lr, cfg.weight_decay)
        st = dist_checkpoint.load(path, model, optimizer, dp, cfg.seed)
        step, data_pos, skipped = st["step"], st["data_pos"], st["skipped_images"]
        skipped_empty = st.get("skipped_empty", 0)
        sft_end = st.get("sft_end", cfg.sft_steps)
        sft_accs = list(st.get("sft_accs", []))
        resumed_from = path
    sampler = Sampler(len(train_ds), cfg.seed, data_pos)
    stream = RecordStream(train_ds, columns, sampler)
    stream.skipped_images, stream.skipped_empty = skipped, skipped_empty
    logger = (
        Logger(cfg.out_dir, cfg.tensorboard, truncate_after=step if resumed_from else None) if dp.is_writer else None
    )
    save = save_checkpoint if dp.world == 1 else functools.partial(dist_checkpoint.save, dp)

    def state():
        return {
            "step": step,
            "phase": "sft" if step < sft_end else "rl",
            "data_pos": sampler.position,
            "skipped_images": stream.skipped_images,
            "skipped_empty": stream.skipped_empty,
            "sft_end": sft_end,
            "sft_accs": list(sft_accs),
            "config": dataclasses.asdict(cfg),
        }

    total = sft_end + cfg.steps
    bar = None
    if cfg.progress and dp.is_writer:
        from tqdm.auto import tqdm  # lazy: only with a progress bar

        bar = tqdm(total=total, initial=step, desc=f"{cfg.algo}", dynamic_ncols=True)
    t_start = time.perf_counter()
    last_eval = {}
    saved_at = step if resumed_from else -1  # the step of the newest checkpoint
    stop.arm()
    while step < total:
        requested = stop.requested if dp.world == 1 else stop_requested_anywhere(stop.requested, device)
        if requested:  # a signal came during the step just finished (torchrun: on any rank): checkpoint, stop
            if saved_at != step and step > 0:
                save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
            if bar:
                bar.close()
            if logger:
                logger.close()
            raise TrainingInterrupted(requested, step, latest_checkpoint(ckpt_dir), cfg.out_dir)
        # --- SFT warm-up
        if step < sft_end:
            recs = stream.next_batch(cfg.sft_batch_size)
            # the text-only rows are drawn over the global batch, then sharded with it (torchrun = one process)
            text_rows = sft_text_rows(cfg.seed, step, len(recs), cfg.sft_text_only_prob)
            mine = dp.shard(list(range(len(recs))))
            recs, text_rows = [recs[i] for i in mine], text_rows[mine]
            m = sft_step(model, optimizer, processor, recs, cfg, device, dp, fused_lm_head, text_rows)
            m = dp.merge_metrics(m, len(recs), 0.0)
            step += 1
            check_finite_metrics(step, m, ("sft/loss", "sft/grad_norm"))
            sft_accs = (sft_accs + [m["sft/seq_acc"]])[-3:]
            if cfg.sft_stop_acc > 0 and len(sft_accs) == 3 and sum(sft_accs) / 3 >= cfg.sft_stop_acc:
                sft_end, total = step, step + cfg.steps  # warm enough: RL starts now
                if bar:
                    bar.total = total
            if step == sft_end:
                if eval_records:
                    last_eval = evaluate_on_ranks(model, processor, eval_records, cfg, device, dp)
                    m.update(last_eval)
                optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)  # our choice: fresh AdamW for RL
            if logger:
                logger.log(step, {"phase": "sft", **m})
            if step == sft_end or (cfg.save_every > 0 and step % cfg.save_every == 0):
                save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
                saved_at = step
            if bar:
                bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
                bar.update(1)
            continue

        # --- RL step
        times: dict = {}
        t0 = time.perf_counter()
        batch, metrics, texts, filler = sample_batch(model, processor, stream, cfg, device, times, dp)
        metrics["pgpo/fused_lm_head"] = float(fused_lm_head)  # which path every pass took (1: hidden states)
        # this rank's responses and kept tokens, to weigh its metrics (torchrun: every rank samples as many)
        n_resp, n_tok = len(texts), 0.0
        kept_anywhere = dp.any(batch is not None)
        if batch is not None:
            with dp.full_params(model):
                batch.update(old_logp_and_scores(model, batch, cfg, times, fused_lm_head))
            tok_adv, w_m = token_advantages(batch, cfg, times, step)
            check_token_advantages(step + 1, batch["advantages"], tok_adv, batch["response_mask"])
            metrics.update(w_m)
            metrics["actor/entropy"] = float(batch["entropy"][batch["response_mask"].bool()].mean())
            metrics.update(policy_update(model, optimizer, batch, tok_adv, cfg, times, dp, fused_lm_head))
            check_finite_metrics(step + 1, metrics, ("actor/loss", "actor/grad_norm"))
            n_tok = float(batch["response_mask"].sum())
        elif kept_anywhere:  # torchrun: another rank kept groups; this one pairs their collectives with zero weight
            with dp.full_params(model):
                pass
            metrics.update(policy_update(model, optimizer, filler, None, cfg, times, dp, fused_lm_head))
            check_finite_metrics(step + 1, metrics, ("actor/grad_norm",))  # global: every rank stops together
        # else: every group had equal rewards, also after the refill rounds -> no gradient signal this step
        step += 1
        metrics.update(times)
        metrics["timing/step"] = time.perf_counter() - t0
        metrics["data/skipped_images"] = stream.skipped_images
        metrics["data/skipped_empty"] = stream.skipped_empty
        metrics["data/epoch"] = sampler.position / sampler.n
        rl_step = step - sft_end
        metrics = dp.merge_metrics(metrics, n_resp, n_tok)
        if eval_records and cfg.eval_every > 0 and (rl_step % cfg.eval_every == 0 or step == total):
            last_eval = evaluate_on_ranks(model, processor, eval_records, cfg, device, dp)
            metrics.update(last_eval)
            metrics["sample/response"] = texts[0]  # one rollout response per eval, to eyeball what the policy writes
        if logger:
            logger.log(step, {"phase": "rl", **metrics})
        if (cfg.save_every > 0 and rl_step % cfg.save_every == 0) or step == total:
            save(ckpt_dir, step, model, optimizer, state(), cfg.keep_checkpoints)
            saved_at = step
        if bar:
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['reward/acc']:.2f}")
            bar.update(1)
    if bar:
        bar.close()
    if logger:
        logger.close()
    curves = write_curves(cfg.out_dir) if dp.is_writer else None
    summary = {
        "out_dir": cfg.out_dir,
        "steps": step,
        "wall_s": time.perf_counter() - t_start,
        "skipped_images": stream.skipped_images,
        "skipped_empty": stream.skipped_empty,
        "resumed_from": resumed_from,
        "sft_steps": sft_end,
        "rl_steps": step - sft_end,
        "curves": curves,
        **last_eval,
        **eval_summary(os.path.join(cfg.out_dir, "metrics.jsonl"), sft_end, len(eval_records)),
    }
    if dp.is_writer:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return {**summary, "model": model, "processor": processor}

