"""The verl helpers on the model-family layer: responses are text, placeholder ids come from the model."""

import os
import runpy

import numpy as np
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
