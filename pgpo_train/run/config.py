"""Run configuration: dataclasses whose fields carry their --help text (`opt(default, help)`), and their argparse
flags (`--pgpo.tau 0.4` style).

Defaults are the embedded tiny run (no model or dataset given): a few minutes on 2 CPU cores. Paper values for real
runs are noted in each field's help (docs/method.md#recipe). A default of None means "auto": resolved() fills it in
from the algo, the model and the task (`--lr auto` on the command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from dataclasses import field

from pgpo_kernels import defaults
from pgpo_train.data.tasks import grid_reason_max_tokens
from pgpo_train.data.tasks import task_filler
from pgpo_train.run.validate import auto_field_type
from pgpo_train.run.validate import check_types
from pgpo_train.run.validate import check_values

PAPER_PROMPT_TEMPLATE = (
    "{question} You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
    "\\boxed{{}}."
)

def auto_tiny_head_dim(rollout_engine: str) -> int:
    """--tiny-head-dim auto: 32 for vLLM (its CPU attention has no head size 16), else the embedded default 16."""
    return 32 if rollout_engine == "vllm" else 16


def opt(default, help: str):
    """A config field with its --help text (TRL's `field(metadata={"help": ...})`, shorter)."""
    return field(default=default, metadata={"help": help})


# the values each string option takes: argparse's choices and resolved()'s checks
CHOICES = {
    "algo": ["grpo", "dapo", "pgpo"],
    "task": ["grid-count", "grid-reason", "count-copy", "pair-count"],
    "control": ["none", "shuffled", "inverted"],  # pgpo.control
    "tau_mode": ["absolute", "quantile"],  # pgpo.tau_mode
    "estimator": ["full", "k3"],
    "preset": ["none", "dev-easyr1"],  # pgpo.preset (PRESETS)
    "fused_lm_head": ["auto", "on", "off"],
    "dynamic_sampling": ["auto", "on", "off"],
    "loss_agg_mode": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"],
    "backend": ["auto", "torch", "triton"],  # pgpo.backend
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "rollout_engine": ["hf", "vllm"],
    "export_dtype": ["auto", "float32", "bfloat16", "float16"],
    "report_to": ["none", "wandb"],
}


PRESETS = defaults.PRESETS  # --pgpo.preset's bundles (pgpo_kernels/defaults.py)


def check_values_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"--pgpo.preset must be one of {sorted(PRESETS)}, got {preset!r}")


@dataclass
class PGPOWeightsConfig:
    """pgpo-train's PGPO token-weighting options, TrainConfig.pgpo (`--pgpo.*`; docs/method.md#reshape). Named
    apart from the TRL adapter's `pgpo_train.integrations.PGPOConfig` (a GRPOConfig)."""

    estimator: str = opt(defaults.ESTIMATOR, "\"full\": exact token KL over the vocab; \"k3\": (r-1)-log r on the sampled token")
    tau: float = opt(defaults.TAU, "gate threshold on the min-max normalized score (paper best: 0.4)")
    beta: float = opt(defaults.BETA, "amplification of tokens above tau (paper best: 2.0)")
    eps: float = opt(defaults.EPS, "added to the min-max denominator (a sequence of equal scores gets I = 0)")
    renormalize: bool = opt(defaults.RENORMALIZE, "keep each sequence's advantage mass (paper ablates False)")
    # variants and controls (docs/method.md#variants); the defaults are the paper's formula (the fused kernel runs)
    tau_mode: str = opt(defaults.TAU_MODE, "absolute: gate at I = tau; quantile: at each response's tau-quantile of I")
    floor: float = opt(defaults.FLOOR, "minimum weight after the gate, before renormalization (authors' dev code: 0.1)")
    control: str = opt(defaults.CONTROL, "none | shuffled (weights permuted within each response) | inverted (I -> 1 - I)")
    # our choice, off by default (the paper has no such guard): min-max normalization stretches any spread to [0, 1]
    min_spread: float = opt(
        defaults.MIN_SPREAD,
        "uniform weights for a sequence whose log1p(KL) spread (max - min) is below this; 0 = off",
    )
    # k3 only: log r = log pi_txt - log pi_vis clamped to [-x, x] before (r-1) - log r, and S_t to [0, y] after it
    k3_log_ratio_max: float = opt(defaults.K3_LOG_RATIO_MAX, "k3: clamp of the text-only log-ratio log r to [-x, x] (dev-easyr1: 20); 0 = "
                                  "off (the paper's)")
    k3_score_max: float = opt(defaults.K3_SCORE_MAX, "k3: clamp of the score S_t to [0, x] (dev-easyr1: 10); 0 = off (the paper's)")
    preset: str = opt(defaults.PRESET, "none | dev-easyr1: the authors' development variant, second-hand (README); fills "
                      "only the options left at their defaults")
    backend: str = opt("auto", "pgpo_kernels backend: triton on CUDA, torch otherwise")
    # every pass (old log-probs, text-only, policy update, SFT) from hidden states + fused lm_head, no [B, T, V]
    # logits; auto: on wherever the logits are plain lm_head(hidden) (pgpo_train.models.lm_head's rules)
    fused_lm_head: str = opt("auto", "auto | on | off")

    def with_preset(self) -> PGPOWeightsConfig:
        """A copy with the preset's values in every option still at its default (explicit values win)."""
        check_values_preset(self.preset)
        base = PGPOWeightsConfig()
        over = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) == getattr(base, k)}
        return dataclasses.replace(self, **over)

    def weight_kwargs(self) -> dict:
        """The reshape options, as core_algos.pgpo_weights takes them (its generator aside)."""
        keys = ("tau", "beta", "eps", "renormalize", "min_spread", "backend", "control", "tau_mode", "floor")
        return {k: getattr(self, k) for k in keys}


@dataclass
class LoraOptions:
    """LoRA through peft, TrainConfig.lora (`--lora.*`); rank 0 = off (the paper trains every weight)."""

    rank: int = opt(0, "LoRA rank r; 0 = off (full fine-tuning)")
    alpha: float = opt(16.0, "scaling alpha / r")
    dropout: float = opt(0.0, "dropout on the adapters' input")
    target_modules: str = opt(
        "all-linear",
        "comma-separated linear layer names (q_proj,v_proj), or all-linear (never the lm_head)",
    )
    vision: bool = opt(False, "adapters on the vision tower's linear layers too (else the tower stays frozen)")


@dataclass
class TrainConfig:
    # --- I/O
    out_dir: str | None = opt(
        None,
        "run directory (metrics.jsonl, checkpoints/, config.json); auto: runs/{algo}-{time}",
    )
    resume: bool = opt(
        False,
        "continue from out_dir's latest checkpoint (exactly: model, optimizer, RNG, data position)",
    )
    overwrite: bool = opt(False, "start over in an out_dir that already holds checkpoints")
    save_every: int = opt(25, "RL steps between atomic checkpoints (0: only at the end)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept on disk")
    tensorboard: bool = opt(True, "also write tensorboard events when tensorboard is installed")
    progress: bool = opt(True, "tqdm progress bar")
    report_to: str = opt("none", "also send metrics to: none | wandb (Weights & Biases, installed separately; the "
                         "project is $WANDB_PROJECT, default pgpo)")
    export_model: bool = opt(True, "at the end, a Hugging Face model folder (save_pretrained, safetensors): RUN_DIR/model")
    export_checkpoints: bool = opt(
        False,
        "also one per checkpoint, RUN_DIR/models/step-N (pgpo-train export makes one later from any checkpoint)",
    )
    export_dtype: str = opt("auto", "the model folders' weights; auto: the base model's dtype (fp32: the tiny model)")
    # --- model
    model: str = opt(
        "",
        "hub name or local path of a supported VLM (docs/method.md#families); empty = the embedded tiny model "
        "(random init)",
    )
    dtype: str = opt("auto", "auto: bf16 on CUDA, fp32 on CPU")
    attn_implementation: str = opt("auto", "auto: flash_attention_2 when installed on CUDA, else sdpa")
    gradient_checkpointing: bool = opt(False, "trade compute for activation memory (real models)")
    freeze_vision: bool = opt(False, "paper trains the vision tower too")
    # --- data
    dataset: str = opt("", "hub name or local path for datasets.load_dataset; empty = the generated --task")
    # grid-count: 3x3 grid, "How many shapes?", answer 0-9 read off the image. count-copy: the contrast case, where
    # the errors are a text-only copy of a count into the box, so PGPO is expected not to help (docs/training.md)
    task: str = opt("grid-count", "embedded task when --dataset is empty: grid-count | grid-reason | count-copy | "
                    "pair-count (two images per prompt)")
    task_filler: int | None = opt(
        None,
        "grid-reason: filler words per response (0 = none); auto: 24 (other tasks: none)",
    )
    split: str = opt("train", "dataset split to train on")
    eval_split: str = opt("test", "dataset split for the greedy evals (missing: no eval)")
    image_column: str = opt("image", "column holding the image (PIL, {bytes, path} or a path)")
    problem_column: str = opt("problem", "column holding the question text")
    answer_column: str = opt("answer", "column holding the ground-truth answer (math-verify compares the boxed one)")
    solution_column: str = opt("solution", "reference responses for the SFT warm-up (only needed when sft_steps > 0)")
    prompt_template: str | None = opt(
        None,
        "\"{question}\" is replaced; auto: \"tiny\" for the tiny task, the paper's otherwise",
    )
    max_samples: int = opt(0, "0 = whole split")
    # --- algorithm
    algo: str = opt("pgpo", "grpo | dapo | pgpo (pgpo = dapo + perception-grounded token weights)")
    pgpo: PGPOWeightsConfig = field(default_factory=PGPOWeightsConfig)
    lora: LoraOptions = field(default_factory=LoraOptions, metadata={"help": "LoRA through peft (--lora.*)"})
    steps: int = opt(60, "RL steps (rollout + update); paper ~200")
    prompts_per_step: int = opt(8, "paper: 384")
    group_size: int = opt(4, "G responses per prompt; paper: 5")
    mini_batch_size: int = opt(16, "responses per optimizer step; paper: 128 prompts x G")
    micro_batch_size: int = opt(16, "responses per forward (memory knob; never changes the math)")
    ppo_epochs: int = opt(1, "passes over each step's batch")
    clip_ratio_low: float = opt(0.2, "PPO clip below 1 (ratio >= 1 - this)")
    clip_ratio_high: float | None = opt(
        None,
        "PPO clip above 1 (ratio <= 1 + this); auto by algo: 0.28 dapo/pgpo, 0.2 grpo",
    )
    loss_agg_mode: str | None = opt(
        None,
        "how token losses average; auto by algo: token-mean dapo/pgpo, seq-mean-token-mean grpo",
    )
    dynamic_sampling: str = opt("auto", "auto (on for dapo/pgpo) | on | off: drop groups whose rewards are all equal")
    max_refill: int = opt(
        4,
        "dynamic sampling: at most this many extra rollout rounds refill the batch (0: it shrinks)",
    )
    lr: float | None = opt(
        None,
        "RL learning rate; auto: 1e-4 for the embedded tiny model, the paper's 1e-6 with --model",
    )
    weight_decay: float = opt(0.01, "AdamW weight decay (SFT and RL)")
    grad_clip: float = opt(1.0, "max global gradient norm (0: off)")
    reward: str = opt(
        "",
        "your verifiable reward, module:function or path/to/file.py:function: fn(response, record) -> float, or "
        "fn(responses, records) -> list; empty = the paper's acc_weight x accuracy + format_weight x format",
    )
    acc_weight: float = opt(0.9, "reward = acc_weight x accuracy + format_weight x format (paper: 0.9 / 0.1)")
    format_weight: float = opt(0.1, "see --acc-weight")
    # --- rollout
    max_new_tokens: int | None = opt(
        None,
        "auto: 24 for the tiny task (grid-reason: its longest reference + 8), the paper's 2048 with --model or "
        "--dataset",
    )
    temperature: float = opt(1.0, "sampling temperature; log-probs use the same")
    top_p: float = opt(1.0, "nucleus sampling of the rollouts; paper: 0.99")
    rollout_engine: str = opt(
        "hf",
        "hf: the policy's generate; vllm: a vLLM engine in this process, weights synced before every step's "
        "rollouts (pip install -e .[vllm]; docs/vllm_rollouts.md)",
    )
    vllm_gpu_memory_utilization: float = opt(
        0.3, "--rollout-engine vllm on CUDA: share of GPU memory its engine takes (weights + KV cache)"
    )
    vllm_sleep: bool = opt(
        True, "--rollout-engine vllm on CUDA: offload the engine's weights and free its KV cache between rollouts"
    )
    tiny_head_dim: int | None = opt(
        None,
        "embedded model only: attention head size, 16 (4 heads) or 32 (2 heads; same parameter count); auto: 32 "
        "with --rollout-engine vllm (vLLM's attention refuses 16), else 16",
    )
    vllm_max_model_len: int | None = opt(
        None, "--rollout-engine vllm: longest prompt + response in tokens; auto: max_new_tokens + 4096 (model's cap)"
    )
    # --- SFT warm-up (gives the random tiny model a start)
    sft_steps: int | None = opt(
        None,
        "max warm-up steps; auto: 1000 grid tasks, 300 count-copy, 0 with --model/--dataset",
    )
    # the grid-count warm-up sits at chance, then learns to count within ~100 steps, at a step that varies by seed;
    # stopping on accuracy leaves RL the same room in every seed
    sft_stop_acc: float | None = opt(
        None,
        "end SFT once its last 3 batches' exact match reaches this (0 = off); auto: 0.75 grid tasks, else 0",
    )
    sft_batch_size: int = opt(32, "reference responses per SFT step")
    # a share of the warm-up's samples trained on exactly the text-only pass's inputs (no pixels, placeholders
    # unattended), so the text-only pass PGPO scores with is a calibrated prior, as a real VLM's (trained on text too)
    sft_text_only_prob: float = opt(0.0, "share of each SFT batch trained on the text-only pass's inputs (seeded by "
                                    "--seed and step; the stop criterion counts the visual rows); 0 = off")
    sft_lr: float = opt(2e-3, "AdamW learning rate of the warm-up (RL starts with a fresh optimizer at --lr)")
    # --- eval
    eval_every: int = opt(20, "RL steps between greedy evals on eval_split (0: off)")
    eval_size: int = opt(128, "eval prompts (the first of eval_split; the embedded tasks have 256)")
    # --- system
    seed: int = opt(0, "model init (embedded), data order, sampling")
    device: str = opt("auto", "auto: cuda when available")
    threads: int | None = opt(None, "torch CPU threads; auto: 1 for the tiny model on CPU (more thrash), else torch's")
    fsdp_cpu_offload: bool = opt(
        False,
        "torchrun only: FSDP2 CPUOffloadPolicy (sharded params, grads, AdamW state on CPU)",
    )

    def resolved(self) -> TrainConfig:
        """A copy with algo-dependent 'auto' fields filled in, validated (every flag: pgpo_train.run.validate)."""
        check_types(self)
        c = dataclasses.replace(self, pgpo=self.pgpo.with_preset(), lora=dataclasses.replace(self.lora))
        if c.clip_ratio_high is None:
            c.clip_ratio_high = 0.2 if c.algo == "grpo" else 0.28
        if c.loss_agg_mode is None:
            c.loss_agg_mode = "seq-mean-token-mean" if c.algo == "grpo" else "token-mean"
        if c.dynamic_sampling == "auto":
            c.dynamic_sampling = "off" if c.algo == "grpo" else "on"
        embedded = not (c.model or c.dataset)
        if c.lr is None:
            c.lr = 1e-6 if c.model else 1e-4
        c.task_filler = task_filler(c.task, c.task_filler)  # ValueError naming --task-filler off grid-reason
        grid = c.task in ("grid-count", "grid-reason", "pair-count")  # warm-up to a stop on exact match
        if c.tiny_head_dim is None:
            c.tiny_head_dim = auto_tiny_head_dim(c.rollout_engine)
        if c.max_new_tokens is None:
            tiny_tokens = grid_reason_max_tokens(c.task_filler) if c.task == "grid-reason" else 24
            c.max_new_tokens = tiny_tokens if embedded else 2048
        if c.sft_steps is None:
            c.sft_steps = (1000 if grid else 300) if embedded else 0
        if c.sft_stop_acc is None:
            c.sft_stop_acc = 0.75 if embedded and grid else 0.0
        if c.out_dir is None:
            if c.resume:
                raise ValueError("--resume needs --out-dir (the run directory to continue)")
            import time

            c.out_dir = os.path.join("runs", f"{c.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
        if c.prompt_template is None:
            c.prompt_template = "tiny" if embedded else PAPER_PROMPT_TEMPLATE
        check_values(c, CHOICES)
        return c


# %% argparse from the dataclasses


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            _add_fields(parser, type(default), prefix=f"{prefix}{f.name}.")
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = (prefix + f.name).replace(".", "__")
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if default is None:  # auto: the value's type from the annotation ("float | None"), "auto" on the command line
            kind = auto_field_type(f)
            parser.add_argument(flag, dest=dest, type=_auto_or(kind), default=None, choices=None,
                                help=help_text, metavar=f"{kind.__name__.upper()}|auto")
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(
                flag,
                dest=dest,
                type=type(default),
                default=default,
                choices=CHOICES.get(f.name),
                help=help_text,
                metavar=None if f.name in CHOICES else type(default).__name__.upper(),
            )


def _auto_or(kind):
    def parse(text: str):
        return None if text == "auto" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
    return parse


def add_train_args(parser: argparse.ArgumentParser) -> None:
    _add_fields(parser, TrainConfig)


def _nested_fields(cls) -> dict[str, type]:
    """name -> dataclass type of the nested option groups (pgpo, lora)."""
    return {f.name: type(f.default_factory()) for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    nested = _nested_fields(TrainConfig)
    groups = {g: cls(**{f.name: getattr(ns, f"{g}__{f.name}") for f in dataclasses.fields(cls)})
              for g, cls in nested.items()}
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in nested}
    return TrainConfig(**groups, **kw)


def config_from_dict(d: dict) -> TrainConfig:
    """TrainConfig from a run's config.json; keys this version does not know are ignored (older runs)."""
    nested = _nested_fields(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(nested)
    groups = {}
    for g, cls in nested.items():
        names = {f.name for f in dataclasses.fields(cls)}
        groups[g] = cls(**{k: v for k, v in (d.get(g) or {}).items() if k in names})
    return TrainConfig(**groups, **{k: v for k, v in d.items() if k in known})
