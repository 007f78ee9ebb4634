"""PGPOGRPOTrainer with vLLM generation bans the visual special ids in the sampling parameters TRL builds,
checked without vLLM: TRL 1.16's own VLLMGeneration.generate (colocate) and VLLMClient.generate (server)
run, with only the engine itself replaced (vLLM's SamplingParams / LLM, the server's HTTP post)."""

from typing import ClassVar

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl.generation import vllm_client as trl_vllm_client
from trl.generation import vllm_generation as trl_vllm

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_count_records
from pgpo_train.integrations import PGPOConfig
from pgpo_train.integrations import PGPOGRPOTrainer
from pgpo_train.integrations.checks import VLLM_BAN_BIAS
from pgpo_train.models import model_family
from pgpo_train.models.tiny_families import build_tiny_family


def _dataset():
    rows = [{"images": [r["image"]], "prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": TINY_PROMPT_TEMPLATE.format(question=r["problem"])}]}]}
        for r in make_count_records(2, seed=1)]
    return datasets.Dataset.from_list(rows)


def _config(tmp_path, mode, **kw):
    return PGPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                      use_vllm=True, vllm_mode=mode, vllm_importance_sampling_correction=False, **kw)


class _SamplingParams:
    """vLLM's SamplingParams, recording what TRL builds."""

    built: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.built.append(kwargs)


class _Out:
    def __init__(self, ids):
        self.token_ids, self.logprobs = ids, None


class _Engine:
    """vLLM's colocated engine as far as a weight sync reaches it: load_weights bumps the weights' version, and an
    encoder cache keyed by image content keeps each image's embedding (here: the version that encoded it) until
    reset_encoder_cache(), as vLLM's does."""

    def __init__(self):
        self.version, self.encoder_cache, self.resets = 0, {}, 0
        model = type("M", (), {"load_weights": lambda _, weights: self._load(weights)})()
        self.model_executor = type("E", (), {"driver_worker": type("W", (), {"model_runner": type(
            "R", (), {"model": model})()})()})()

    def _load(self, weights):
        self.version += 1

    def reset_encoder_cache(self):
        self.encoder_cache.clear()
        self.resets += 1

    def encode(self, image_key):
        return self.encoder_cache.setdefault(image_key, self.version)


class _LLM:
    def __init__(self):
        self.llm_engine = _Engine()

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.prompts, self.sampling_params = prompts, sampling_params
        return [type("R", (), {"prompt_token_ids": p["prompt_token_ids"], "outputs": [_Out([1, 2])]})()
                for p in prompts]

    def reset_prefix_cache(self):
        pass


def _no_engine(monkeypatch, mode):
    def init(self):  # vLLM is not installed: keep TRL's backend object, give it a recording engine
        if mode == "colocate":
            self.llm = _LLM()
        else:
            client = object.__new__(trl_vllm_client.VLLMClient)  # no connection to a server
            client.base_url, client.model, client.bodies = "http://vllm", "m", []

            def post(url, json):
                client.bodies.append(json)
                n = json.get("n") or json["sampling_params"]["n"]
                return {"choices": [{"prompt_token_ids": [1], "token_ids": [2, 3], "logprobs": None}] * n}

            client._post = post
            self.vllm_client = client

    monkeypatch.setattr(trl_vllm.VLLMGeneration, "_init_vllm", init)
    monkeypatch.setattr(trl_vllm, "SamplingParams", _SamplingParams, raising=False)
    monkeypatch.setattr(trl_vllm_client, "parse_logprobs", lambda lps: (None, None))
    _SamplingParams.built = []


def _trainer(tmp_path, mode, **kw):
    model, processor = build_tiny_family("qwen2_5_vl", seed=0)
    trainer = PGPOGRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                              args=_config(tmp_path, mode, **kw), train_dataset=_dataset(),
                              processing_class=processor)
    return trainer, model_family.special_ids(model)


def test_colocate_sampling_params_ban_every_visual_special_id(tmp_path, monkeypatch):
    _no_engine(monkeypatch, "colocate")
    trainer, special = _trainer(tmp_path, "colocate", generation_kwargs={"logit_bias": {100: 1.5}, "seed": 3})
    image = _dataset()[0]["images"]
    trainer.vllm_generation.generate(prompts=[[1, 2, 3]], images=[image], num_generations=1)
    (params,) = _SamplingParams.built  # exactly what TRL handed to vllm.SamplingParams
    assert len(special) >= 3  # <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>
    assert {i: params["logit_bias"][i] for i in special} == {i: VLLM_BAN_BIAS for i in special}
    assert params["logit_bias"][100] == 1.5 and params["seed"] == 3  # the user's own kwargs kept
    assert trainer.vllm_generation.llm.sampling_params.kwargs is params
    assert "multi_modal_data" in trainer.vllm_generation.llm.prompts[0]  # the image went to vLLM too


def test_server_request_carries_the_ban(tmp_path, monkeypatch):
    _no_engine(monkeypatch, "server")
    trainer, special = _trainer(tmp_path, "server")
    trainer.vllm_generation.generate(prompts=[[1, 2, 3]] * 2, images=None, num_generations=2)
    client = trainer.vllm_generation.vllm_client
    (body,) = client.bodies  # TRL's /v1/completions request
    assert {i: body["logit_bias"][i] for i in special} == {i: VLLM_BAN_BIAS for i in special}
    # with images the server path posts per-prompt sampling params built from the same dict
    client.generate(prompts=[[1, 2]], features=[{"mm": 1}], n=1,
                    generation_kwargs=trainer.vllm_generation.generation_kwargs)
    assert {i: client.bodies[-1]["sampling_params"]["logit_bias"][i] for i in special} == {
        i: VLLM_BAN_BIAS for i in special}


def test_a_config_that_lets_vllm_sample_a_visual_id_is_refused(tmp_path, monkeypatch):
    _no_engine(monkeypatch, "colocate")
    model, _ = build_tiny_family("qwen2_5_vl")
    image = model.config.image_token_id
    with pytest.raises(ValueError, match=rf"generation_kwargs\['logit_bias'\]\[{image}\]"):
        _trainer(tmp_path, "colocate", generation_kwargs={"logit_bias": {image: 0.0}})
    with pytest.raises(ValueError, match=r"generation_kwargs\['allowed_token_ids'\]"):
        _trainer(tmp_path, "colocate", generation_kwargs={"allowed_token_ids": list(range(image + 1))})


def test_a_trl_backend_that_drops_the_ban_is_refused(tmp_path, monkeypatch):
    _no_engine(monkeypatch, "colocate")
    real_init = trl_vllm.VLLMGeneration.__init__

    def dropping_init(self, *a, **kw):  # a TRL whose backend no longer forwards generation_kwargs
        real_init(self, *a, **{**kw, "generation_kwargs": None})

    monkeypatch.setattr(trl_vllm.VLLMGeneration, "__init__", dropping_init)
    with pytest.raises(RuntimeError, match="does not carry the ban"):
        _trainer(tmp_path, "colocate")


def test_tool_images_inside_completions_are_refused():
    from pgpo_train.integrations.checks import check_no_tool_images

    model, _ = build_tiny_family("qwen2_5_vl")
    image = model.config.image_token_id
    ids = torch.tensor([[5, image, 6]])
    ones = torch.ones_like(ids)
    check_no_tool_images(model, ids, ones, ones)  # sampled (tool_mask 1): left to check_responses_are_text
    with pytest.raises(ValueError, match="tools that return images"):
        check_no_tool_images(model, ids, ones, torch.tensor([[1, 0, 1]]))


def test_every_weight_sync_drops_vllms_cached_vision_embeddings(tmp_path, monkeypatch):
    """TRL's own VLLMGeneration.sync_weights (colocate) resets only the prefix cache: an image seen before the sync
    keeps the embedding of the old vision tower. PGPOGRPOTrainer's syncs also reset the encoder cache. vLLM's engine
    is stood in for (_Engine); vLLM itself did not run here."""
    _no_engine(monkeypatch, "colocate")
    trainer, _ = _trainer(tmp_path, "colocate")
    engine = trainer.vllm_generation.llm.llm_engine
    assert engine.encode("empty grid") == 0  # seen before the sync
    trainer.vllm_generation.sync_weights()  # TRL's sync, through PGPO's trainer
    assert engine.version > 0 and engine.resets == 1
    assert engine.encode("empty grid") == engine.version  # re-encoded by the new weights

    plain = type(trainer.vllm_generation)  # the same TRL object without PGPO's hook: the embedding goes stale
    engine.encoder_cache.clear()
    engine.encode("empty grid")
    old = engine.version
    plain.sync_weights(trainer.vllm_generation)
    assert engine.version > old and engine.encode("empty grid") == old


def test_a_vllm_without_reset_encoder_cache_is_refused(tmp_path, monkeypatch):
    _no_engine(monkeypatch, "colocate")
    monkeypatch.delattr(_Engine, "reset_encoder_cache")
    with pytest.raises(RuntimeError, match="reset_encoder_cache"):
        _trainer(tmp_path, "colocate")
