"""Start-up checks of a run's settings: every flag in one place, before any work, one line each naming the flag.

check_types(cfg)   each field has its default's type (a float finite): first thing TrainConfig.resolved() does
check_values(cfg, CHOICES)  ranges, choices, device, backend, out dir: last thing resolved() does (filled-in values)
check_sources(cfg) what train() needs from disk / hub before it creates the run dir: the model directory (complete,
                   weights not truncated) or a reachable / cached hub name, the dataset, the run dir for --resume

All raise ValueError; the CLI prints the message as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import struct
import urllib.request
import zipfile
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PROBE_TIMEOUT_S = 3.0


def flag(name: str) -> str:
    """The command-line flag of a (possibly dotted) field name: pgpo.fused_lm_head -> --pgpo.fused-lm-head."""
    return "--" + name.replace("_", "-")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def auto_field_type(f: dataclasses.Field) -> type:
    """The value type of an "auto" field (default None) from its annotation: `float | None` -> float."""
    return _TYPES.get(str(f.type).split("|")[0].strip(), type(None))


def _fields(obj, prefix: str = ""):
    """(dotted name, value, type) of every leaf field of a config dataclass: the default's type, or for an "auto"
    field (default None) the annotation's (`float | None` -> float)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _fields(value, f"{prefix}{f.name}.")
        elif default is None:
            yield prefix + f.name, value, auto_field_type(f)
        else:
            yield prefix + f.name, value, type(default)


def check_types(cfg) -> None:
    """Each field holds its type; int fields take no bool, float fields a finite int or float; None is "auto" where
    the default is None."""
    for name, value, kind in _fields(cfg):
        if kind is type(None) or (value is None and _is_auto(cfg, name)):
            continue  # an optional setting, or "auto" (resolved() fills it in)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ValueError(f"{flag(name)} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{flag(name)} must be a finite number, got {value}")


def _is_auto(cfg, name: str) -> bool:
    """Whether a (dotted) field's default is None, i.e. None means "auto" there."""
    *parents, leaf = name.split(".")
    for p in parents:
        cfg = getattr(cfg, p)
    f = next(f for f in dataclasses.fields(cfg) if f.name == leaf)
    return f.default is None


def _choice(name: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{flag(name)} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def _range(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{flag(name)} must be {expected}, got {value}")


def check_device(device: str):
    """The torch.device of --device (None for auto); ValueError when malformed or not present on this machine."""
    import torch

    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be auto or a torch device such as cpu, cuda or cuda:1, got {device!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return dev
    module = getattr(torch, dev.type, None)
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        raise ValueError(f"--device {device}: no {dev.type} device on this machine (use --device cpu or auto)")
    return dev


def check_out_dir(out_dir: str) -> None:
    """--out-dir must be a directory or creatable as one (no file on the way)."""
    path = os.path.abspath(out_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {out_dir} is a file, not a directory")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--out-dir {out_dir}: {parent} is a file, not a directory")
    if parent and not os.access(parent if not os.path.exists(path) else path, os.W_OK):
        raise ValueError(f"--out-dir {out_dir}: {parent if not os.path.exists(path) else path} is not writable")


def check_values(c, choices: dict[str, list[str]]) -> None:
    """Ranges and choices of a resolved TrainConfig (its 'auto' values filled in); choices: config.CHOICES (passed
    in, so this module never imports config, which imports it)."""
    for name, value, _ in _fields(c):  # every option listed in choices ("" = auto is filled in by now)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in choices:
            _choice(name, value, [m for m in choices[leaf] if m])
    # PGPO reshape (NONFINITE_RULES 6); finiteness is check_types'
    _range("pgpo.tau", c.pgpo.tau, 0.0 <= c.pgpo.tau <= 1.0, "in [0, 1]")
    _range("pgpo.beta", c.pgpo.beta, c.pgpo.beta >= 0, ">= 0")
    _range("pgpo.eps", c.pgpo.eps, c.pgpo.eps > 0, "> 0")
    _range("pgpo.floor", c.pgpo.floor, c.pgpo.floor >= 0, ">= 0 (0 = off: the paper's reshape)")
    for name in ("k3_log_ratio_max", "k3_score_max"):
        v = getattr(c.pgpo, name)
        _range("pgpo." + name, v, v >= 0, ">= 0 (0 = off: the paper's k3)")
        if v > 0 and c.pgpo.estimator != "k3":
            raise ValueError(f"{flag('pgpo.' + name)} clamps the k3 estimator; it needs --pgpo.estimator k3 "
                             f"(got {c.pgpo.estimator!r})")
    _range("task_filler", c.task_filler, c.task_filler >= 0, ">= 0 filler words")
    # optimisation and rollout
    _range("lr", c.lr, c.lr > 0, "> 0")
    _range("sft_lr", c.sft_lr, c.sft_lr > 0, "> 0")
    _range("sft_text_only_prob", c.sft_text_only_prob, 0 <= c.sft_text_only_prob < 1,
           "in [0, 1) (the share of warm-up samples trained text-only; some must keep the image)")
    _range("weight_decay", c.weight_decay, c.weight_decay >= 0, ">= 0")
    _range("grad_clip", c.grad_clip, c.grad_clip >= 0, ">= 0 (0 = off)")
    _range("clip_ratio_low", c.clip_ratio_low, 0 <= c.clip_ratio_low < 1, "in [0, 1)")
    _range("clip_ratio_high", c.clip_ratio_high, c.clip_ratio_high >= 0, ">= 0")
    _range("temperature", c.temperature, c.temperature > 0, "> 0")
    _range("top_p", c.top_p, 0 < c.top_p <= 1, "in (0, 1]")
    _range("acc_weight", c.acc_weight, c.acc_weight >= 0, ">= 0")
    _range("format_weight", c.format_weight, c.format_weight >= 0, ">= 0")
    if c.acc_weight == 0 and c.format_weight == 0:
        raise ValueError("--acc-weight and --format-weight are both 0: every reward would be 0")
    _range("sft_stop_acc", c.sft_stop_acc, 0 <= c.sft_stop_acc <= 1, "in [0, 1] (0 = off)")
    _range("pgpo.min_spread", c.pgpo.min_spread, c.pgpo.min_spread >= 0, ">= 0 (0 = off: the paper's reshape)")
    if c.lora.rank > 0:
        _range("lora.alpha", c.lora.alpha, c.lora.alpha > 0, "> 0")
        _range("lora.dropout", c.lora.dropout, 0 <= c.lora.dropout < 1, "in [0, 1)")
        if not c.lora.target_modules.strip(" ,"):
            raise ValueError("--lora.target-modules must name linear layers (q_proj,v_proj) or be all-linear")
    _range("group_size", c.group_size, c.group_size >= 2, ">= 2 (advantages are relative to the group)")
    for name in (
        "prompts_per_step",
        "mini_batch_size",
        "micro_batch_size",
        "ppo_epochs",
        "sft_batch_size",
        "eval_size",
        "keep_checkpoints",
    ):
        _range(name, getattr(c, name), getattr(c, name) >= 1, ">= 1")
    _range("max_new_tokens", c.max_new_tokens, c.max_new_tokens >= 1, ">= 1")
    _range("vllm_gpu_memory_utilization", c.vllm_gpu_memory_utilization, 0 < c.vllm_gpu_memory_utilization <= 1,
           "in (0, 1]")
    if c.tiny_head_dim not in (16, 32):
        raise ValueError(f"--tiny-head-dim must be 16 or 32, got {c.tiny_head_dim}")
    if c.rollout_engine == "vllm" and not c.model and c.tiny_head_dim < 32:
        raise ValueError(f"--tiny-head-dim {c.tiny_head_dim} with --rollout-engine vllm: vLLM's attention takes head "
                         "sizes 32 and up (its CPU backend refuses 16); use 32 (the auto value)")
    if c.vllm_max_model_len is not None:
        _range("vllm_max_model_len", c.vllm_max_model_len, c.vllm_max_model_len > c.max_new_tokens,
               f"> --max-new-tokens ({c.max_new_tokens}): room for the prompt too")
    for name, unset in (
        ("steps", ""),
        ("sft_steps", ""),
        ("save_every", " (0 = only at the end)"),
        ("eval_every", " (0 = off)"),
        ("max_samples", " (0 = all)"),
    ):
        _range(name, getattr(c, name), getattr(c, name) >= 0, ">= 0" + unset)
    if c.threads is not None:
        _range("threads", c.threads, c.threads >= 1, ">= 1 (or auto)")
    _range("seed", c.seed, 0 <= c.seed < 2**32, "in [0, 2**32)")
    for name, value, kind in _fields(c):  # no number means anything below 0 once the 'auto' values are filled in
        if kind in (int, float) and value is not None:
            _range(name, value, value >= 0, ">= 0")
    for name in ("split", "eval_split", "image_column", "problem_column", "answer_column"):
        if not getattr(c, name):
            raise ValueError(f"{flag(name)} must not be empty")
    if c.sft_steps > 0 and not c.solution_column:
        raise ValueError("--solution-column must not be empty when --sft-steps > 0")
    if c.prompt_template != "tiny":
        try:
            text = c.prompt_template.format(question="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--prompt-template {c.prompt_template!r}: not a format string with {{question}} ({e})")
        if "\0" not in text:
            raise ValueError(f"--prompt-template {c.prompt_template!r} must contain {{question}}")
    # where it runs
    dev = check_device(c.device)
    on_cuda = dev.type == "cuda" if dev is not None else _cuda_available()
    if c.pgpo.backend == "triton" and not on_cuda:
        from pgpo_kernels.utils import interpreter_enabled

        if not interpreter_enabled():
            raise ValueError(
                "--pgpo.backend triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter); "
                "use --pgpo.backend torch or auto on CPU"
            )
    check_out_dir(c.out_dir)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# %% sources: model, dataset, run dir (train() only; TrainConfig.resolved() stays free of I/O beyond stat calls)


def _hub_cached(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(folder) and bool(os.listdir(folder))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str:
    """'' when the hub endpoint accepts a TCP connection within timeout, else why not (one short reason)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # the hub is reached through the proxy
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port} is unreachable ({e.strerror or e})"
    return ""


def go_offline() -> None:
    """Hub cache only, for this process: no 20 s of retries against an unreachable hub for files already cached."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def _check_hub_name(opt: str, name: str, repo_type: str) -> None:
    """A name that is not a local path: a hub id, cached or reachable."""
    if not HUB_ID.match(name) or name.startswith((".", "~")) or os.sep + os.sep in name:
        raise ValueError(f"{opt} {name}: no such file or directory")
    why = hub_reachable()
    if not why:
        return
    if _hub_cached(name, repo_type):
        print(f"pgpo-train: hub not reachable ({why}): using the cached {name}")
        go_offline()
        return
    raise ValueError(
        f"{opt} {name}: no such local directory, not in the hub cache, and the hub cannot be reached ({why})"
    )


def _safetensors_problem(path: str) -> str:
    """'' when a .safetensors file's header parses and its data fits in the file, else what is wrong."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"{os.path.basename(path)} is truncated ({size} bytes, its header alone needs {n + 8})"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        return f"{os.path.basename(path)} has no valid safetensors header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{os.path.basename(path)} is truncated ({size} bytes, its header says {8 + n + end})"
    return ""


def check_model_dir(path: str, opt: str = "--model") -> None:
    """A local model directory holds config.json and complete weights (every shard present, none truncated)."""
    if not os.path.isdir(path):
        raise ValueError(f"{opt} {path} is a file, not a model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{opt} {path} has no config.json (not a model directory, or an unfinished download)")
    files = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            try:
                with open(os.path.join(path, index)) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{opt} {path}: {index} is unreadable ({e})")
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))][:1]
    if not files:
        raise ValueError(f"{opt} {path} has no weights (model.safetensors or pytorch_model.bin)")
    for name in files:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ValueError(f"{opt} {path}: weight shard {name} is missing")
        problem = _safetensors_problem(p) if name.endswith(".safetensors") else ""
        if name.endswith(".bin") and not zipfile.is_zipfile(p):
            problem = f"{name} is truncated or not a torch checkpoint"
        if problem:
            raise ValueError(f"{opt} {path}: {problem}")


def check_sources(c) -> None:
    """Model, dataset and run dir exist as the settings say, before train() creates anything."""
    from pgpo_train.run.checkpoint import latest_checkpoint

    if c.model:
        if os.path.exists(c.model):
            check_model_dir(c.model)
        else:
            _check_hub_name("--model", c.model, "model")
    if c.dataset and not os.path.exists(c.dataset):
        _check_hub_name("--dataset", c.dataset, "dataset")
    import importlib.util

    if c.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report-to wandb: wandb is not installed (pip install wandb), or use --report-to none")
    if c.reward:  # importable and callable (train() tries it on a record once the data is loaded)
        from pgpo_train.data.rewards import load_reward_fn

        load_reward_fn(c.reward)
    if c.resume:
        if not os.path.isdir(c.out_dir):
            raise ValueError(f"--resume: there is no run directory {c.out_dir}")
        path = latest_checkpoint(os.path.join(c.out_dir, "checkpoints"))
        if path is None:
            raise ValueError(
                f"--resume: {c.out_dir} holds no checkpoint (the run stopped before its first one): "
                "start it again without --resume"
            )
        check_resume_settings(c, path)


# settings a resumed run may change: run length, logging, where it runs, and the memory knobs (which change the
# order of float sums at most, never the math)
RESUME_MAY_CHANGE = {
    "out_dir", "resume", "overwrite", "steps", "save_every", "keep_checkpoints", "tensorboard", "progress",
    "eval_every", "eval_size", "eval_split", "threads", "device", "micro_batch_size", "gradient_checkpointing",
    "fsdp_cpu_offload", "export_model", "export_checkpoints", "export_dtype", "report_to",
}  # fmt: skip


def check_resume_settings(c, checkpoint: str) -> None:
    """--resume continues the run only with the settings it ran with (else it would silently train another run)."""
    from pgpo_train.run.checkpoint import read_trainer_state

    saved = read_trainer_state(checkpoint).get("config")
    if not saved:
        return  # an older checkpoint without its config
    diffs = []
    for name, value, _ in _fields(c):
        if name in RESUME_MAY_CHANGE:
            continue
        run = saved
        for part in name.split("."):
            run = run.get(part) if isinstance(run, dict) else None
        if run is not None and run != value:  # None: a setting the run's version did not have
            diffs.append(f"{flag(name)} {value!r} (the run's: {run!r})")
    if diffs:
        raise ValueError(
            f"--resume: settings differ from the run in {c.out_dir}: {', '.join(diffs)}; resume with the run's "
            "settings (its config.json), or start a new run"
        )
