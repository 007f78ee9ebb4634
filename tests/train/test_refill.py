"""DAPO dynamic sampling with refill (pgpo_train.step.refill): the requested group count is reached, the cap on extra
rounds holds, no refill keeps the first round's kept groups exactly; merged rollouts equal one-shot rollouts."""

import pytest
import torch

from pgpo_train.step.batching import concat_rollouts
from pgpo_train.step.refill import refill_groups

G = 4


class FakeRounds:
    """sample_round stand-in: group i of the whole stream is 'mixed' (unequal rewards) when mixed(i)."""

    def __init__(self, mixed):
        self.mixed, self.next_group, self.calls = mixed, 0, []

    def __call__(self, n_prompts):
        self.calls.append(n_prompts)
        rewards = []
        for i in range(self.next_group, self.next_group + n_prompts):
            rewards += [1.0, 0.0, 0.0, 1.0] if self.mixed(i) else [1.0] * G
        self.next_group += n_prompts
        return {"rewards": torch.tensor(rewards), "gid": torch.arange(self.next_group - n_prompts, self.next_group)}


def kept_groups(rounds):
    out = []
    for r in rounds:
        g = r["keep"].view(-1, G)[:, 0]
        out += r["batch"]["gid"][g].tolist()
    return out


def test_refill_reaches_the_requested_groups():
    fake = FakeRounds(lambda i: i % 2 == 0)  # half the groups are mixed
    rounds, m = refill_groups(fake, n_groups=8, group_size=G, max_refill=10)
    kept = kept_groups(rounds)
    assert len(kept) == 8 and all(i % 2 == 0 for i in kept) and kept == sorted(set(kept))
    assert m["data/groups"] == 8 and m["data/refill_rounds"] == len(rounds) - 1 >= 1
    assert fake.calls[0] == 8 and all(1 <= n <= 8 for n in fake.calls)
    assert m["data/kept_frac"] == pytest.approx(8 / sum(fake.calls))


def test_refill_truncates_the_surplus():
    fake = FakeRounds(lambda i: i not in (0, 1))  # 6 of the first 8 mixed; the refill round has surplus
    rounds, m = refill_groups(fake, n_groups=8, group_size=G, max_refill=3)
    assert kept_groups(rounds) == list(range(2, 10))  # the first mixed groups, in order, exactly 8
    assert m["data/groups"] == 8
    assert sum(int(r["keep"].sum()) for r in rounds) == 8 * G


def test_refill_cap_is_respected():
    fake = FakeRounds(lambda i: i % 8 == 0)  # 1 mixed group in 8
    rounds, m = refill_groups(fake, n_groups=8, group_size=G, max_refill=2)
    assert len(fake.calls) == 3 and m["data/refill_rounds"] == 2
    assert m["data/groups"] == len(kept_groups(rounds)) < 8
    never = FakeRounds(lambda i: False)
    rounds, m = refill_groups(never, n_groups=4, group_size=G, max_refill=3)
    assert len(never.calls) == 4 and m["data/groups"] == 0 and not any(r["keep"].any() for r in rounds)


def test_no_refill_keeps_the_old_behaviour():
    from pgpo_train.rl.core_algos import dynamic_sampling_keep

    fake = FakeRounds(lambda i: i % 3 == 0)
    rounds, m = refill_groups(fake, n_groups=8, group_size=G, max_refill=0)
    assert fake.calls == [8] and len(rounds) == 1
    keep = dynamic_sampling_keep(rounds[0]["batch"]["rewards"], G)  # what the loop did before refill existed
    assert torch.equal(rounds[0]["keep"], keep)
    assert m["data/kept_frac"] == float(keep.float().mean()) and m["data/refill_rounds"] == 0
    off = FakeRounds(lambda i: False)  # dynamic sampling off (grpo): everything kept, one round
    rounds, m = refill_groups(off, n_groups=8, group_size=G, max_refill=4, dynamic_sampling=False)
    assert off.calls == [8] and bool(rounds[0]["keep"].all()) and m["data/groups"] == 8


def test_concat_rollouts_equals_one_batch():
    """Rollouts of different prompt / response lengths, merged, give the same sequences and 3-D positions as
    build_sequences on the whole batch at once (valid tokens; pads may sit elsewhere)."""
    from pgpo_train.data.tasks import make_count_records
    from pgpo_train.data.tasks import make_grid_records
    from pgpo_train.models.tiny import build_tiny
    from pgpo_train.step.batching import build_sequences
    from pgpo_train.step.batching import encode_prompts

    model, proc = build_tiny()
    pad = proc.tokenizer.pad_token_id
    recs = make_count_records(2, seed=1) + make_grid_records(1, seed=2)  # 4 and 9 image tokens: lengths differ
    recs[0]["problem"] += " Think in words please."
    tok = proc.tokenizer
    sols = ["<think>red 1</think>\\boxed{1}", "\\boxed{2}", "<think></think>\\boxed{3} more words here"]

    def batch_of(idx):
        prompt = encode_prompts(proc, [recs[i] for i in idx], "tiny", 1, "cpu")
        enc = tok(
            [sols[i] for i in idx], add_special_tokens=False, return_tensors="pt", padding=True, padding_side="right"
        )
        b = build_sequences(model, prompt, enc["input_ids"], enc["attention_mask"], pad)
        b["rewards"] = torch.tensor([float(i) for i in idx])
        return b

    merged = concat_rollouts(model, [batch_of([0]), batch_of([1, 2])], pad)
    whole = batch_of([0, 1, 2])
    assert merged["rewards"].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(merged["pixel_values"], whole["pixel_values"])
    assert torch.equal(merged["image_grid_thw"], whole["image_grid_thw"])
    for i in range(3):
        m_att, w_att = merged["attention_mask"][i].bool(), whole["attention_mask"][i].bool()
        assert torch.equal(merged["input_ids"][i][m_att], whole["input_ids"][i][w_att])
        assert torch.equal(merged["position_ids"][:, i][:, m_att], whole["position_ids"][:, i][:, w_att])
        assert torch.equal(
            merged["responses"][i][merged["response_mask"][i].bool()],
            whole["responses"][i][whole["response_mask"][i].bool()],
        )
