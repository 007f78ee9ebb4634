"""The embedded tasks' shared pieces and the count-copy task (tasks.py holds grid-count and the registry; tiny.py
the tiny model, its tokenizer and processor).

The count-copy task: a 56x56 image holds a 2x2 grid of cells, each empty or holding a red, green or blue shape. The
question asks how many shapes of one colour there are. The answer needs the image: without it the model can only
guess from the prior. The reference response counts every colour inside <think> and boxes the asked one, so the
visually grounded tokens (the counts in the think) and the text-grounded ones (the boxed copy) are both present.
"""

from __future__ import annotations

import os
import random

from PIL import Image
from PIL import ImageDraw

IMAGE_SIZE = 56  # pixels; 56x56 -> 4x4 patches of 14 -> 2x2 = 4 image tokens after the 2x2 merge
GRID = 2  # cells per side: one merged image token per cell
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("square", "circle", "triangle")
EMPTY = "none"


def count_question(color: str) -> str:
    return f"How many {color} shapes?"


def count_response(cells: list[str], answer: int) -> str:
    """The reference (SFT) response: the count of every colour (fixed order), then the boxed count asked for.

    our choice: per-colour counts rather than a cell-by-cell list; counting is an average over the image tokens,
    which a tiny transformer learns in minutes, while a reading-order list needs positional lookup.
    """
    counts = " ".join(f"{c} {sum(x == c for x in cells)}" for c in COLORS)
    return f"<think>{counts}</think>\\boxed{{{answer}}}"


def draw_cells(cells: list[str], rng: random.Random) -> Image.Image:
    """Draws one shape per non-empty cell, jittered a little so images differ pixel-wise.

    Args:
        cells: [GRID * GRID] colour names or EMPTY, in reading order.
        rng: source of shape kind and jitter.
    """
    return draw_shapes([None if c == EMPTY else c for c in cells], GRID, IMAGE_SIZE, rng, max_pad=6)


def draw_shapes(cells: list[str | None], side: int, size: int, rng: random.Random, max_pad: int) -> Image.Image:
    """A size x size image of a side x side grid: one shape of random kind per non-None cell (reading order), its
    box inset by a random pad in [3, max_pad] and jittered by +-2 px. Shared by the embedded tasks' generators."""
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = size // side
    for i, color in enumerate(cells):
        if color is None:
            continue
        x0, y0 = (i % side) * cell, (i // side) * cell
        pad = rng.randint(3, max_pad)
        box = (x0 + pad + rng.randint(-2, 2), y0 + pad + rng.randint(-2, 2), x0 + cell - pad, y0 + cell - pad)
        kind = rng.choice(SHAPES)
        if kind == "square":
            draw.rectangle(box, fill=COLORS[color])
        elif kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return img


def make_count_example(rng: random.Random) -> dict:
    """One record: {"image": PIL, "problem": str, "answer": str, "solution": str (reference response)}."""
    cells = [rng.choice([EMPTY, *COLORS]) for _ in range(GRID * GRID)]
    color = rng.choice(list(COLORS))
    answer = sum(c == color for c in cells)
    return {
        "image": draw_cells(cells, rng),
        "problem": count_question(color),
        "answer": str(answer),
        "solution": count_response(cells, answer),
    }


def make_count_records(n: int, seed: int = 0) -> list[dict]:
    """[n] records of the count task, deterministic in seed."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    return [make_count_example(rng) for _ in range(n)]


def save_count_dataset(path: str | os.PathLike, n_train: int = 2048, n_test: int = 256, seed: int = 0) -> str:
    """Writes the count task as parquet splits under path, loadable by `datasets.load_dataset(path)`.

    Returns:
        path, as a string.
    """
    return save_records_dataset(path, make_count_records, n_train, n_test, seed)


def save_records_dataset(path: str | os.PathLike, make_records, n_train: int, n_test: int, seed: int) -> str:
    """Writes make_records(n, seed) as train/test parquet splits (image, problem, answer, solution) under path, the
    test split from its own seed; returns path. Shared by every embedded task."""
    import datasets

    os.makedirs(path, exist_ok=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        ds = datasets.Dataset.from_list(make_records(n, s), features=features)
        ds.to_parquet(os.path.join(path, f"{split}.parquet"))
    return str(path)
