"""Prompts with several images (issue 25): a list-valued image column, every image masked in the text-only pass with
the positions kept, on a tiny model of every supported family; rows select their own images; the embedded two-image
task (pair-count); and the refusal of a processor that cannot lay several images out per prompt.

The family batches mix rows of 2, 1 and 2 images of different sizes, so a selection that assumed one image per row,
or equal counts, would hand a row another row's images (the forward's logits would differ, or its feature count
check fail).
"""

import collections
import os

import datasets
import pytest
import torch
from PIL import Image
from test_cli_validation import _png  # a PIL image as a datasets {"bytes", "path"} value

from pgpo_train.data.loading import RecordStream
from pgpo_train.data.loading import Sampler
from pgpo_train.data.loading import build_prompt
from pgpo_train.data.loading import check_first_rows
from pgpo_train.data.loading import load_split
from pgpo_train.data.loading import max_images_per_record
from pgpo_train.data.tasks import GRID
from pgpo_train.data.tasks import PAIR_MAX
from pgpo_train.data.tasks import make_count_records
from pgpo_train.data.tasks import make_pair_records
from pgpo_train.data.tasks import save_task_dataset
from pgpo_train.models import model_family as mf
from pgpo_train.models.tiny_families import TINY_FAMILIES
from pgpo_train.models.tiny_families import build_tiny_family
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import check_images_per_prompt
from pgpo_train.step.batching import concat_rollouts
from pgpo_train.step.batching import encode_prompts
from pgpo_train.step.batching import select_rows
from pgpo_train.step.batching import text_only_kwargs
from pgpo_train.step.batching import visual_kwargs

T = 4  # response tokens


def _records(seed=3):
    """Three records of 2, 1 and 2 images (one 56x28, so the placeholder counts differ between images)."""
    c = make_count_records(5, seed=seed)
    wide = Image.new("RGB", (56, 28), (200, 30, 30))
    return [{"images": [c[0]["image"], wide], "problem": "How many shapes?", "answer": "1"},
            {"images": [c[1]["image"]], "problem": "How many red shapes in this one picture?", "answer": "2"},
            {"images": [c[2]["image"], c[3]["image"]], "problem": "How many shapes?", "answer": "3"}]


def _batch(model, processor, records, rows=None):
    """records encoded as one batch, row i (rows: their indices in _records) with response i's text."""
    rows = range(len(records)) if rows is None else rows
    prompt = encode_prompts(processor, records, "tiny", 1, "cpu")
    tok = processor.tokenizer
    words = tok(["1 2 3 4", "5 6", "7 8 9"], add_special_tokens=False)["input_ids"]
    responses = torch.full((len(records), T), tok.pad_token_id)
    mask = torch.zeros(len(records), T, dtype=torch.long)
    for j, i in enumerate(rows):
        n = min(len(words[i]), T - i % 2)
        responses[j, :n], mask[j, :n] = torch.tensor(words[i][:n]), 1
    return build_sequences(model, prompt, responses, mask, tok.pad_token_id)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request):
    torch.manual_seed(0)
    model, processor = build_tiny_family(request.param, seed=0)
    model.eval()
    return request.param, model, processor


def test_list_column_loads_every_image_and_skips_a_record_with_a_bad_one(tmp_path):
    recs = make_count_records(6, seed=1)
    rows = [{"image": [_png(recs[0]["image"]), _png(recs[1]["image"])], "problem": "a", "answer": "1"},
            {"image": [_png(recs[2]["image"]), {"bytes": b"not an image", "path": None}], "problem": "b", "answer": "2"},
            {"image": [_png(recs[3]["image"])], "problem": "c", "answer": "3"},
            {"image": [], "problem": "d", "answer": "4"},
            {"image": [_png(r["image"]) for r in recs[3:6]], "problem": "e", "answer": "5"}]
    features = datasets.Features({"image": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(os.path.join(tmp_path, "train.parquet"))
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(str(tmp_path), "train", cols)
    check_first_rows(ds, cols)
    assert max_images_per_record(ds, "image") == 3
    assert max_images_per_record(ds.select([0, 2]), "image") == 2  # the rows selected, not the file's
    sampler = Sampler(len(ds), seed=0)
    sampler._order = lambda epoch: list(range(len(ds)))  # file order: the last record is reached
    stream = RecordStream(ds, cols, sampler)
    got = stream.next_batch(3)
    assert [len(r["images"]) for r in got] == [2, 1, 3]
    assert stream.skipped_images == 2  # the half-bad list and the empty one: never half-read
    assert got[0]["images"][1].tobytes() == recs[1]["image"].convert("RGB").tobytes()  # in the column's order


def test_single_image_columns_count_one():
    ds = datasets.Dataset.from_list([{"image": _png(make_count_records(1)[0]["image"])}],
                                    features=datasets.Features({"image": datasets.Image()}))
    assert max_images_per_record(ds, "image") == 1


def test_prompt_places_images_at_their_markers_or_first():
    two = build_prompt("Left <image> right <image>?", "{question} Go", 2)[0]["content"]
    assert [c["type"] for c in two] == ["text", "image", "text", "image", "text"]
    assert [c.get("text") for c in two] == ["Left", None, "right", None, "? Go"]
    first = build_prompt("Compare them.", "{question} Go", 2)[0]["content"]  # no markers: every image first
    assert [c["type"] for c in first] == ["image", "image", "text"] and first[2]["text"] == "Compare them. Go"
    stray = build_prompt("<image>One marker, two images", "{question}", 2)[0]["content"]  # a count that does not fit
    assert [c["type"] for c in stray] == ["image", "image", "text"] and stray[2]["text"] == "One marker, two images"
    # the single-image prompt is what it was (geometry3k's leading marker dropped, the image first)
    assert build_prompt("<image>Find x.", "{question} Go")[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Find x. Go"}]


@torch.no_grad()
def test_rows_select_their_own_images(family):
    """Every row alone (select_rows: its images picked by num_images) gives the logits it has in the whole batch;
    a merged batch of two rounds encoded apart (different image counts, each padded to its own largest) equals the
    batch encoded at once."""
    name, model, processor = family
    recs = _records()
    batch = _batch(model, processor, recs)
    assert batch["num_images"].tolist() == [2, 1, 2]
    full = model(**visual_kwargs(model, batch)).logits
    for i in range(3):
        row = select_rows(model, batch, torch.tensor([i]))
        one = model(**visual_kwargs(model, row)).logits[0]
        keep = batch["attention_mask"][i].bool()
        assert (one[row["attention_mask"][0].bool()] - full[i][keep]).abs().max() < 1e-5, (name, i)
    parts = [_batch(model, processor, recs[:2], rows=[0, 1]), _batch(model, processor, recs[2:], rows=[2])]
    merged = concat_rollouts(model, parts, processor.tokenizer.pad_token_id)
    assert merged["num_images"].tolist() == [2, 1, 2]
    again = model(**visual_kwargs(model, merged)).logits
    for i in range(3):
        a, b = merged["attention_mask"][i].bool(), batch["attention_mask"][i].bool()
        assert (again[i][a] - full[i][b]).abs().max() < 1e-5, (name, i)


@torch.no_grad()
def test_text_only_pass_masks_every_image_and_keeps_positions(family):
    """The text-only pass equals a forward with every image's tokens deleted and the other tokens' positions kept
    (1e-5 fp32), for rows of two images; it does not move when either image changes, while the visual pass does."""
    name, model, processor = family
    recs = _records()
    batch = _batch(model, processor, recs)
    kw = text_only_kwargs(model, batch)
    assert "pixel_values" not in kw
    ids, am, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    span = mf.text_only_mask(model, ids, ids.shape[1] - T)
    # every image's placeholders are off, read from the raw ids (no pixels enter this pass, so a placeholder left
    # on changes the logits only through its plain embedding: the deletion reference below would not see it)
    placeholders = torch.isin(ids, torch.tensor(mf.placeholder_ids(model)))
    placeholders[:, ids.shape[1] - T:] = False
    assert bool(span[placeholders].all()) and not bool(kw["attention_mask"].bool()[placeholders].any()), name
    assert bool((placeholders.sum(-1) > 0).all())
    txt = model(**kw).logits
    for i in range(3):
        keep = am[i].bool() & ~span[i]
        kept = ids[i][keep][None]
        kept_pos = pos[:, i:i + 1, keep] if pos.dim() == 3 else pos[i:i + 1, keep]
        ref = model(input_ids=kept, attention_mask=torch.ones_like(kept), position_ids=kept_pos).logits[0]
        assert (txt[i][keep] - ref).abs().max() < 1e-5, (name, i)
    # the second image of row 0 and the first of row 2 replaced by others of the same size
    other = [dict(r, images=list(r["images"])) for r in recs]
    swap = make_count_records(8, seed=11)
    other[0]["images"][1] = Image.new("RGB", (56, 28), (30, 30, 200))
    other[2]["images"][0] = swap[7]["image"]
    changed = _batch(model, processor, other)
    assert torch.equal(changed["input_ids"], ids)
    text_tokens = am.bool() & ~span
    assert torch.equal(model(**text_only_kwargs(model, changed)).logits[text_tokens], txt[text_tokens]), name
    after = text_tokens & (span.long().cumsum(-1) > 0)
    vis_a = model(**visual_kwargs(model, batch)).logits[after]
    vis_b = model(**visual_kwargs(model, changed)).logits[after]
    assert (vis_a - vis_b).abs().max() > 1e-4, name


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_onevision"])
def test_a_processor_that_folds_images_is_refused(name):
    model, processor = build_tiny_family(name)
    check_images_per_prompt(model, processor, 3, "tiny")  # the real one passes

    class Folding:  # an older processor's behaviour: several images per prompt collapse into one entry
        def __init__(self, inner):
            self.inner, self.tokenizer = inner, inner.tokenizer

        def apply_chat_template(self, *a, **kw):
            return self.inner.apply_chat_template(*a, **kw)

        def __call__(self, **kw):
            out = self.inner(**kw)
            if "image_grid_thw" in out:
                out["image_grid_thw"] = out["image_grid_thw"][:1]
            out.pop("batch_num_images", None)
            return out

    with pytest.raises(ValueError, match=f"{mf.family_of(model).name}'s processor does not lay out 2 images"):
        check_images_per_prompt(model, Folding(processor), 2, "tiny")
    check_images_per_prompt(model, Folding(processor), 1, "tiny")  # single-image data is never probed


def test_pair_count_needs_both_images():
    recs = make_pair_records(2 * (PAIR_MAX + 1), seed=0)
    assert {r["problem"] for r in recs} == {recs[0]["problem"]}  # the text is constant: it says nothing
    assert collections.Counter(r["answer"] for r in recs) == {str(t): 2 for t in range(PAIR_MAX + 1)}  # chance 1/9
    for r in recs:
        assert len(r["image"]) == 2
        a, b = r["solution"].removeprefix("<think>").split("=")[0].split("+")
        assert int(a) + int(b) == int(r["answer"]) and r["solution"].endswith(f"\\boxed{{{r['answer']}}}")
    # one image's count leaves several totals open: the other image is needed
    per_image = GRID * GRID
    open_totals = {a: [t for t in range(PAIR_MAX + 1) if 0 <= t - a <= per_image] for a in range(per_image + 1)}
    assert min(len(v) for v in open_totals.values()) == per_image + 1


def test_pair_count_dataset_round_trips(tmp_path):
    path = save_task_dataset("pair-count", tmp_path / "pair", n_train=9, n_test=9)
    cols = {"image": "image", "problem": "problem", "answer": "answer", "solution": "solution"}
    ds = load_split(path, "train", cols)
    assert max_images_per_record(ds, "image") == 2
    recs = RecordStream(ds, cols, Sampler(len(ds), 0)).next_batch(9)
    assert all(len(r["images"]) == 2 and r["images"][0].size == (56, 56) for r in recs)
