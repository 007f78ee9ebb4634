"""The parts of --rollout-engine vllm that need no engine (these run in CI, where vLLM is not installed): the install
error, the process-state guard, the weight stream a sync sends, the KV cache size, rollout_logp through the batch
merge, and the log-prob gap metric. The engine itself: tests/train/test_vllm_rollouts.py."""

import random

import numpy as np
import pytest
import torch

from pgpo_train.data.tasks import TINY_PROMPT_TEMPLATE
from pgpo_train.data.tasks import make_grid_records
from pgpo_train.models.tiny import build_tiny
from pgpo_train.models.tiny import tiny_config
from pgpo_train.step import vllm_engine
from pgpo_train.step.batching import build_sequences
from pgpo_train.step.batching import concat_rollouts
from pgpo_train.step.batching import encode_prompts


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(tiny_config(32), seed=0)  # what --rollout-engine vllm trains


@pytest.mark.skipif(vllm_engine.vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_names_the_install_command():
    with pytest.raises(ImportError, match=r"--rollout-engine vllm needs vLLM.*pip install -e \.\[vllm\]"):
        vllm_engine.prepare_vllm()


def test_kept_process_state_restores_rng_and_set_num_threads():
    original = torch.set_num_threads
    threads = torch.get_num_threads()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with vllm_engine.kept_process_state():  # what vLLM's worker start-up does to the process
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
        torch.set_num_threads = lambda n: None
    assert torch.set_num_threads is original
    assert torch.get_num_threads() == threads
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_sync_streams_every_parameter_unshared_copies_none(tiny):
    model, _ = tiny
    sent = list(vllm_engine.checkpoint_weights(model))
    params = dict(model.named_parameters())
    assert [n for n, _ in sent] == list(params)  # the names vLLM's checkpoint-format loader maps
    for name, t in sent:
        assert not t.requires_grad
        assert t.data_ptr() == params[name].data_ptr()  # the live tensor, no copy (and no disk)
    assert any(n.startswith("model.visual.") for n, _ in sent)  # the vision tower is synced too


def test_kv_cache_gib_sized_from_the_run(tiny):
    model, _ = tiny
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 32  # the embedded model's head size with vLLM: its CPU attention takes 32, not 16
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4
    assert vllm_engine.kv_cache_gib(model, 32, 2048) == 1  # tiny: the 1 GiB minimum
    n = 2**30 // per_token * 4  # 4 GiB worth of tokens -> 5 GiB with the 25% headroom
    assert vllm_engine.kv_cache_gib(model, n, 1) == 5


def test_rollout_logp_survives_the_refill_merge(tiny):
    model, processor = tiny
    pad = processor.tokenizer.pad_token_id
    parts = []
    for T, seed in ((3, 1), (5, 2)):
        records = make_grid_records(1, seed=seed)
        prompt = encode_prompts(processor, records, TINY_PROMPT_TEMPLATE, 2, "cpu")
        responses = torch.randint(10, 50, (2, T))
        batch = build_sequences(model, prompt, responses, torch.ones(2, T, dtype=torch.long), pad)
        batch["rollout_logp"] = -torch.rand(2, T)
        batch["rewards"] = torch.zeros(2)
        parts.append(batch)
    out = concat_rollouts(model, parts, pad)
    assert out["rollout_logp"].shape == out["responses"].shape == (4, 5)
    assert torch.equal(out["rollout_logp"][:2, :3], parts[0]["rollout_logp"])
    assert (out["rollout_logp"][:2, 3:] == 0).all()
    assert torch.equal(out["rollout_logp"][2:], parts[1]["rollout_logp"])


def test_logp_gap_metrics():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    a = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[-1.1, -2.0, 0.0], [-0.2, 5.0, 0.0]])
    m = vllm_engine.logp_gap_metrics(a, b, mask)
    assert m["rollout/vllm_logp_gap_mean"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert m["rollout/vllm_logp_gap_max"] == pytest.approx(0.3)
    assert vllm_engine.logp_gap_metrics(a, b, torch.zeros_like(mask)) == {}


def test_cuda_sleep_order_with_a_recording_engine(tiny):
    """CUDA's sleep mode cannot run on this machine: a recording stand-in for vLLM's LLM checks the call order the
    engine wrapper makes (sleep after start-up and after each rollout round, wake before a sync or a refill round).
    What it leaves unverified: vLLM's own sleep/wake_up on a GPU (benchmarks/gpu_sweep.sh rollout runs them)."""
    model, processor = tiny
    calls = []

    class Out:
        def __init__(self, ids):
            self.prompt_token_ids = ids
            self.outputs = [type("C", (), {"token_ids": [5, 6], "logprobs": [{5: _LP(-0.5)}, {6: _LP(-0.25)}]})()]

    class LLM:
        llm_engine = type("E", (), {"reset_encoder_cache": lambda self: calls.append("reset_encoder_cache")})()

        def sleep(self, level):
            calls.append(f"sleep{level}")

        def wake_up(self):
            calls.append("wake_up")

        def collective_rpc(self, method, kwargs):
            calls.append(method)
            assert sum(1 for _ in kwargs["weights_iterator"]) == len(list(model.parameters()))

        def reset_prefix_cache(self):
            calls.append("reset_prefix_cache")

        def generate(self, prompts, params, use_tqdm):
            calls.append("generate")
            return [Out([1, 2]) for _ in prompts]

    engine = object.__new__(vllm_engine.VLLMRollout)
    engine.llm, engine.sleeps, engine._asleep, engine.syncs, engine.device = LLM(), True, False, 0, "cpu"
    engine._sampling_params = lambda **kw: kw
    engine.allowed = list(range(10))
    engine._sleep()  # what __init__ does after building the engine
    engine.sync(model)
    cfg = type("Cfg", (), {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4})()
    responses, logp = engine.generate(["a", "b"], [[], []], [[1, 2], [1, 2]], cfg, [7], 0)
    engine.generate(["a"], [[]], [[1, 2]], cfg, [7], 0)  # a refill round: no sync in between
    assert calls == ["sleep1", "wake_up", "reload_weights", "reset_prefix_cache", "reset_encoder_cache", "generate",
                     "sleep1", "wake_up", "generate", "sleep1"]
    assert responses.tolist() == [[5, 6], [5, 6]] and logp.tolist() == [[-0.5, -0.25], [-0.5, -0.25]]


class _LP:
    def __init__(self, logprob):
        self.logprob = logprob


def test_tiny_head_dim_auto_and_same_parameter_count():
    from pgpo_train.run.config import TrainConfig

    assert TrainConfig(out_dir="x").resolved().tiny_head_dim == 16
    assert TrainConfig(out_dir="x", rollout_engine="vllm").resolved().tiny_head_dim == 32
    counts = {d: sum(p.numel() for p in build_tiny(tiny_config(d))[0].parameters()) for d in (16, 32)}
    assert counts[16] == counts[32]
    with pytest.raises(ValueError, match="head_dim must be one of"):
        tiny_config(8)
