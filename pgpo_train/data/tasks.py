"""The embedded synthetic tasks, selectable with `pgpo-train --task NAME`.

grid-count (default): an 84x84 image holds a 3x3 grid of cells; N of them (N = 0..9, balanced) hold a red, green or
    blue shape. The question is always "How many shapes?", so the text alone says nothing about N: a text-only
    predictor is at chance (1/10). The response is `<think></think>\\boxed{N}`: the one token that decides the
    reward is read off the image, which is the case PGPO's visual-dependency weighting is designed for. The warm-up
    references come from a teacher that undercounts crowded grids (TEACHER_UNDERCOUNT_FROM), which leaves RL room.
count-copy (make_count_records, the contrast to grid-count): a 2x2 grid; "How many <colour> shapes?"; the response
    counts every colour inside <think> and copies the asked one into \\boxed{}. After the warm-up the errors are in
    that copy, a text-only token with almost no token KL, so PGPO (as the paper defines it) moves advantage away
    from the error and is expected NOT to help (measured: benchmarks/results/train_dapo_vs_pgpo/).

Both tasks share the shapes, colours, drawing and dataset saving of count-copy, which come first.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from PIL import ImageDraw

# %% shared pieces and the count-copy task

# The prompt every embedded task (and the tiny tokenizer's corpus) uses around its question.
TINY_PROMPT_TEMPLATE = "{question} Think in <think></think>, answer in \\boxed{{}}."

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
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
        records = make_records(n, s)
        several = isinstance(records[0]["image"], list)  # pair-count: a list of images per record
        features = datasets.Features(
            {
                "image": datasets.List(datasets.Image()) if several else datasets.Image(),
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "solution": datasets.Value("string"),
            }
        )
        datasets.Dataset.from_list(records, features=features).to_parquet(os.path.join(path, f"{split}.parquet"))
    return str(path)



# %% grid-count

GRID_IMAGE_SIZE = 84  # 6x6 patches of 14 -> 3x3 = 9 image tokens after the 2x2 merge: one per cell
GRID_SIDE = 3
GRID_MAX = GRID_SIDE * GRID_SIDE  # answers 0..9
GRID_QUESTION = "How many shapes?"
# The warm-up's reference answers come from an imperfect teacher that undercounts crowded grids: for N >= 5 shapes
# it writes N - 1 in 3 of 4 records (the "answer" column, which the reward checks, is always the true N). Why: SFT
# makes the policy calibrated to its references, and a calibrated policy's greedy answer is already the best its
# perception allows, so on exact references RL only sharpens sampling and greedy accuracy barely moves in a few
# minutes (measured: benchmarks/results/train_task_ablation/exploration/). The teacher's bias leaves a systematic
# error on the visual answer token that only the verifiable reward reveals: the room RL (and PGPO's weighting) can
# visibly use.
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


def balanced_answers(n: int, rng: random.Random) -> list[int]:
    """[n] answers 0..GRID_MAX, each block of GRID_MAX + 1 a shuffled permutation (balanced), drawn from rng."""
    answers: list[int] = []
    while len(answers) < n:
        block = list(range(GRID_MAX + 1))
        rng.shuffle(block)
        answers += block
    return answers[:n]


def make_grid_records(n: int, seed: int = 0) -> list[dict]:
    """[n] grid-count records, deterministic in seed; each block of 10 holds every answer 0..9 once (balanced)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    answers = balanced_answers(n, rng)
    return [make_grid_example(a, rng) for a in answers]


# %% grid-reason

# The paper's response shape on the grid-count image: the answer is the same image-decided count, but the
# reference response reasons in many tokens: linguistic filler sampled with real entropy (random phrases in random
# order, no bearing on the reward), a few tokens read off the image (the count of each row), a text-derived total
# (the sum of the row counts) and the boxed answer. --task-filler N sets the filler words (0: no linguistic content).
#   <think>{f} 1: c1,{f} 2: c2,{f} 3: c3.{f} c1+c2+c3=T</think>\boxed{T}
# The N filler words are split over the 4 slots by a fixed rule (filler_slots), so every structural token sits at a
# fixed position for a given N: the filler's randomness is in its words, not in where the counts go.
# Every filler word is ONE token of the tiny tokenizer (tested), so N words are N response tokens; no colour word
# and no digit is used (the filler must not look like a count).
FILLER_WORDS = (
    "the", "a", "is", "are", "of", "to", "and", "many", "shapes", "in", "answer", "How", "Think", "user", "system",
    "assistant",
)  # fmt: skip
FILLER_PHRASES = (
    "the shapes are many",
    "and the answer is",
    "Think of the shapes",
    "How many are in a",
    "the user is to answer",
    "a system of shapes",
    "and many are in the",
    "the assistant is to Think",
    "of the shapes in a",
    "How to answer the user",
    "Think and answer",
    "are the shapes in the system",
)
DEFAULT_FILLER = 24  # --task-filler auto for grid-reason
# The warm-up teacher keeps grid-count's undercount (TEACHER_UNDERCOUNT_FROM, _P): for N >= 5 it writes the LAST
# non-empty row's count one too low in 3 of 4 records, and the total and box consistently (N - 1). The bias is
# needed for the reason given at TEACHER_UNDERCOUNT_FROM, and it must sit on a fixed row: with a random row each
# row count is low in well under half of the records, the warm-up's greedy counts are exact and RL has almost
# nothing to fix (measured: greedy eval 0.91 after the warm-up, filler 24, seed 0). Its error sits on a visual
# token (a row count, which now also needs the whole grid's count), and the total then follows from the text.


def filler_slots(n_words: int) -> list[int]:
    """The filler words before row 1, row 2, row 3 and the total: n_words split as evenly as possible, first slots
    first (fixed for a given n_words)."""
    base, extra = divmod(n_words, 4)
    return [base + (i < extra) for i in range(4)]


def filler_text(k: int, rng: random.Random) -> str:
    """k filler words: random phrases of FILLER_PHRASES in random order, cut at k words, each with a leading space."""
    words: list[str] = []
    while len(words) < k:
        words += rng.choice(FILLER_PHRASES).split()
    return "".join(" " + w for w in words[:k])


def grid_reason_response(rows: list[int], n_words: int, rng: random.Random) -> str:
    """The reference response for row counts `rows` [3] with n_words filler words (see FILLER_WORDS)."""
    f = [filler_text(k, rng) for k in filler_slots(n_words)]
    total = sum(rows)
    counts = "".join(f"{f[i]} {i + 1}: {c}{',' if i < 2 else '.'}" for i, c in enumerate(rows))
    return f"<think>{counts}{f[3]} {'+'.join(map(str, rows))}={total}</think>\\boxed{{{total}}}"


def make_grid_reason_example(n: int, n_words: int, rng: random.Random) -> dict:
    """One grid-reason record: the grid-count image of n shapes, the same question, the true n as the answer, and
    the teacher's reasoning response (rows undercounted as described at DEFAULT_FILLER)."""
    filled = set(rng.sample(range(GRID_MAX), n))
    cells = [rng.choice(list(COLORS)) if i in filled else None for i in range(GRID_MAX)]
    image = draw_grid(cells, rng)
    rows = [sum(cells[r * GRID_SIDE + c] is not None for c in range(GRID_SIDE)) for r in range(GRID_SIDE)]
    if teacher_count(n, rng) < n:  # the teacher's undercount: the last non-empty row one too low
        r = max(i for i, c in enumerate(rows) if c > 0)
        rows[r] -= 1
    return {
        "image": image,
        "problem": GRID_QUESTION,
        "answer": str(n),
        "solution": grid_reason_response(rows, n_words, rng),
    }


def make_grid_reason_records(n: int, seed: int = 0, filler: int = DEFAULT_FILLER) -> list[dict]:
    """[n] grid-reason records with `filler` filler words each, deterministic in (seed, filler); balanced answers
    as make_grid_records."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if filler < 0:
        raise ValueError(f"filler must be >= 0 words, got {filler}")
    rng = random.Random(seed)
    answers = balanced_answers(n, rng)
    return [make_grid_reason_example(a, filler, rng) for a in answers]


def probe_ignored_ids(task: str, tokenizer) -> list[int]:
    """Token ids the warm-up's exact-match probe (sft/seq_acc) skips: grid-reason's filler words, which are random
    by design (no argmax can match them); none for the other tasks."""
    if task != "grid-reason":
        return []
    return [tokenizer.convert_tokens_to_ids("\u0120" + w) for w in FILLER_WORDS]


def grid_reason_max_tokens(filler: int) -> int:
    """Rollout token budget of grid-reason: the longest reference (29 structural tokens + filler + eos) plus 8."""
    return 38 + filler


# %% pair-count: two images, one answer

# Two count-copy images (2x2 grids) in one prompt, "How many shapes in both images?": the answer is the sum of the
# two images' counts, so neither image alone decides it and the text decides nothing. The totals 0..8 are balanced
# (each block of 9 records holds every total once; the split between the images is drawn among the splits that
# fit), so a text-only predictor is at chance (1/9), and one image alone leaves 2-5 totals open. The reference
# response reads each image's count, then adds them in text:
#   <think>a+b=s</think>\boxed{s}
# a and b are visual tokens of different images (the text-only pass must mask both images to lose them); s follows
# from the text. The references are exact (no teacher bias): this task exercises multi-image prompts end to end.
PAIR_QUESTION = "How many shapes in both images?"
PAIR_MAX = 2 * GRID * GRID  # totals 0..8


def pair_response(a: int, b: int) -> str:
    return f"<think>{a}+{b}={a + b}</think>\\boxed{{{a + b}}}"


def make_pair_example(total: int, rng: random.Random) -> dict:
    """One pair-count record with `total` shapes over its two images: {"image": [PIL, PIL], "problem", "answer",
    "solution"}."""
    per_image = GRID * GRID
    a = rng.choice([k for k in range(per_image + 1) if 0 <= total - k <= per_image])
    images = []
    for n in (a, total - a):
        filled = set(rng.sample(range(per_image), n))
        images.append(draw_cells([rng.choice(list(COLORS)) if i in filled else EMPTY for i in range(per_image)], rng))
    return {"image": images, "problem": PAIR_QUESTION, "answer": str(total), "solution": pair_response(a, total - a)}


def make_pair_records(n: int, seed: int = 0) -> list[dict]:
    """[n] pair-count records, deterministic in seed; each block of PAIR_MAX + 1 holds every total once."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    totals: list[int] = []
    while len(totals) < n:
        block = list(range(PAIR_MAX + 1))
        rng.shuffle(block)
        totals += block
    return [make_pair_example(t, rng) for t in totals[:n]]


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
    "grid-reason": Task(
        "grid-reason",
        "grid-reason-v2",  # + "-f{filler}" (task_cache_name)
        make_grid_reason_records,
        "grid-count's image and answer, a reasoning response: filler words, row counts, a text total",
    ),
    "count-copy": Task(
        "count-copy",
        "count-v2",  # the cache name the count task had as the default, so existing caches stay valid
        make_count_records,
        "2x2 grid, count one colour, copy it into the box (a text-only error: PGPO is expected not to help)",
    ),
    "pair-count": Task(
        "pair-count",
        "pair-count-v1",
        make_pair_records,
        "two 2x2 grids per prompt, count the shapes in both (needs both images: multi-image prompts)",
    ),
}
DEFAULT_TASK = "grid-count"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def task_filler(task: str, filler: int | None) -> int:
    """The filler words of a task: None (auto) is DEFAULT_FILLER for grid-reason; other tasks take none."""
    if task != "grid-reason":
        if filler not in (None, 0):
            raise ValueError(f"--task-filler applies to --task grid-reason only, got {filler} with --task {task}")
        return 0
    return DEFAULT_FILLER if filler is None else filler


def task_cache_name(task: str, filler: int | None = None) -> str:
    """The generated dataset's cache key: the task's version, plus the filler words for grid-reason."""
    v = get_task(task).version
    return f"{v}-f{task_filler(task, filler)}" if task == "grid-reason" else v


def records_fn(task: str, filler: int | None = None) -> Callable[[int, int], list[dict]]:
    """(n, seed) -> records of a task (grid-reason with its filler words)."""
    make = get_task(task).make_records
    if task != "grid-reason":
        return make
    k = task_filler(task, filler)
    return lambda n, seed: make(n, seed, k)


def save_task_dataset(
    task: str, path: str | os.PathLike, n_train: int = 2048, n_test: int = 256, seed: int = 0, filler: int | None = None
) -> str:
    """Writes a task as parquet splits under path, loadable by `datasets.load_dataset(path)`; returns path."""
    return save_records_dataset(path, records_fn(task, filler), n_train, n_test, seed)
