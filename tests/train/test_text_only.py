"""The text-only pass (docs/method.md#text-only-pass) on Qwen2.5-VL: attends to no visual token, keeps the original 3-D positions
(pgpo_train.models.model_family)."""

import pytest
import torch

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_count_records
from pgpo_train.models import model_family as mf
from pgpo_train.models.model_family import text_only_inputs
from pgpo_train.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_batch():
    model, processor = build_tiny(seed=0)
    model.eval()
    recs = make_count_records(3, seed=5)
    texts = []
    for i, r in enumerate(recs):
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=r["problem"])},
                ],
            }
        ]
        # different response lengths so left padding differs per row
        texts.append(
            processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            + r["solution"][: 10 + 7 * i]
        )
    batch = processor(text=texts, images=[r["image"] for r in recs], return_tensors="pt", padding=True)
    return model, batch


def test_positions_are_3d_and_match_processor_route(tiny_batch):
    model, b = tiny_batch
    pos = mf.position_ids(model, b["input_ids"], b["attention_mask"], image_grid_thw=b["image_grid_thw"])
    assert pos.shape == (3, *b["input_ids"].shape)
    vis = mf.visual_mask(model, b["input_ids"])
    # image tokens of a 2x2 grid share the temporal position and vary in height/width: truly 3-D
    assert not torch.equal(pos[1][vis], pos[2][vis])
    # the model's own route (mm_token_type_ids from the processor) gives the same positions
    ref, _ = model.model.get_rope_index(
        b["input_ids"],
        mm_token_type_ids=b["mm_token_type_ids"],
        image_grid_thw=b["image_grid_thw"],
        attention_mask=b["attention_mask"],
    )
    assert torch.equal(pos, ref)
    # and the visual pass with explicit positions equals the model's default forward
    with torch.no_grad():
        a = model(
            **mf.visual_inputs(model, b["input_ids"], b["attention_mask"], pos, b)
        ).logits
        model.model.rope_deltas = None
        c = model(**b).logits
    m = b["attention_mask"].bool()
    assert (a - c)[m].abs().max() < 1e-5


def test_text_only_equals_deleting_visual_tokens_keeping_positions(tiny_batch):
    model, b = tiny_batch
    pos = mf.position_ids(model, b["input_ids"], b["attention_mask"], image_grid_thw=b["image_grid_thw"])
    kw = text_only_inputs(model, b["input_ids"], b["attention_mask"], pos)
    assert "pixel_values" not in kw
    vis = mf.visual_mask(model, b["input_ids"])
    assert not kw["attention_mask"].bool()[vis].any()
    with torch.no_grad():
        txt = model(**kw).logits  # [B, L, V]
        assert torch.isfinite(txt[b["attention_mask"].bool()]).all()
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool() & ~vis[i]
            ids = b["input_ids"][i][keep][None]
            ref = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos[:, i : i + 1, keep]
            ).logits[0]
            diff = (txt[i][keep] - ref).abs().max().item()
            assert diff < 1e-5, diff
        # the reference with positions recomputed (shifted) differs clearly: the test can tell the two apart
        ids = b["input_ids"][0][b["attention_mask"][0].bool() & ~vis[0]][None]
        shifted = model(input_ids=ids).logits[0]
        assert (txt[0][b["attention_mask"][0].bool() & ~vis[0]] - shifted).abs().max() > 1e-4


def test_text_only_ignores_visual_content(tiny_batch):
    """Zeroed (or random) embeddings on the visual tokens change nothing: they are not attended."""
    model, b = tiny_batch
    pos = mf.position_ids(model, b["input_ids"], b["attention_mask"], image_grid_thw=b["image_grid_thw"])
    kw = text_only_inputs(model, b["input_ids"], b["attention_mask"], pos)
    vis = mf.visual_mask(model, b["input_ids"])
    with torch.no_grad():
        txt = model(**kw).logits
        emb = model.get_input_embeddings()(b["input_ids"])
        for fill in (torch.zeros_like(emb), torch.randn_like(emb) * 3):
            e = torch.where(vis[..., None], fill, emb)
            alt = model(inputs_embeds=e, attention_mask=kw["attention_mask"], position_ids=pos).logits
            keep = kw["attention_mask"].bool()
            assert (txt - alt)[keep].abs().max() < 1e-6
        # while the visual pass does depend on the image
        vis_logits = model(
            **mf.visual_inputs(model, b["input_ids"], b["attention_mask"], pos, b)
        ).logits
    after = b["attention_mask"].bool() & ~vis & (vis.long().cumsum(-1) > 0)
    assert (txt - vis_logits)[after].abs().max() > 1e-4


def test_bad_inputs_are_refused(tiny_batch):
    model, b = tiny_batch
    with pytest.raises(ValueError, match=r"position_ids must be \[3, 3, "):
        text_only_inputs(model, b["input_ids"], b["attention_mask"], b["input_ids"])
    with pytest.raises(ValueError, match="supported families"):
        mf.position_ids(torch.nn.Linear(2, 2), b["input_ids"], b["attention_mask"], image_grid_thw=b["image_grid_thw"])


def test_training_forward_matches_generate(tiny_batch):
    """Log-probs of sampled tokens recomputed with explicit 3-D positions equal generate()'s own (left-padded batch,
    stale rope_deltas left on the model by generate): the policy gradient sees the sampling distribution."""
    from pgpo_train.models.policy import eos_ids
    from pgpo_train.models.policy import response_logits
    from pgpo_train.step.batching import build_sequences
    from pgpo_train.step.batching import encode_prompts
    from pgpo_train.step.batching import model_inputs
    from pgpo_train.step.batching import response_mask_from
    from pgpo_train.step.batching import visual_kwargs

    model, _ = tiny_batch
    from pgpo_train.models.tiny import build_processor

    processor = build_processor()
    recs = make_count_records(3, seed=11)
    recs[1]["problem"] = "How many red shapes are there in this picture, please?"  # different prompt lengths
    prompt = encode_prompts(processor, recs, "tiny", 2, "cpu")
    stop = eos_ids(model, processor)
    out = model.generate(
        **model_inputs(prompt),
        do_sample=True,
        max_new_tokens=10,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=stop,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    resp = out.sequences[:, prompt["input_ids"].shape[1] :]
    mask = response_mask_from(resp, stop)
    batch = build_sequences(model, prompt, resp, mask, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, visual_kwargs(model, batch), resp.shape[1], 1.0)
    lp_fwd = torch.log_softmax(logits, -1).gather(-1, batch["responses"][..., None]).squeeze(-1)
    lp_gen = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, resp[..., None]).squeeze(-1)
    assert ((lp_fwd - lp_gen).abs() * mask).max() < 1e-4


def test_select_images_splits_by_image_not_evenly():
    """Samples with 2, 0 and 1 images of different patch counts: each keeps exactly its own rows
    (docs/method.md#trainer-traps)."""
    from types import SimpleNamespace

    qwen = SimpleNamespace(model_type="qwen2_5_vl")  # a config: the family (and its "patches" layout) is all it needs
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 4]])  # 4, 8 and 16 patch rows
    pixels = torch.arange(28.0)[:, None].expand(28, 3)  # row r holds r
    mm = {"pixel_values": pixels, "image_grid_thw": grid}
    out = mf.select_images(qwen, mm, [2, 0], num_images=[2, 0, 1])
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2], [1, 2, 4]]
    assert out["pixel_values"][:, 0].tolist() == list(range(12, 28)) + list(range(12))
    assert mf.select_images(qwen, mm, [1], num_images=[2, 0, 1]) == {}  # a sample without images
    out = mf.select_images(qwen, {"pixel_values": pixels[:12], "image_grid_thw": grid[:2]}, [1])  # one image each
    assert out["image_grid_thw"].tolist() == [[1, 2, 4]] and out["pixel_values"][:, 0].tolist() == list(range(4, 12))


def test_select_images_follows_the_familys_pixel_layout():
    """The layout comes from the family's field, not from the tensors' shapes or the family's name."""
    from types import SimpleNamespace

    px = torch.arange(6.0)[:, None]
    per_image = mf.select_images(SimpleNamespace(model_type="gemma3"), {"pixel_values": px}, [4, 1])
    assert per_image["pixel_values"][:, 0].tolist() == [4.0, 1.0]
    idefics = mf.select_images(SimpleNamespace(model_type="idefics3"),
                               {"pixel_values": px, "pixel_attention_mask": px > 2}, [5])
    assert idefics["pixel_values"].tolist() == [[5.0]] and idefics["pixel_attention_mask"].tolist() == [[True]]
    internvl = SimpleNamespace(model_type="internvl")
    tiles = mf.select_images(internvl, {"pixel_values": px}, [2, 0], num_tiles=[1, 2, 3])
    assert tiles["pixel_values"][:, 0].tolist() == [3.0, 4.0, 5.0, 0.0]
    with pytest.raises(ValueError, match="needs num_tiles"):
        mf.select_images(internvl, {"pixel_values": px}, [0])
    assert {f.pixel_layout for f in mf.FAMILIES} == set(mf.PIXEL_LAYOUTS)
