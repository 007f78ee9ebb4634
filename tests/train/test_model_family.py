"""The model-family layer on a tiny random model of every supported family (docs/method.md#families).

For each family: the text-only pass equals a forward with the visual tokens deleted (Idefics3 / SmolVLM, image
splitting on as by default: each image's whole span, grid tags included) and the other tokens'
positions kept (max abs diff < 1e-5 fp32), its logits do not move when the image changes (while the visual pass's
do), and the explicit positions match the model's own on an unpadded row. Responses are text: a response holding
every visual special id gets plain text positions and is never masked as an image.
"""

import pytest
import torch

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_count_records
from pgpo_train.models import model_family as mf
from pgpo_train.models.tiny_families import TINY_FAMILIES
from pgpo_train.models.tiny_families import build_tiny_family

T = 5  # response tokens


def _batch(model, processor, seed):
    """Two left-padded prompts with an image each, then right-padded responses of 5 and 3 text tokens."""
    recs = make_count_records(2, seed=seed)
    recs[1]["problem"] = "How many red shapes are there in this picture?"  # different prompt lengths
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=r["problem"])}]}],
        add_generation_prompt=True, tokenize=False) for r in recs]
    b = processor(text=texts, images=[[r["image"]] for r in recs], return_tensors="pt", padding=True,
                  padding_side="left")
    tok = processor.tokenizer
    words = tok(["red 1 green 2 blue", "none 0 0"], add_special_tokens=False)["input_ids"]
    resp = torch.full((2, T), tok.pad_token_id)
    resp_mask = torch.zeros(2, T, dtype=torch.long)
    for i, w in enumerate(words):
        n = min(len(w), T - 2 * i)
        resp[i, :n], resp_mask[i, :n] = torch.tensor(w[:n]), 1
    mm = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask")}
    return {"input_ids": torch.cat([b["input_ids"], resp], 1), "attention_mask": torch.cat([b["attention_mask"],
                                                                                            resp_mask], 1),
            "prompt_len": b["input_ids"].shape[1], "mm": mm}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request):
    model, processor = build_tiny_family(request.param, seed=0)
    model.eval()
    return request.param, model, processor


def _positions(model, b):
    return mf.position_ids(model, b["input_ids"], b["attention_mask"], prompt_len=b["prompt_len"],
                           image_grid_thw=b["mm"].get("image_grid_thw"))


def _keep(pos, keep_row, i):
    return pos[:, i:i + 1, keep_row] if pos.dim() == 3 else pos[i:i + 1, keep_row]


@torch.no_grad()
def test_text_only_equals_deleting_visual_tokens_keeping_positions(family):
    name, model, processor = family
    b = _batch(model, processor, seed=5)
    ids, am, P = b["input_ids"], b["attention_mask"], b["prompt_len"]
    pos = _positions(model, b)
    kw = mf.text_only_inputs(model, ids, am, pos, prompt_len=P)
    assert "pixel_values" not in kw
    vis = mf.text_only_mask(model, ids, P)  # placeholders; Idefics3 / SmolVLM: the whole image span
    assert vis.sum() > 0 and not kw["attention_mask"].bool()[vis].any()
    assert bool((vis | ~mf.visual_mask(model, ids, P)).all())  # every placeholder is switched off
    txt = model(**kw).logits  # [B, L, V]
    for i in range(ids.shape[0]):
        keep = am[i].bool() & ~vis[i]
        kept = ids[i][keep][None]
        ref = model(input_ids=kept, attention_mask=torch.ones_like(kept), position_ids=_keep(pos, keep, i)).logits[0]
        diff = (txt[i][keep] - ref).abs().max().item()
        assert diff < 1e-5, (name, i, diff)
    # the deletion reference with recomputed (shifted) positions differs: the comparison can tell them apart
    keep = am[0].bool() & ~vis[0]
    kept = ids[0][keep][None]
    shifted = model(input_ids=kept, attention_mask=torch.ones_like(kept)).logits[0]
    assert (txt[0][keep] - shifted).abs().max() > 1e-4, name


@torch.no_grad()
def test_text_only_logits_ignore_the_image_visual_ones_do_not(family):
    name, model, processor = family
    a, c = _batch(model, processor, seed=5), _batch(model, processor, seed=6)
    c["input_ids"], c["attention_mask"] = a["input_ids"], a["attention_mask"]  # same text, other images
    for k in ("image_grid_thw", "image_sizes"):
        if k in a["mm"]:
            assert torch.equal(a["mm"][k], c["mm"][k])  # same image sizes: same placeholder layout
    out = {}
    for key, b in (("a", a), ("c", c)):
        pos = _positions(model, b)
        txt = model(**mf.text_only_inputs(model, b["input_ids"], b["attention_mask"], pos, b["prompt_len"])).logits
        vis = model(**mf.visual_inputs(model, b["input_ids"], b["attention_mask"], pos, b["mm"],
                                       b["prompt_len"])).logits
        out[key] = (txt, vis)
    text_tokens = a["attention_mask"].bool() & ~mf.text_only_mask(model, a["input_ids"])
    after_image = text_tokens & (mf.text_only_mask(model, a["input_ids"]).long().cumsum(-1) > 0)
    assert torch.equal(out["a"][0][text_tokens], out["c"][0][text_tokens]), name
    assert (out["a"][1][after_image] - out["c"][1][after_image]).abs().max() > 1e-4, name


@torch.no_grad()
def test_explicit_positions_match_the_models_own_forward(family):
    """On an unpadded row, the visual pass with our positions equals the model's default forward (which builds
    its own positions: Qwen's rope index over the processor's token types, arange for 1-D rope)."""
    name, model, processor = family
    b = _batch(model, processor, seed=5)
    i = int(b["attention_mask"][:, : b["prompt_len"]].sum(-1).argmax())  # the longer prompt: no left padding
    assert bool(b["attention_mask"][i, : b["prompt_len"]].all())
    row = {"input_ids": b["input_ids"][i:i + 1, : b["prompt_len"] + 3],
           "attention_mask": b["attention_mask"][i:i + 1, : b["prompt_len"] + 3], "prompt_len": b["prompt_len"],
           "mm": _one_sample_mm(b["mm"], i)}
    pos = _positions(model, row)
    ours = model(**mf.visual_inputs(model, row["input_ids"], row["attention_mask"], pos, row["mm"],
                                    row["prompt_len"])).logits
    fam = mf.family_of(model)
    own_kw = dict(row["mm"])
    if fam.token_type_key is not None:
        own_kw[fam.token_type_key] = mf.token_types(model, row["input_ids"])
    if hasattr(mf.unwrap(model).model, "rope_deltas"):
        mf.unwrap(model).model.rope_deltas = None
    own = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"], **own_kw).logits
    assert (ours - own).abs().max() < 1e-5, name


def _one_sample_mm(mm, i):
    out = {}
    for k, v in mm.items():
        if k == "pixel_values" and "image_grid_thw" in mm:
            rows = mm["image_grid_thw"].prod(-1).tolist()
            out[k] = torch.split(v, rows)[i]
        elif k == "image_grid_thw":
            out[k] = v[i:i + 1]
        elif k == "pixel_values" and v.shape[0] != 2:  # InternVL: tiles of both images, equal counts here
            n = v.shape[0] // 2
            out[k] = v[i * n:(i + 1) * n]
        elif k in ("mm_token_type_ids", "token_type_ids"):
            continue
        else:
            out[k] = v[i:i + 1]
    return out


def test_a_response_holding_every_visual_special_id_is_text(family):
    name, model, processor = family
    b = _batch(model, processor, seed=5)
    ids, am, P = b["input_ids"].clone(), b["attention_mask"], b["prompt_len"]
    special = mf.special_ids(model)
    assert set(mf.placeholder_ids(model)) <= set(special)
    plain = ids.clone()
    ids[0, P:P + len(special)] = torch.tensor(special[:T])  # the response samples every visual special id
    am = am.clone()
    am[0, P:] = 1
    want = mf.position_ids(model, plain, am, prompt_len=P, image_grid_thw=b["mm"].get("image_grid_thw"))
    got = mf.position_ids(model, ids, am, prompt_len=P, image_grid_thw=b["mm"].get("image_grid_thw"))
    assert torch.equal(got, want), name
    resp = got[..., 0, P:] if got.dim() == 3 else got[0, P:]
    step = resp.diff(dim=-1)
    assert bool((step == 1).all())  # text positions, one per token, on every axis
    assert not mf.visual_mask(model, ids, P)[:, P:].any()
    assert torch.equal(mf.text_only_attention_mask(model, ids, am, P)[:, P:], am[:, P:])
    with pytest.raises(ValueError, match="suppress_tokens"):
        mf.check_responses_are_text(model, ids[:, P:], am[:, P:])
    mf.check_responses_are_text(model, plain[:, P:], am[:, P:])  # plain text: fine


def test_mrope_prompt_positions_are_the_rope_index_of_the_whole_visual_sequence():
    """For Qwen the response continuation equals get_rope_index over prompt + (text) response, with padding."""
    model, processor = build_tiny_family("qwen2_5_vl")
    b = _batch(model, processor, seed=5)
    pos = _positions(model, b)
    types = mf.token_types(model, b["input_ids"], b["prompt_len"])
    ref, _ = model.model.get_rope_index(b["input_ids"], mm_token_type_ids=types,
                                        image_grid_thw=b["mm"]["image_grid_thw"], attention_mask=b["attention_mask"])
    m = b["attention_mask"].bool()
    assert torch.equal(pos[:, m], ref[:, m])


def test_peft_wrapped_models_are_unwrapped_for_lookups_and_run_wrapped():
    peft = pytest.importorskip("peft")
    model, processor = build_tiny_family("qwen2_5_vl")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert mf.unwrap(wrapped) is model
    assert mf.check_vlm(wrapped).name == "Qwen2.5-VL"
    assert mf.placeholder_ids(wrapped) == mf.placeholder_ids(model)
    b = _batch(model, processor, seed=5)
    pos = _positions(wrapped, b)
    assert torch.equal(pos, _positions(model, b))
    with torch.no_grad():
        out = wrapped(**mf.text_only_inputs(wrapped, b["input_ids"], b["attention_mask"], pos, b["prompt_len"]))
    assert torch.isfinite(out.logits).all()


def test_unknown_and_text_only_models_get_one_error_naming_the_families():
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM

    text_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    for bad in (text_model, text_model.config, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="supported families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3"):
            mf.check_vlm(bad, "X")
    with pytest.raises(ValueError, match="position_ids must be"):
        model, _ = build_tiny_family("gemma3")
        ids = torch.ones(2, 4, dtype=torch.long)
        mf.text_only_inputs(model, ids, ids, torch.zeros(3, 2, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_pgpo_train_step_runs_on_the_other_qwen_families(name):
    """pgpo-train's own loop (rollout, both passes, update) on Qwen2-VL and Qwen3-VL: old log-probs match the
    update's forward (ppo_kl ~ 0), the weights are reshaped."""
    from pgpo_train.models import policy
    from pgpo_train.rl import core_algos
    from pgpo_train.run.config import TrainConfig
    from pgpo_train.step import sampling
    from pgpo_train.step import scoring
    from pgpo_train.step import update

    cfg = TrainConfig(algo="pgpo", max_new_tokens=6).resolved()
    cfg.pgpo.backend = "torch"
    model, processor = build_tiny_family(name)
    mf.check_processor(model, processor)
    opt = policy.make_optimizer(model, 1e-3, 0.0)
    recs = make_count_records(2, seed=0)
    batch, _ = sampling.rollout(model, processor, recs, cfg, "cpu", {})
    batch.pop("texts")
    assert not torch.isin(batch["responses"], torch.tensor(mf.special_ids(model))).any()  # suppressed
    noisy = batch["rewards"] + torch.arange(len(batch["rewards"])).float()  # any non-constant rewards
    batch["advantages"], _ = core_algos.get_adv_estimator_fn("grpo")(noisy, cfg.group_size)
    batch.update(scoring.old_logp_and_scores(model, batch, cfg, {}))
    tok_adv, w = scoring.token_advantages(batch, cfg, {})
    assert w["pgpo/weight_max"] > 1.0
    m = update.policy_update(model, opt, batch, tok_adv, cfg, {})
    assert abs(m["actor/ppo_kl"]) < 1e-5 and m["actor/grad_norm"] > 0


@torch.no_grad()
def test_qwen3_vl_text_only_pass_injects_no_deepstack_features(monkeypatch):
    model, processor = build_tiny_family("qwen3_vl")
    model.eval()
    lm = model.model.language_model
    calls = []
    original = lm._deepstack_process
    monkeypatch.setattr(lm, "_deepstack_process", lambda *a, **k: calls.append(1) or original(*a, **k))
    b = _batch(model, processor, seed=5)
    pos = _positions(model, b)
    model(**mf.visual_inputs(model, b["input_ids"], b["attention_mask"], pos, b["mm"], b["prompt_len"]))
    assert calls  # the visual pass adds DeepStack features in the early layers
    calls.clear()
    model(**mf.text_only_inputs(model, b["input_ids"], b["attention_mask"], pos, b["prompt_len"]))
    assert not calls


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics_split_image_span_is_transformers_own_and_goes_with_the_image(name):
    """Image splitting on (their default): the text-only pass switches off each image's whole span, the grid tags
    <row_i_col_j>, <global-img>, <fake_token_around_image> and the newlines between rows included, exactly the
    span transformers' Idefics3Processor marks in mm_token_type_ids; two images per prompt (a 2x2 and a 1x2
    grid), and with splitting off (the global image's span only)."""
    from PIL import Image

    recs = make_count_records(2, seed=5)
    content = [{"type": "text", "text": "Look"}, {"type": "image"}, {"type": "text", "text": "and"},
               {"type": "image"}, {"type": "text", "text": "How many?"}]
    for splitting in (True, False):
        model, processor = build_tiny_family(name, image_splitting=splitting)
        tok = processor.tokenizer
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        wide = Image.new("RGB", (56, 28), "white")  # split 1 row x 2 cols
        b = processor(text=[text, text], images=[[recs[0]["image"], wide], [recs[1]["image"], wide]],
                      return_tensors="pt", padding=True, padding_side="left", return_mm_token_type_ids=True)
        ids = b["input_ids"]
        span = mf.text_only_mask(model, ids)
        assert torch.equal(span, b["mm_token_type_ids"].bool()), splitting
        grid = torch.tensor(tok.convert_tokens_to_ids(["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_2>",
                                                       "<global-img>", "<fake_token_around_image>"]))
        assert bool(span[torch.isin(ids, grid)].all())  # the grid tags go with the image
        n_crops = int(torch.isin(ids[0], grid[:3]).sum())
        assert n_crops == (3 + 2 if splitting else 0), n_crops  # of these tags, 56x56 (2x2) has 3, 56x28 (1x2) 2
        assert int(span[0].sum()) > int(mf.visual_mask(model, ids)[0].sum())
        assert not span[ids == tok.convert_tokens_to_ids("<|im_start|>")].any()  # text around the images stays
        words = tok("Look and How many?", add_special_tokens=False)["input_ids"]
        assert not span[torch.isin(ids, torch.tensor(words))].any()
    # a layout that is not Idefics3's is refused, not guessed
    bad = ids.clone()
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    bad[0, first - 2] = tok.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ValueError, match="Idefics3 / SmolVLM image layout"):
        mf.text_only_mask(model, bad)


@torch.no_grad()
@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_idefics_split_text_only_pass_does_not_see_the_grid_tags(name):
    """With splitting on, the grid tags are gone from the text-only pass: rewriting every <row_i_col_j> tag of the
    prompt leaves its logits after the image unchanged, while masking the placeholders only
    lets the tags through and its logits move. (The span's length, hence the kept positions, still
    depends on the grid: positions are kept, docs/method.md#families.)"""
    model, processor = build_tiny_family(name)
    model.eval()
    b = _batch(model, processor, seed=5)
    ids, am, P = b["input_ids"], b["attention_mask"], b["prompt_len"]
    tok = processor.tokenizer
    tags = torch.tensor(tok.convert_tokens_to_ids([f"<row_{i}_col_{j}>" for i in (1, 2) for j in (1, 2)]))
    assert int(torch.isin(ids, tags).sum()) == 4 * ids.shape[0]  # split 2x2: the tags are there
    other = ids.masked_fill(torch.isin(ids, tags), tok.convert_tokens_to_ids("<row_6_col_6>"))
    pos = _positions(model, b)
    span = mf.text_only_mask(model, ids, P)
    after = am.bool() & ~span & (span.long().cumsum(-1) > 0)
    new, old = {}, {}
    for key, x in (("ids", ids), ("other", other)):
        new[key] = model(**mf.text_only_inputs(model, x, am, pos, prompt_len=P)).logits[after]
        placeholders_only = am * ~mf.visual_mask(model, x, P)
        old[key] = model(input_ids=x, attention_mask=placeholders_only, position_ids=pos).logits[after]
    assert torch.equal(new["ids"], new["other"])
    assert (old["ids"] - old["other"]).abs().max() > 1e-4
