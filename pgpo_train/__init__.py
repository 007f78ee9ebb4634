"""pgpo_train: a lean PGPO training loop on transformers' Qwen2.5-VL.

    train(TrainConfig(...))                      the loop (pgpo-train / python -m pgpo_train)
    build_tiny(), save_tiny_checkpoint(path)     the embedded tiny Qwen2.5-VL + processor
    make_count_records(n), save_count_dataset()  the synthetic visual task
    mrope_position_ids(), text_only_inputs()     the text-only pass of SPEC section 1
    compute_score(response, answer)              0.9 x accuracy (math-verify) + 0.1 x format

Names resolve lazily, so `import pgpo_train` stays cheap.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "pgpo_train.config",
    "PGPOConfig": "pgpo_train.config",
    "train": "pgpo_train.train",
    "build_tiny": "pgpo_train.tiny",
    "build_processor": "pgpo_train.tiny",
    "load_processor": "pgpo_train.tiny",
    "save_tiny_checkpoint": "pgpo_train.tiny",
    "make_count_records": "pgpo_train.tiny",
    "save_count_dataset": "pgpo_train.tiny",
    "mrope_position_ids": "pgpo_train.text_only",
    "text_only_inputs": "pgpo_train.text_only",
    "visual_inputs": "pgpo_train.text_only",
    "compute_score": "pgpo_train.rewards",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pgpo_train' has no attribute {name!r}")
