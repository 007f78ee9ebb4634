"""Data: load a (hub or local) dataset with configurable columns, decode images safely, sample deterministically.

The sampler's state is one integer (records consumed), so a resumed run continues at exactly the same record.
"""

from __future__ import annotations

import io
import os
import random

from PIL import Image

from pgpo_train.data.tasks import DEFAULT_TASK
from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import save_task_dataset
from pgpo_train.data.tasks import task_cache_name

TINY_DATASET_VERSION = "count-v2"  # the count-copy task's cache name (tasks.TASKS holds every task's)


def tiny_dataset_path(cache_dir: str | None = None, seed: int = 0, task: str = DEFAULT_TASK,
                      filler: int | None = None) -> str:
    """Generates (once) an embedded task (pgpo_train.data.tasks; grid-reason with `filler` words) under a cache dir and
    returns its path."""
    cache_dir = cache_dir or os.environ.get("PGPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pgpo"))
    path = os.path.join(cache_dir, f"{task_cache_name(task, filler)}-seed{seed}")
    if not os.path.exists(os.path.join(path, "test.parquet")):
        tmp = f"{path}.tmp-{os.getpid()}"
        save_task_dataset(task, tmp, seed=seed, filler=filler)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(tmp, path)  # atomic: a concurrent generator either wins or finds it done
        except OSError:
            if not os.path.exists(os.path.join(path, "test.parquet")):
                raise
    return path


def load_split(name_or_path: str, split: str, columns: dict[str, str | None], max_samples: int = 0):
    """`datasets.load_dataset(name_or_path, split=split)` with images left undecoded and required columns checked.

    Args:
        columns: role -> column name, e.g. {"image": "image", "problem": "problem", "answer": "answer"}; roles mapped
            to None are optional.

    Raises:
        ValueError naming the missing column and the available ones.
    """
    import datasets

    try:
        ds = datasets.load_dataset(name_or_path, split=split)
    except (ValueError, FileNotFoundError) as e:  # one line naming the dataset, not datasets' traceback
        if "corresponds to no data" in str(e):  # datasets' words for an empty split
            raise ValueError(f"dataset {name_or_path!r} split {split!r} has no rows") from e
        raise ValueError(f"dataset {name_or_path!r} split {split!r}: {' '.join(str(e).split())}") from e
    missing = [f"{role}={col!r}" for role, col in columns.items() if col is not None and col not in ds.column_names]
    if missing:
        raise ValueError(
            f"dataset {name_or_path!r} split {split!r} lacks column(s) {', '.join(missing)}; available: "
            f"{ds.column_names} (set --image-column/--problem-column/--answer-column/--solution-column)"
        )
    image_col = columns.get("image")
    feature = ds.features.get(image_col)
    if isinstance(feature, datasets.Image):  # decode ourselves: a bad image is skipped
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    elif is_image_list(feature):  # a list of images per record
        ds = ds.cast_column(image_col, type(feature)(datasets.Image(decode=False)))
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"dataset {name_or_path!r} split {split!r} has no rows")
    return ds


def is_image_list(feature) -> bool:
    """Whether a datasets feature is a list of images (List(Image()) / Sequence(Image()))."""
    import datasets

    return isinstance(getattr(feature, "feature", None), datasets.Image)


def max_images_per_record(ds, image_column: str) -> int:
    """The most images any record of the split holds: 1 for a single-image column, the longest list of a list-valued
    one (read from the Arrow lengths, no image decoded). Sizes the rollout engine's per-prompt image limit and
    decides whether the model family must take several images per prompt."""
    import pyarrow.compute as pc

    if not is_image_list(ds.features.get(image_column)):
        return 1
    column = ds.with_format("arrow")[image_column]  # ListArray over the split (select/shuffle views honoured)
    lengths = pc.list_value_length(column)
    return max(1, int(pc.max(lengths).as_py() or 0))


def is_empty(value) -> bool:
    """A null or blank field: never turned into the text "None" (a `\\boxed{None}` would then score 1.0)."""
    return value is None or not str(value).strip()


def check_first_rows(ds, columns: dict[str, str | None], n: int = 32) -> None:
    """ValueError (before the model loads) when none of the first n rows has a decodable image and a non-empty
    problem, answer (and solution where asked for): the columns are wrong, not a few bad records."""
    rows = ds.select(range(min(n, len(ds))))
    text_cols = [c for role, c in columns.items() if role != "image" and c]
    images = texts = 0
    for row in rows:
        img_ok = decode_images(row[columns["image"]]) is not None
        text_ok = not any(is_empty(row[c]) for c in text_cols)
        images += img_ok
        texts += text_ok
        if img_ok and text_ok:
            return
    if not images:
        first = rows[0][columns["image"]] if len(rows) else None
        raise ValueError(
            f"--image-column {columns['image']!r}: none of the first {len(rows)} records decodes to an image "
            f"(the first holds {type(first).__name__} {str(first)[:60]!r})"
        )
    raise ValueError(
        f"none of the first {len(rows)} records has a non-empty {' and '.join(map(repr, text_cols))} "
        "with a decodable image (check --problem-column/--answer-column/--solution-column)"
    )


def decode_images(value) -> list[Image.Image] | None:
    """A record's images: a list-valued image column gives all of its images in order, a single value one; None
    when the list is empty or any of its images cannot be decoded (the record is skipped, never half-read)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    images = [decode_image(v) for v in values]
    return images if images and all(im is not None for im in images) else None


def record_images(record: dict) -> list:
    """A record's images: its "images" list (RecordStream's records), or its "image", one or a list (a row of the
    embedded tasks' generators, which tests and benchmarks feed in directly)."""
    images = record["images"] if "images" in record else record["image"]
    return list(images) if isinstance(images, (list, tuple)) else [images]


def decode_image(value) -> Image.Image | None:
    """PIL RGB image from one datasets value (PIL, {"bytes", "path"} or a path), or None when it cannot be decoded
    (a list of images is decode_images')."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, str):
            img = Image.open(value)
        else:
            return None
        img.load()
        return img.convert("RGB")
    except Exception:  # noqa: BLE001 -- any decoding failure: the record is skipped and counted
        return None


IMAGE_MARKER = "<image>"  # where datasets such as geometry3k and ViRL39K place an image in the question text


def build_prompt(question: str, template: str, n_images: int = 1) -> list[dict]:
    """Chat messages (one user turn holding n_images images and the templated question) for
    processor.apply_chat_template.

    When the templated text holds exactly n_images "<image>" markers, each image takes its marker's place (as
    EasyR1 builds its prompts); otherwise (no markers, or a count that does not match) every image comes first and
    the markers are dropped.
    """
    template = TINY_PROMPT_TEMPLATE if template == "tiny" else template
    parts = template.format(question=question).split(IMAGE_MARKER)
    if len(parts) != n_images + 1:  # our choice: every image first, the stray markers dropped
        text = template.format(question=question.replace(IMAGE_MARKER, "").strip())
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
    content = []
    for i, part in enumerate(parts):
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
        if i < n_images:
            content.append({"type": "image"})
    return [{"role": "user", "content": content}]


class Sampler:
    """Deterministic epoch-shuffled record order; the whole state is `position` (records consumed so far)."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n <= 0:
            raise ValueError("dataset is empty")
        self.n, self.seed, self.position = n, seed, position
        self._epoch, self._perm = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def next(self) -> int:
        epoch, offset = divmod(self.position, self.n)
        self.position += 1
        return self._order(epoch)[offset]


class RecordStream:
    """Yields decoded records {"images" (a list), "problem", "answer", "solution"} in sampler order, skipping records
    with an undecodable image and those with a null/empty problem, answer or (asked for) solution; both kinds are
    counted."""

    def __init__(self, ds, columns: dict[str, str | None], sampler: Sampler):
        self.ds, self.columns, self.sampler = ds, columns, sampler
        self.skipped_images = 0
        self.skipped_empty = 0

    def next_batch(self, n: int) -> list[dict]:
        out = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 10 * n + 100:
                raise RuntimeError(
                    f"no usable record (decodable image, non-empty text) in {tries} records; check the --*-column flags"
                )
            row = self.ds[self.sampler.next()]
            if any(is_empty(row[c]) for role, c in self.columns.items() if role != "image" and c):
                self.skipped_empty += 1
                continue
            images = decode_images(row[self.columns["image"]])
            if images is None:
                self.skipped_images += 1
                continue
            rec = {
                "images": images,
                "problem": str(row[self.columns["problem"]]),
                "answer": str(row[self.columns["answer"]]),
            }
            sol_col = self.columns.get("solution")
            if sol_col:
                rec["solution"] = str(row[sol_col])
            out.append(rec)
        return out
