"""pgpo-train command line (placeholder until the training issue lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("pgpo-train: the training loop has not landed yet")
