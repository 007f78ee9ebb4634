"""The embedded tasks: grid-count's answers are balanced and need the image (no text-only predictor beats chance);
count-copy stays selectable with --task."""

import collections
import math

import pytest

from pgpo_train.data.tasks import GRID_MAX
from pgpo_train.data.tasks import TASKS
from pgpo_train.data.tasks import TEACHER_UNDERCOUNT_FROM
from pgpo_train.data.tasks import TEACHER_UNDERCOUNT_P
from pgpo_train.data.tasks import get_task
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import make_grid_records
from pgpo_train.data.tasks import save_task_dataset
from pgpo_train.run.config import TrainConfig


def test_grid_answers_balanced_and_match_the_image():
    recs = make_grid_records(200, seed=3)
    counts = collections.Counter(r["answer"] for r in recs)
    assert counts == {str(n): 20 for n in range(GRID_MAX + 1)}
    for r in recs[:30]:  # the answer is what the image shows: count the non-background cells' centres
        img = r["image"]
        cell = img.width // 3
        filled = sum(
            img.getpixel((x * cell + cell // 2, y * cell + cell // 2)) != (245, 245, 245)
            for x in range(3)
            for y in range(3)
        )
        assert filled == int(r["answer"])


def test_grid_teacher_undercounts_only_crowded_grids():
    """The warm-up references: exact below TEACHER_UNDERCOUNT_FROM shapes, N - 1 at about the documented rate above."""
    recs = make_grid_records(2000, seed=5)
    told = [(int(r["answer"]), int(r["solution"].split("{")[-1].rstrip("}"))) for r in recs]
    assert all(t == n for n, t in told if n < TEACHER_UNDERCOUNT_FROM)
    crowded = [(n, t) for n, t in told if n >= TEACHER_UNDERCOUNT_FROM]
    assert all(t in (n, n - 1) for n, t in crowded)
    rate = sum(t == n - 1 for n, t in crowded) / len(crowded)
    assert abs(rate - TEACHER_UNDERCOUNT_P) < 0.04  # 1000 draws: sd ~0.014
    assert all(r["solution"] == f"<think></think>\\boxed{{{t}}}" for r, (_, t) in zip(recs, told))


def test_grid_text_only_predictor_is_at_chance():
    """Everything but the image (question, and the solution's text outside the answer) is independent of the answer:
    the best question-only predictor, fitted on one seed's records, scores chance (1/10) on another's."""
    train, test = make_grid_records(500, seed=0), make_grid_records(500, seed=1)
    by_question = collections.defaultdict(collections.Counter)
    for r in train:
        by_question[r["problem"]][r["answer"]] += 1
    guess = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    acc = sum(guess.get(r["problem"], "0") == r["answer"] for r in test) / len(test)
    assert acc == pytest.approx(0.1, abs=0.005)  # balanced blocks: exactly 50 of each answer in 500
    template = {r["solution"].split("{")[0] for r in test}
    assert template == {"<think></think>\\boxed"}  # the response's text before the answer carries nothing either


def test_count_copy_answer_is_partly_guessable_from_text():
    """Contrast: count-copy's question names a colour, the case PGPO is not expected to help with."""
    recs = make_count_records(50, seed=0)
    assert len({r["problem"] for r in recs}) == 3


def test_task_is_selectable_and_validated(tmp_path):
    assert set(TASKS) == {"grid-count", "grid-reason", "count-copy", "pair-count"}
    assert TrainConfig().task == "grid-count"
    c = TrainConfig(task="count-copy", out_dir=str(tmp_path)).resolved()
    assert (c.sft_steps, c.sft_stop_acc) == (300, 0.0)  # count-copy's warm-up: fixed length, no accuracy stop
    g = TrainConfig(out_dir=str(tmp_path)).resolved()
    assert (g.sft_steps, g.sft_stop_acc) == (1000, 0.75)
    with pytest.raises(ValueError, match="--task"):
        TrainConfig(task="nope", out_dir=str(tmp_path)).resolved()
    with pytest.raises(ValueError, match="--task"):
        get_task("nope")


def test_count_copy_dataset_is_the_old_default(tmp_path):
    """--task count-copy generates exactly the data of save_count_dataset, so its benchmark results stay comparable."""
    import datasets

    from pgpo_train.data.tasks import save_count_dataset

    a = save_task_dataset("count-copy", tmp_path / "a", n_train=6, n_test=3, seed=0)
    b = save_count_dataset(tmp_path / "b", n_train=6, n_test=3, seed=0)
    for split in ("train", "test"):
        da = datasets.load_dataset(a, split=split)
        db = datasets.load_dataset(b, split=split)
        assert da["answer"] == db["answer"] and da["problem"] == db["problem"]
        assert [x["bytes"] for x in da.cast_column("image", datasets.Image(decode=False))["image"]] == [
            x["bytes"] for x in db.cast_column("image", datasets.Image(decode=False))["image"]
        ]


def test_grid_image_is_nine_image_tokens():
    from pgpo_train.data.loading import build_prompt
    from pgpo_train.models.tiny import build_processor

    proc = build_processor()
    r = make_grid_records(1, seed=0)[0]
    text = proc.apply_chat_template(build_prompt(r["problem"], "tiny"), add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[r["image"]], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 6, 6]]  # 6x6 patches -> 3x3 merged tokens: one per cell
    assert int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 9


# %% grid-reason


def _rows_total(solution):
    think = solution.split("</think>")[0]
    expr = think.split()[-1]  # "c1+c2+c3=T"
    rows, total = expr.split("=")
    return [int(c) for c in rows.split("+")], int(total), int(solution.split("{")[-1].rstrip("}"))


@pytest.mark.parametrize("filler", [0, 24])
def test_grid_reason_records(filler):
    """Same images and balanced answers as grid-count; the response's row counts are the image's (the teacher's
    undercount aside), its total their sum, the box the total; every filler word is one tiny-tokenizer token, so
    the response is 26 structural tokens + the filler."""
    from pgpo_train.data.tasks import FILLER_WORDS
    from pgpo_train.data.tasks import make_grid_reason_records
    from pgpo_train.models.tiny import build_tokenizer

    recs = make_grid_reason_records(200, seed=3, filler=filler)
    assert collections.Counter(r["answer"] for r in recs) == {str(n): 20 for n in range(GRID_MAX + 1)}
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    assert all("\u0120" + w in vocab for w in FILLER_WORDS)
    under = 0
    for r in recs:
        n = int(r["answer"])
        img = r["image"]
        cell = img.width // 3
        rows_img = [
            sum(img.getpixel((x * cell + cell // 2, y * cell + cell // 2)) != (245, 245, 245) for x in range(3))
            for y in range(3)
        ]
        rows, total, boxed = _rows_total(r["solution"])
        assert total == sum(rows) == boxed and total in (n, n - 1)
        assert all(a - b in (0, 1) for a, b in zip(rows_img, rows)) and sum(rows_img) == n
        under += total == n - 1
        assert total == n or n >= TEACHER_UNDERCOUNT_FROM
        assert len(tok(r["solution"])["input_ids"]) == 26 + filler
        words = [w for w in r["solution"].replace("<think>", " ").split("</think>")[0].split() if w.isalpha()]
        assert len(words) == filler and set(words) <= set(FILLER_WORDS)
    assert under > 0


def test_grid_reason_text_only_predictor_is_at_chance():
    """Question and filler carry nothing about the answer: the question-only predictor is at chance, and so is a
    naive Bayes predictor on the filler words (fitted on one seed, scored on another)."""
    from pgpo_train.data.tasks import make_grid_reason_records

    train = make_grid_reason_records(1000, seed=0, filler=24)
    test = make_grid_reason_records(1000, seed=1, filler=24)
    assert {r["problem"] for r in train + test} == {"How many shapes?"}  # one question: at most 1/10 (balanced)

    def words(r):
        return [w for w in r["solution"].split("</think>")[0].replace("<think>", " ").split() if w.isalpha()]

    counts = collections.defaultdict(collections.Counter)
    for r in train:
        counts[r["answer"]].update(words(r))
    vocab = {w for c in counts.values() for w in c}

    def score(a, ws):
        c, n = counts[a], sum(counts[a].values())
        return sum(math.log((c[w] + 1) / (n + len(vocab))) for w in ws)

    acc = sum(max(counts, key=lambda a: score(a, words(r))) == r["answer"] for r in test) / len(test)
    assert acc < 0.14  # chance 0.10; sd ~0.01 at 1000 records


def test_grid_reason_config(tmp_path):
    from pgpo_train.data.tasks import probe_ignored_ids
    from pgpo_train.models.tiny import build_tokenizer

    c = TrainConfig(task="grid-reason", out_dir=str(tmp_path)).resolved()
    assert (c.task_filler, c.max_new_tokens, c.sft_stop_acc) == (24, 62, 0.75)
    assert TrainConfig(task="grid-reason", task_filler=0, out_dir=str(tmp_path)).resolved().max_new_tokens == 38
    assert TrainConfig(out_dir=str(tmp_path)).resolved().task_filler == 0
    with pytest.raises(ValueError, match="--task-filler"):
        TrainConfig(task_filler=8, out_dir=str(tmp_path)).resolved()
    with pytest.raises(ValueError, match="task-filler"):
        TrainConfig(task="grid-reason", task_filler=-3, out_dir=str(tmp_path)).resolved()
    tok = build_tokenizer()
    ids = probe_ignored_ids("grid-reason", tok)
    assert len(set(ids)) == 16 and tok.unk_token_id not in ids and probe_ignored_ids("grid-count", tok) == []
