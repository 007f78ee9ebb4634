"""The embedded synthetic tasks, selectable with `pgpo-train --task NAME`.

grid-count (default): an 84x84 image holds a 3x3 grid of cells; N of them (N = 0..9, balanced) hold a red, green or
    blue shape. The question is always "How many shapes?", so the text alone says nothing about N: a text-only
    predictor is at chance (1/10). The response is `<think></think>\\boxed{N}`: the one token that decides the
    reward is read off the image, which is the case PGPO's visual-dependency weighting is designed for. The warm-up
    references come from a teacher that undercounts crowded grids (TEACHER_UNDERCOUNT_FROM), which leaves RL room.
count-copy (the previous default, tiny.make_count_records): a 2x2 grid; "How many <colour> shapes?"; the response
    counts every colour inside <think> and copies the asked one into \\boxed{}. After the warm-up the errors are in
    that copy, a text-only token with almost no token KL, so PGPO (as the paper defines it) moves advantage away
    from the error and is expected NOT to help (issue 10; benchmarks/results/train_dapo_vs_pgpo).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from pgpo_train.tiny import COLORS
from pgpo_train.tiny import draw_shapes
from pgpo_train.tiny import make_count_records
from pgpo_train.tiny import save_records_dataset

# %% grid-count

GRID_IMAGE_SIZE = 84  # 6x6 patches of 14 -> 3x3 = 9 image tokens after the 2x2 merge: one per cell
GRID_SIDE = 3
GRID_MAX = GRID_SIDE * GRID_SIDE  # answers 0..9
GRID_QUESTION = "How many shapes?"
# The warm-up's reference answers come from an imperfect teacher that undercounts crowded grids: for N >= 5 shapes
# it writes N - 1 in 3 of 4 records (the "answer" column, which the reward checks, is always the true N). Why: SFT
# makes the policy calibrated to its references, and a calibrated policy's greedy answer is already the best its
# perception allows, so on exact references RL only sharpens sampling and greedy accuracy barely moves in a few
# minutes (measured, issue 10). The teacher's bias leaves a systematic error on the visual answer token that only
# the verifiable reward reveals: the room RL (and PGPO's weighting) can visibly use.
TEACHER_UNDERCOUNT_FROM = 5
TEACHER_UNDERCOUNT_P = 0.75


def grid_response(n: int) -> str:
    """The reference (SFT) response: an empty think (nothing to reason in text), then the count."""
    return f"<think></think>\\boxed{{{n}}}"


def draw_grid(cells: list[str | None], rng: random.Random) -> Image.Image:
    """One jittered shape of random kind and size per non-empty cell.

    Args:
        cells: [9] colour names or None, in reading order.
    """
    return draw_shapes(cells, GRID_SIDE, GRID_IMAGE_SIZE, rng, max_pad=8)


def teacher_count(n: int, rng: random.Random) -> int:
    """The warm-up teacher's count of n shapes: n - 1 with probability TEACHER_UNDERCOUNT_P when n is large."""
    return n - 1 if n >= TEACHER_UNDERCOUNT_FROM and rng.random() < TEACHER_UNDERCOUNT_P else n


def make_grid_example(n: int, rng: random.Random) -> dict:
    """One record with exactly n shapes in random cells: {"image", "problem", "answer" (true n), "solution" (the
    teacher's reference response, see TEACHER_UNDERCOUNT_FROM)}."""
    filled = set(rng.sample(range(GRID_MAX), n))
    cells = [rng.choice(list(COLORS)) if i in filled else None for i in range(GRID_MAX)]
    image = draw_grid(cells, rng)
    return {
        "image": image,
        "problem": GRID_QUESTION,
        "answer": str(n),
        "solution": grid_response(teacher_count(n, rng)),
    }


def make_grid_records(n: int, seed: int = 0) -> list[dict]:
    """[n] grid-count records, deterministic in seed; each block of 10 holds every answer 0..9 once (balanced)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    answers: list[int] = []
    while len(answers) < n:
        block = list(range(GRID_MAX + 1))
        rng.shuffle(block)
        answers += block
    return [make_grid_example(a, rng) for a in answers[:n]]


# %% registry


@dataclass(frozen=True)
class Task:
    name: str
    version: str  # cache key of the generated dataset: bump when the generator changes
    make_records: Callable[[int, int], list[dict]]  # (n, seed) -> records
    summary: str


TASKS = {
    "grid-count": Task(
        "grid-count",
        "grid-count-v2",
        make_grid_records,
        "3x3 grid, 'How many shapes?', answer 0-9 read off the image (PGPO's case)",
    ),
    "count-copy": Task(
        "count-copy",
        "count-v2",  # the cache name the count task had as the default, so existing caches stay valid
        make_count_records,
        "2x2 grid, count one colour, copy it into the box (a text-only error: PGPO is expected not to help)",
    ),
}
DEFAULT_TASK = "grid-count"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def save_task_dataset(task: str, path: str | os.PathLike, n_train: int = 2048, n_test: int = 256, seed: int = 0) -> str:
    """Writes a task as parquet splits under path, loadable by `datasets.load_dataset(path)`; returns path."""
    return save_records_dataset(path, get_task(task).make_records, n_train, n_test, seed)
