"""pgpo_train: a lean PGPO training loop on transformers' VLMs (README "Architecture" for the package map).

    train(TrainConfig(...))                      the loop (pgpo-train / python -m pgpo_train)
    build_tiny(), save_tiny_checkpoint(path)     the embedded tiny Qwen2.5-VL + processor
    make_count_records(n), save_count_dataset()  the synthetic visual task
    position_ids(), visual_inputs(), text_only_inputs()  both passes, docs/method.md#text-only-pass
    compute_score(response, answer)              0.9 x accuracy (math-verify) + 0.1 x format

Names resolve lazily, so `import pgpo_train` stays cheap.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "pgpo_train.run.config",
    "PGPOWeightsConfig": "pgpo_train.run.config",
    "train": "pgpo_train.recipe.train",
    "build_tiny": "pgpo_train.models.tiny",
    "build_processor": "pgpo_train.models.tiny",
    "load_processor": "pgpo_train.models.processor",
    "save_tiny_checkpoint": "pgpo_train.models.tiny",
    "make_count_records": "pgpo_train.data.tasks",
    "save_count_dataset": "pgpo_train.data.tasks",
    "position_ids": "pgpo_train.models.model_family",
    "text_only_inputs": "pgpo_train.models.model_family",
    "visual_inputs": "pgpo_train.models.model_family",
    "compute_score": "pgpo_train.data.rewards",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pgpo_train' has no attribute {name!r}")
