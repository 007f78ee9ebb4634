"""Atomic checkpoints: a run killed mid-checkpoint loses nothing already saved; RNG and optimizer restore exactly."""

import os

import torch

from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.checkpoint import load_checkpoint
from pgpo_train.run.checkpoint import save_checkpoint


def _model_opt():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_killed_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model, opt = _model_opt()
    first = save_checkpoint(str(tmp_path), 1, model, opt, {"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def dying_save(*args, **kwargs):  # the process "dies" while writing the state file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    try:
        save_checkpoint(str(tmp_path), 2, model, opt, {"step": 2})
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)) == first
    assert not os.path.exists(tmp_path / "step-00000002")
    fresh, fresh_opt = _model_opt()
    state = load_checkpoint(first, fresh, fresh_opt)
    assert state == {"step": 1}
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_rng_and_rotation(tmp_path):
    model, opt = _model_opt()
    for step in range(1, 5):
        save_checkpoint(str(tmp_path), step, model, opt, {"step": step}, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == ["step-00000003", "step-00000004"]
    expected = torch.rand(5)  # what the RNG gives right after the last save
    torch.rand(7)  # move the RNG on
    load_checkpoint(latest_checkpoint(str(tmp_path)), model, opt)
    assert torch.equal(torch.rand(5), expected)
