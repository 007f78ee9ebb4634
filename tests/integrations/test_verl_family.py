"""The verl helpers on the model-family layer: responses are text, placeholder ids come from the model."""

import os
import runpy

import numpy as np
import pytest
import torch

from pgpo_train.integrations import PGPOVerlTrainerMixin
from pgpo_train.integrations import pgpo_text_only_batch
from pgpo_train.models import model_family
from pgpo_train.models.tiny_families import build_tiny_family


class _Proto:
    def __init__(self, batch, non_tensor_batch=None):
        self.batch, self.non_tensor_batch, self.meta_info = batch, non_tensor_batch or {}, {}


def test_text_only_batch_masks_prompt_placeholders_only():
    model, _ = build_tiny_family("qwen2_5_vl")
    special = model_family.special_ids(model)
    image = model.config.image_token_id
    prompts = torch.tensor([[0, 11, image, image, 12]] * 2)
    responses = torch.tensor([special + [21], [21] * (len(special) + 1)])  # row 0 samples every visual special id
    input_ids = torch.cat([prompts, responses], 1)
    am = torch.cat([(prompts != 0).long(), torch.ones_like(responses)], 1)
    data = _Proto({"input_ids": input_ids, "attention_mask": am, "responses": responses,
                   "position_ids": torch.arange(input_ids.shape[1]).expand(2, 3, -1)},
                  {"multi_modal_inputs": np.array([{"pixel_values": 1}, {"pixel_values": 2}], dtype=object)})
    text = pgpo_text_only_batch(data, model)  # ids from the model's family
    P = prompts.shape[1]
    assert bool((text.batch["attention_mask"][:, :P][prompts == image] == 0).all())
    assert torch.equal(text.batch["attention_mask"][:, P:], am[:, P:])  # the responses stay attended: text
    assert torch.equal(text.batch["attention_mask"], pgpo_text_only_batch(data, [image, 999]).batch["attention_mask"])


def test_mixin_takes_the_placeholder_ids_from_the_policy_config(tmp_path):
    model, _ = build_tiny_family("gemma3")
    model.config.save_pretrained(tmp_path)

    class Cfg(dict):
        __getattr__ = dict.__getitem__

    class Trainer(PGPOVerlTrainerMixin):
        config = Cfg(actor_rollout_ref=Cfg(model=Cfg(path=str(tmp_path))), algorithm=Cfg())

    assert Trainer()._pgpo_visual_token_ids({}) == model_family.placeholder_ids(model) == [model.config.image_token_id]
    assert Trainer()._pgpo_visual_token_ids({"visual_token_ids": [7]}) == [7]


def test_verl_example_runs_on_its_defaults(capsys):
    """`python examples/verl_pgpo.py` runs even where the policy samples <|image_pad|> (it once crashed in
    get_rope_index: a sampled placeholder counted as an image)."""
    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "verl_pgpo.py"),
                          run_name="example")["main"]
    main([])
    assert "advantages now A x w~ on every valid token: True" in capsys.readouterr().out


def test_text_only_batch_masks_idefics_image_spans_from_the_config():
    """Given an Idefics3 config, the verl text-only twin switches off each image's whole span (grid tags and fake
    tokens included, image splitting on), as model_family's text-only pass does; the responses stay text."""
    from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
    from pgpo_train.data.tasks import make_count_records

    model, processor = build_tiny_family("idefics3")
    rec = make_count_records(1, seed=2)[0]
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=rec["problem"])}]}],
        add_generation_prompt=True, tokenize=False)
    prompts = processor(text=[text], images=[[rec["image"]]], return_tensors="pt")["input_ids"]
    responses = torch.tensor([[model.config.image_token_id, 21, 22]])  # a sampled placeholder is text
    input_ids = torch.cat([prompts, responses], 1)
    am = torch.ones_like(input_ids)
    data = _Proto({"input_ids": input_ids, "attention_mask": am, "responses": responses,
                   "position_ids": (am.cumsum(-1) - 1)}, {"multi_modal_inputs": np.array([{"pixel_values": 1}],
                                                                                         dtype=object)})
    text_batch = pgpo_text_only_batch(data, model.config)
    P = prompts.shape[1]
    want = model_family.text_only_attention_mask(model, input_ids, am, P)
    assert torch.equal(text_batch.batch["attention_mask"], want)
    fake = processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert bool((text_batch.batch["attention_mask"][input_ids == fake] == 0).all())
    assert int((want[0, :P] == 0).sum()) > int((prompts == model.config.image_token_id).sum())
    assert torch.equal(text_batch.batch["attention_mask"][:, P:], am[:, P:])


def test_tool_images_inside_responses_are_refused_and_sampled_placeholders_are_text():
    """Multi-turn tools that return images put placeholders on response tokens the policy did not sample
    (response_mask 0): refused. A placeholder the policy sampled (response_mask 1) is text, as before."""
    model, _ = build_tiny_family("qwen2_5_vl")
    image = model.config.image_token_id
    prompts = torch.tensor([[11, image, image, 12]] * 2)
    responses = torch.tensor([[21, image, image, 22], [21, image, 22, 23]])
    response_mask = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]])  # row 0: a tool's image; row 1: sampled
    input_ids = torch.cat([prompts, responses], 1)
    data = _Proto({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "responses": responses,
                   "response_mask": response_mask, "position_ids": torch.arange(8).expand(2, 4, -1)})
    with pytest.raises(ValueError, match=r"rows \[0\].*multi_turn"):
        pgpo_text_only_batch(data, model)
    data.batch["response_mask"] = torch.ones_like(response_mask)
    pgpo_text_only_batch(data, model)


def test_the_twins_meta_info_has_its_own_token_counts():
    model, _ = build_tiny_family("qwen2_5_vl")
    image = model.config.image_token_id
    input_ids = torch.tensor([[11, image, image, 12, 21, 22]] * 2)
    am = torch.ones_like(input_ids)
    data = _Proto({"input_ids": input_ids, "attention_mask": am, "responses": input_ids[:, 4:],
                   "position_ids": torch.arange(6).expand(2, 4, -1)})
    data.meta_info = {"global_token_num": [6, 6], "images_seqlens": [8, 8], "temperature": 1.0}
    text = pgpo_text_only_batch(data, model)
    assert text.meta_info == {"global_token_num": [4, 4], "images_seqlens": [], "temperature": 1.0}
    assert data.meta_info["global_token_num"] == [6, 6]  # the batch's own counts untouched


@pytest.mark.parametrize("family,attn,refused", [("qwen3_vl", "sdpa", True), ("gemma3", "eager", True),
                                                 ("qwen3_vl", "flash_attention_2", False),
                                                 ("qwen2_5_vl", "sdpa", False)])
def test_remove_padding_with_non_flash_attention_is_refused_where_verl_leaves_attention_alone(
        tmp_path, family, attn, refused):
    from pgpo_train.integrations.checks import check_verl_config

    model, _ = build_tiny_family(family)
    model.config.save_pretrained(tmp_path)

    class Cfg(dict):
        __getattr__ = dict.__getitem__

    def config(remove_padding):
        model_cfg = Cfg(path=str(tmp_path), use_remove_padding=remove_padding,
                        override_config=Cfg(attn_implementation=attn),
                        external_lib="pgpo_train.integrations.verl_qwen2_vl_fix")
        return Cfg(algorithm=Cfg(pgpo=Cfg(enable=True), adv_estimator="grpo"),
                   actor_rollout_ref=Cfg(model=model_cfg, actor=Cfg(strategy="fsdp")))

    check_verl_config(config(False))  # remove-padding off: correct for every family
    if refused:
        with pytest.raises(ValueError, match=f"use_remove_padding=True with .*attn_implementation='{attn}'"):
            check_verl_config(config(True))
    else:
        check_verl_config(config(True))
