"""Drop-in PGPO for the trainers people already run.

- TRL: `PGPOGRPOTrainer` / `PGPOConfig` (needs `pip install "pgpo[trl]"`; imported lazily, on first access).
- verl / EasyR1: `pgpo_reshape_advantages_`, `pgpo_text_only_batch` and `PGPOVerlTrainerMixin` (torch only; verl itself
  is not imported).

The core package never imports trl or verl: `import pgpo_train.integrations` works without either.
"""

from pgpo_train.integrations.token_scores import k3_scores
from pgpo_train.integrations.token_scores import pgpo_weights_from_passes
from pgpo_train.integrations.verl import PGPOVerlTrainerMixin
from pgpo_train.integrations.verl import pgpo_reshape_advantages_
from pgpo_train.integrations.verl import pgpo_text_only_batch

_TRL_NAMES = ("PGPOGRPOTrainer", "PGPOConfig")

__all__ = [
    "PGPOConfig",
    "PGPOGRPOTrainer",
    "PGPOVerlTrainerMixin",
    "k3_scores",
    "pgpo_reshape_advantages_",
    "pgpo_text_only_batch",
    "pgpo_weights_from_passes",
]


def __getattr__(name: str):
    # our choice: TRL names resolve lazily so that importing this package never requires trl
    if name in _TRL_NAMES:
        from pgpo_train.integrations import trl as _trl

        return getattr(_trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
