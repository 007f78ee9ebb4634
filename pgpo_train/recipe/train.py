"""The PGPO recipe: the training loop and nothing else (nanoGPT's / torchtune's sense of a recipe; no module imports
it). It reads top to bottom: train() -> setup() -> restore() -> sft_phase_step() / rl_phase_step() -> finish(); the run's
objects live in a Run, what the loop carries from step to step in a RunState. Every phase of a step is a library
function it calls:

  setup            pgpo_train.models.policy     device, seeds, the policy (tiny or from_pretrained), optimizers
  SFT warm-up      pgpo_train.step.update     sft_step: mean token NLL of the reference responses, with the image
  RL step (docs/method.md#rl-step):
  1. rollout       pgpo_train.step.sampling   G sampled responses per prompt (HF generate, or a colocated vLLM engine:
                                         pgpo_train.step.vllm_engine), scored by the reward, group
                                         advantages, DAPO's dynamic sampling and refill (pgpo_train.step.refill)
  2. scoring       pgpo_train.step.scoring    old log-probs with the image and (pgpo) the text-only pass, under no_grad,
                                         micro-batch by micro-batch; token KL -> PGPO weights -> A_t = A * w~_t
  3. update        pgpo_train.step.update     clipped policy-gradient loss (DAPO: clip 0.2/0.28, token-mean), AdamW
  eval, logging    pgpo_train.step.sampling (evaluate_on_ranks), pgpo_train.run.run_log (metrics.jsonl, curves, summary)
Batches and both passes' forward kwargs (explicit positions, docs/method.md#trainer-traps) are
pgpo_train.step.batching's, built on pgpo_train.models.model_family; the RL math is pgpo_train.rl.core_algos'.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from dataclasses import field

import torch
from safetensors import SafetensorError

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import check_first_rows
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import max_images_per_record
from pgpo_train.data.loading import record_images
from pgpo_train.data.loading import tiny_dataset_path
from pgpo_train.models.hf_export import export_run_model
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
from pgpo_train.run.config_file import config_yaml
from pgpo_train.run.run_log import Logger
from pgpo_train.run.run_log import eval_summary
from pgpo_train.run.run_log import write_curves
from pgpo_train.run.rundir import open_run_dir
from pgpo_train.run.signals import StopOnSignal
from pgpo_train.run.signals import TrainingInterrupted
from pgpo_train.run.signals import stop_requested_anywhere
from pgpo_train.run.validate import check_sources
from pgpo_train.step import vllm_engine
from pgpo_train.step.batching import check_images_per_prompt
from pgpo_train.step.sampling import evaluate_on_ranks
from pgpo_train.step.sampling import reward_of
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
    if cfg.rollout_engine == "vllm":  # first: vLLM's torchvision guard must precede transformers' image code
        try:
            vllm_engine.prepare_vllm()
        except ImportError as e:
            raise ValueError(str(e)) from e
    dp = distributed.setup(resolve_device(cfg).type)  # torchrun: process group + FSDP2; else SINGLE (no change)
    dp.check_config(cfg)
    run_dir = functools.partial(open_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
    with distributed.on_writer(dp, run_dir), StopOnSignal() as stop:  # torchrun: rank 0 locks and writes
        return _train(cfg, stop, dp)


def _train(cfg: TrainConfig, stop: StopOnSignal, dp=distributed.SINGLE) -> dict:
    """train()'s body, in a locked run dir: setup, restore, the SFT and RL steps, finish."""
    run = setup(cfg, dp)
    try:
        state = restore(run)
        open_logs(run, state)
        stop.arm()
        while state.step < state.total(cfg):
            stop_if_requested(run, state, stop)
            if state.step < state.sft_end:
                sft_phase_step(run, state)
            else:
                rl_phase_step(run, state)
        return finish(run, state)
    finally:
        if run.engine is not None:
            run.engine.close()


# %% the run: what setup builds and what the loop carries


@dataclass
class Run:
    """The objects a run is made of, built once by setup() (restore() replaces the optimizer)."""

    cfg: TrainConfig
    dp: object  # distributed.DataParallel (SINGLE outside torchrun)
    device: torch.device
    model: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer | None
    train_ds: object
    columns: dict
    eval_records: list
    fused_lm_head: bool
    ckpt_dir: str
    sampler: Sampler | None = None
    stream: RecordStream | None = None
    logger: Logger | None = None
    bar: object = None  # tqdm, writer rank only
    engine: object = None  # --rollout-engine vllm: step.vllm_engine.VLLMRollout, else None (HF generate)
    t_start: float = field(default_factory=time.perf_counter)

    def save(self, state: RunState) -> None:
        save = save_checkpoint if self.dp.world == 1 else functools.partial(dist_checkpoint.save, self.dp)
        save(self.ckpt_dir, state.step, self.model, self.optimizer, state.trainer_state(self),
             self.cfg.keep_checkpoints)
        state.saved_at = state.step
        if self.cfg.export_checkpoints:  # a model folder beside it: RUN_DIR/models/step-XXXXXXXX
            export_run_model(self.cfg, self.model, self.processor, self.dp, f"step-{state.step:08d}")


@dataclass
class RunState:
    """What the loop carries from step to step; a checkpoint's trainer state is built from it (trainer_state)."""

    step: int = 0
    sft_end: int = 0  # the step the warm-up ends at (earlier than --sft-steps with --sft-stop-acc)
    sft_accs: list = field(default_factory=list)  # the last 3 warm-up sequence accuracies (--sft-stop-acc)
    resumed_from: str | None = None
    saved_at: int = -1  # the step of the newest checkpoint
    last_eval: dict = field(default_factory=dict)

    def total(self, cfg: TrainConfig) -> int:
        return self.sft_end + cfg.steps

    def trainer_state(self, run: Run) -> dict:
        return {
            "step": self.step,
            "phase": "sft" if self.step < self.sft_end else "rl",
            "data_pos": run.sampler.position,
            "skipped_images": run.stream.skipped_images,
            "skipped_empty": run.stream.skipped_empty,
            "sft_end": self.sft_end,
            "sft_accs": list(self.sft_accs),
            "config": dataclasses.asdict(run.cfg),
        }


# %% setup and restore


def setup(cfg: TrainConfig, dp) -> Run:
    """Device, seeds and threads; the config written to the run dir; the data (columns checked on the first rows
    before the model loads), the policy (sharded under torchrun) and the eval records."""
    device = resolve_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if dp.is_writer:  # torchrun: rank 0 holds the run dir (train() opened it there only)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:  # pgpo-train --config RUN_DIR/config.yaml
            f.write(config_yaml(cfg))

    # data: the generated tiny task unless a dataset is given
    data_path = cfg.dataset or tiny_dataset_path(seed=0, task=cfg.task, filler=cfg.task_filler)
    columns = {"image": cfg.image_column, "problem": cfg.problem_column, "answer": cfg.answer_column}
    if cfg.sft_steps > 0:
        columns["solution"] = cfg.solution_column
    train_ds = load_split(data_path, cfg.split, columns, cfg.max_samples)
    check_first_rows(train_ds, columns)  # wrong columns fail here, not after the model loaded
    if cfg.reward:  # a custom reward is tried on one real record now, not mid-run
        reward_of(cfg).probe(RecordStream(train_ds, columns, Sampler(len(train_ds), cfg.seed)).next_batch(1)[0])

    try:
        model, processor = load_policy(cfg, device)
    except (OSError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {cfg.model or '(embedded tiny)'}: cannot load it: {first}") from e
    # resolved once, before any step: "on" with an unsupported lm_head fails here, not mid-run
    fused_lm_head = use_fused_lm_head(cfg.pgpo.fused_lm_head, model, device)
    small = sum(p.numel() for p in model.parameters()) < 50_000_000
    if not cfg.threads and device.type == "cpu" and small:
        # our choice: a tiny model's matmuls only thrash with more threads (4x slower on a busy 2-core box)
        torch.set_num_threads(1)
    eval_records = load_eval_records(cfg, data_path, columns)
    # several images per prompt (a list-valued image column): refused here for a processor that cannot lay them out
    n_images = max([max_images_per_record(train_ds, cfg.image_column)] + [len(record_images(r)) for r in eval_records])
    check_images_per_prompt(model, processor, n_images, cfg.prompt_template)
    engine = None
    if cfg.rollout_engine == "vllm":  # built from the whole model, before FSDP shards it; synced before each step
        engine = vllm_engine.VLLMRollout(model, processor, cfg, device, dp, max_images=n_images)
    if dp.world > 1:  # every rank built the same model; each keeps its shard and samples with its own RNG stream
        model = distributed.shard_policy(model, device, cfg.fsdp_cpu_offload)
        dist_checkpoint.fresh_rng(cfg.seed, 0, dp.rank)
    return Run(cfg=cfg, dp=dp, device=device, model=model, processor=processor, optimizer=None, train_ds=train_ds,
               columns=columns, eval_records=eval_records, fused_lm_head=fused_lm_head,
               ckpt_dir=os.path.join(cfg.out_dir, "checkpoints"), engine=engine)


def load_eval_records(cfg: TrainConfig, data_path: str, columns: dict) -> list:
    """The greedy evals' records (the first --eval-size of --eval-split); none without evals or that split."""
    if cfg.eval_every <= 0:
        return []
    try:
        eval_ds = load_split(data_path, cfg.eval_split, {k: v for k, v in columns.items() if k != "solution"},
                             cfg.eval_size)
        return RecordStream(eval_ds, columns | {"solution": None}, Sampler(len(eval_ds), 0)).next_batch(len(eval_ds))
    except ValueError as e:
        print(f"pgpo-train: no eval ({e})")
        return []


def restore(run: Run) -> RunState:
    """A fresh state, or with --resume the latest checkpoint's: model, optimizer (of the checkpoint's phase: "sft"
    before its sft_end, "rl" from the SFT -> RL switch on), RNG, step and data position. Then the data stream."""
    cfg = run.cfg
    state = RunState(sft_end=cfg.sft_steps)
    run.optimizer = make_optimizer(run.model, cfg.sft_lr if cfg.sft_steps > 0 else cfg.lr, cfg.weight_decay)
    data_pos, skipped, skipped_empty = 0, 0, 0
    if cfg.resume:
        path = latest_checkpoint(run.ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run.ckpt_dir}")
        saved = read_trainer_state(path)
        in_sft = saved["step"] < saved.get("sft_end", cfg.sft_steps)
        run.optimizer = make_optimizer(run.model, cfg.sft_lr if in_sft else cfg.lr, cfg.weight_decay)
        st = dist_checkpoint.load(path, run.model, run.optimizer, run.dp, cfg.seed)
        data_pos, skipped, skipped_empty = st["data_pos"], st["skipped_images"], st.get("skipped_empty", 0)
        state = RunState(step=st["step"], sft_end=st.get("sft_end", cfg.sft_steps),
                         sft_accs=list(st.get("sft_accs", [])), resumed_from=path, saved_at=st["step"])
    run.sampler = Sampler(len(run.train_ds), cfg.seed, data_pos)
    run.stream = RecordStream(run.train_ds, run.columns, run.sampler)
    run.stream.skipped_images, run.stream.skipped_empty = skipped, skipped_empty
    return state


def open_logs(run: Run, state: RunState) -> None:
    """metrics.jsonl (cut back to the checkpoint's step on resume) and the progress bar, on the writer rank."""
    if not run.dp.is_writer:
        return
    run.logger = Logger(run.cfg.out_dir, run.cfg.tensorboard,
                        truncate_after=state.step if state.resumed_from else None, report_to=run.cfg.report_to,
                        config=dataclasses.asdict(run.cfg))
    if run.cfg.progress:
        from tqdm.auto import tqdm  # lazy: only with a progress bar

        run.bar = tqdm(total=state.total(run.cfg), initial=state.step, desc=f"{run.cfg.algo}", dynamic_ncols=True)


def stop_if_requested(run: Run, state: RunState, stop: StopOnSignal) -> None:
    """A signal came during the step just finished (torchrun: on any rank): checkpoint, then stop."""
    dp = run.dp
    requested = stop.requested if dp.world == 1 else stop_requested_anywhere(stop.requested, run.device)
    if not requested:
        return
    if state.saved_at != state.step and state.step > 0:
        run.save(state)
    close_logs(run)
    raise TrainingInterrupted(requested, state.step, latest_checkpoint(run.ckpt_dir), run.cfg.out_dir)


# %% the two kinds of step


def sft_phase_step(run: Run, state: RunState) -> None:
    """One SFT warm-up step; at the warm-up's end (--sft-steps, or earlier at --sft-stop-acc) the eval, a fresh
    optimizer for RL and a checkpoint."""
    cfg, dp = run.cfg, run.dp
    recs = run.stream.next_batch(cfg.sft_batch_size)
    # the text-only rows are drawn over the global batch, then sharded with it (torchrun = one process)
    text_rows = sft_text_rows(cfg.seed, state.step, len(recs), cfg.sft_text_only_prob)
    mine = dp.shard(list(range(len(recs))))
    recs, text_rows = [recs[i] for i in mine], text_rows[mine]
    m = sft_step(run.model, run.optimizer, run.processor, recs, cfg, run.device, dp, run.fused_lm_head, text_rows)
    m = dp.merge_metrics(m, len(recs), 0.0)
    state.step += 1
    check_finite_metrics(state.step, m, ("sft/loss", "sft/grad_norm"))
    state.sft_accs = (state.sft_accs + [m["sft/seq_acc"]])[-3:]
    if cfg.sft_stop_acc > 0 and len(state.sft_accs) == 3 and sum(state.sft_accs) / 3 >= cfg.sft_stop_acc:
        state.sft_end = state.step  # warm enough: RL starts now
        if run.bar:
            run.bar.total = state.total(cfg)
    if state.step == state.sft_end:
        if run.eval_records:
            state.last_eval = evaluate_on_ranks(run.model, run.processor, run.eval_records, cfg, run.device, dp)
            m.update(state.last_eval)
        run.optimizer = make_optimizer(run.model, cfg.lr, cfg.weight_decay)  # our choice: fresh AdamW for RL
    if run.logger:
        run.logger.log(state.step, {"phase": "sft", **m})
    if state.step == state.sft_end or (cfg.save_every > 0 and state.step % cfg.save_every == 0):
        run.save(state)
    if run.bar:
        run.bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
        run.bar.update(1)


def rl_phase_step(run: Run, state: RunState) -> None:
    """One RL step: 1. rollout (+ DAPO refill), 2. scoring passes and token advantages, 3. clipped update; then
    metrics, the periodic eval and checkpoint."""
    cfg, dp, model, device = run.cfg, run.dp, run.model, run.device
    times: dict = {}
    t0 = time.perf_counter()
    batch, metrics, texts, filler = sample_batch(model, run.processor, run.stream, cfg, device, times, dp,
                                                 run.engine)
    metrics["pgpo/fused_lm_head"] = float(run.fused_lm_head)  # which path every pass took (1: hidden states)
    # this rank's responses and kept tokens, to weigh its metrics (torchrun: every rank samples as many)
    n_resp, n_tok = len(texts), 0.0
    kept_anywhere = dp.any(batch is not None)
    if batch is not None:
        with dp.full_params(model):
            batch.update(old_logp_and_scores(model, batch, cfg, times, run.fused_lm_head))
        if "rollout_logp" in batch:  # vLLM's log-probs vs the policy's, on the sampled tokens
            metrics.update(vllm_engine.logp_gap_metrics(batch["rollout_logp"], batch["old_logp"],
                                                        batch["response_mask"]))
        tok_adv, w_m = token_advantages(batch, cfg, times, state.step)
        check_token_advantages(state.step + 1, batch["advantages"], tok_adv, batch["response_mask"])
        metrics.update(w_m)
        metrics["actor/entropy"] = float(batch["entropy"][batch["response_mask"].bool()].mean())
        metrics.update(policy_update(model, run.optimizer, batch, tok_adv, cfg, times, dp, run.fused_lm_head))
        check_finite_metrics(state.step + 1, metrics, ("actor/loss", "actor/grad_norm"))
        n_tok = float(batch["response_mask"].sum())
    elif kept_anywhere:  # torchrun: another rank kept groups; this one pairs their collectives with zero weight
        with dp.full_params(model):
            pass
        metrics.update(policy_update(model, run.optimizer, filler, None, cfg, times, dp, run.fused_lm_head))
        check_finite_metrics(state.step + 1, metrics, ("actor/grad_norm",))  # global: every rank stops together
    # else: every group had equal rewards, also after the refill rounds -> no gradient signal this step
    state.step += 1
    metrics.update(times)
    metrics["timing/step"] = time.perf_counter() - t0
    metrics["data/skipped_images"] = run.stream.skipped_images
    metrics["data/skipped_empty"] = run.stream.skipped_empty
    metrics["data/epoch"] = run.sampler.position / run.sampler.n
    rl_step, last = state.step - state.sft_end, state.step == state.total(cfg)
    metrics = dp.merge_metrics(metrics, n_resp, n_tok)
    if run.eval_records and cfg.eval_every > 0 and (rl_step % cfg.eval_every == 0 or last):
        state.last_eval = evaluate_on_ranks(model, run.processor, run.eval_records, cfg, device, dp)
        metrics.update(state.last_eval)
        metrics["sample/response"] = texts[0]  # one rollout response per eval, to eyeball what the policy writes
    if run.logger:
        run.logger.log(state.step, {"phase": "rl", **metrics})
    if (cfg.save_every > 0 and rl_step % cfg.save_every == 0) or last:
        run.save(state)
    if run.bar:
        run.bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['reward/acc']:.2f}")
        run.bar.update(1)


# %% finish


def close_logs(run: Run) -> None:
    if run.bar:
        run.bar.close()
    if run.logger:
        run.logger.close()


def finish(run: Run, state: RunState) -> dict:
    """Closes the logs, draws the curves and writes summary.json (writer rank); returns the summary with the
    model and processor."""
    cfg = run.cfg
    close_logs(run)
    # RUN_DIR/model: from_pretrained, vLLM and pgpo-train eval load it (collective under torchrun)
    model_dir = export_run_model(cfg, run.model, run.processor, run.dp) if cfg.export_model else None
    curves = write_curves(cfg.out_dir) if run.dp.is_writer else None
    summary = {
        "out_dir": cfg.out_dir,
        "steps": state.step,
        "wall_s": time.perf_counter() - run.t_start,
        "skipped_images": run.stream.skipped_images,
        "skipped_empty": run.stream.skipped_empty,
        "resumed_from": state.resumed_from,
        "sft_steps": state.sft_end,
        "rl_steps": state.step - state.sft_end,
        "curves": curves,
        "model_dir": model_dir,
        **state.last_eval,
        **eval_summary(os.path.join(cfg.out_dir, "metrics.jsonl"), state.sft_end, len(run.eval_records)),
    }
    if run.dp.is_writer:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return {**summary, "model": run.model, "processor": run.processor}
