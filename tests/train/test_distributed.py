"""torchrun-style data parallel training on CPU (gloo, 2 processes, the tiny model): the update equals one process's
on the same global batch; a killed 2-rank run resumes exactly; checkpoints load across world sizes (2 -> 1, 1 -> 2).

Ranks are torch.multiprocessing workers with the environment torchrun sets (RANK, WORLD_SIZE, ...), so the loop
takes the same path as under `torchrun --nproc-per-node 2 -m pgpo_train`. The random tiny model rarely samples a
right answer, so the rollouts get one: `answers="replay"` makes every response a fixed function of its record (the
same global batch whatever the world size), `answers="inject"` samples for real and replaces the first response of
most groups by a right one (rewards are mixed, the update has signal, generation and RNG are the real ones).
"""

import hashlib
import json
import os
import shutil
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pgpo_train.data.tasks import save_count_dataset
from pgpo_train.models import model_family
from pgpo_train.recipe import train as train_mod
from pgpo_train.run import dist_checkpoint
from pgpo_train.run.checkpoint import latest_checkpoint
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.rundir import RunDirLock
from pgpo_train.step import sampling

# %% rollouts with guaranteed signal


def _record_seed(rec: dict) -> int:
    h = hashlib.md5((rec["problem"] + "|" + rec["answer"]).encode() + b"".join(im.tobytes() for im in rec["images"]))
    return int(h.hexdigest()[:8], 16)


_REAL_ROLLOUT = sampling.rollout


def _patched_rollout(mode: str):
    real = _REAL_ROLLOUT

    def rollout(model, processor, records, cfg, device, times, engine=None):
        tok = processor.tokenizer
        G, T = cfg.group_size, cfg.max_new_tokens
        banned = set(model_family.special_ids(model))
        allowed = torch.tensor([i for i in range(len(tok)) if i not in banned])

        def generate(**kw):
            L = kw["input_ids"].shape[1]
            rows = []
            if mode == "inject":
                out = type(model).generate(model, **kw)
                sampled = out[:, L:]
            for i, rec in enumerate(records):
                s = _record_seed(rec)
                for g in range(G):
                    if g == 0 and s % 3 != 0:  # about 2 groups in 3 get one right answer: others are dropped
                        text = f"<think>x</think>\\boxed{{{rec['answer']}}}" + tok.eos_token
                        row = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
                    elif mode == "inject":
                        row = sampled[i * G + g]
                    else:
                        gen = torch.Generator().manual_seed(s * 31 + g)
                        row = allowed[torch.randint(len(allowed), (T,), generator=gen)]
                    rows.append(row[:T])
            width = max(len(r) for r in rows)
            pad = tok.pad_token_id
            resp = torch.stack([torch.cat([r, torch.full((width - len(r),), pad, dtype=r.dtype)]) for r in rows])
            return torch.cat([kw["input_ids"], resp.to(kw["input_ids"].device)], dim=1)

        model.__dict__["generate"] = generate  # this instance only
        try:
            return real(model, processor, records, cfg, device, times)
        finally:
            model.__dict__.pop("generate")

    return rollout


def _signalling(rollout, at_call: int):
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(*a, **kw)

    return wrapped


def _full_params(model) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().cpu()
    return out


# %% the 2-rank worker


def _worker(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    real_save, real_load, real_update = dist_checkpoint.save, dist_checkpoint.load, train_mod.policy_update
    for job in jobs:
        sampling.rollout = _patched_rollout(job["answers"])
        kept = []  # rows this rank updated on, per step (0: only zero-weight forwards)

        def policy_update(model, optimizer, batch, tok_adv, *a, _kept=kept, **kw):
            _kept.append(0 if tok_adv is None else len(tok_adv))
            return real_update(model, optimizer, batch, tok_adv, *a, **kw)

        train_mod.policy_update = policy_update

        def save(dp, ckpt_dir, step, model, *a, _job=job, **kw):
            params = _full_params(model)
            out = real_save(dp, ckpt_dir, step, model, *a, **kw)
            if rank == 0 and _job.get("dump_saves"):
                torch.save(params, os.path.join(_job["dump_saves"], f"saved-{step}.pt"))
            if step == _job.get("kill_after_save"):
                os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after the checkpoint, every rank
            return out

        def load(path, model, *a, _job=job, **kw):
            st = real_load(path, model, *a, **kw)
            params = _full_params(model)
            if rank == 0 and _job.get("dump_load"):
                torch.save(params, _job["dump_load"])
            return st

        dist_checkpoint.save, dist_checkpoint.load = save, load
        if job.get("sigterm_at_rollout") and rank == 1:  # one rank gets the signal, during a step
            sampling.rollout = _signalling(sampling.rollout, job["sigterm_at_rollout"])
        try:
            out = train_mod.train(TrainConfig(**job["cfg"]))
        except Exception as e:
            if not job.get("expect_error"):
                raise
            with open(f"{job['dump']}.rank{rank}", "w") as f:
                json.dump({"type": type(e).__name__, "msg": str(e), "step": getattr(e, "step", None)}, f)
            continue
        params = _full_params(out["model"])
        if rank == 0:
            torch.save(params, job["dump"])
        with open(f"{job['dump']}.kept{rank}", "w") as f:
            json.dump(kept, f)
    dist.destroy_process_group()


def _spawn(jobs: list[dict]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, jobs), nprocs=2, join=True)


# %% fixtures


def _cfg(data: str, out, **kw) -> dict:
    base = {
        "dataset": data,
        "prompt_template": "tiny",
        "out_dir": str(out),
        "steps": 1,
        "sft_steps": 0,
        "prompts_per_step": 4,
        "group_size": 4,
        "mini_batch_size": 16,
        "micro_batch_size": 2,
        "max_new_tokens": 16,
        "eval_every": 0,
        "tensorboard": False,
        "progress": False,
        "save_every": 1,
        "seed": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
    }
    base.update(kw)
    return base


# the first step's records under these seeds: dapo keeps 1 group on rank 0 and 2 on rank 1 (unequal micro-batch
# counts), pgpo keeps none on rank 0 and 2 on rank 1 (rank 0 only pairs rank 1's collectives); the tests check it
EQUIV_SEED = {"dapo": 3, "pgpo": 28}
EQUIV_KEPT = {"dapo": [[4], [8]], "pgpo": [[0], [8]]}
SFT = {"steps": 0, "sft_steps": 1, "sft_batch_size": 4, "sft_lr": 1e-3, "eval_every": 1, "eval_size": 5}
# a text-only share whose seed-7 rows are [text, text, visual, visual]: rank 0 has no visual row, rank 1 no text row
SFT_TEXT = {**SFT, "eval_every": 0, "sft_text_only_prob": 0.5, "seed": 7}


def _lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _single(cfg: dict, answers: str, monkeypatch) -> dict:
    monkeypatch.setattr(sampling, "rollout", _patched_rollout(answers))
    return _full_params(train_mod.train(TrainConfig(**cfg))["model"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return save_count_dataset(tmp_path_factory.mktemp("data") / "count", n_train=64, n_test=8, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every run the tests compare, with as few 2-process launches as possible (3) to stay cheap on 2 cores."""
    root = tmp_path_factory.mktemp("dist")
    r = {"root": root}
    with pytest.MonkeyPatch.context() as mpatch:
        # one process on the same global batch (replayed rollouts), for each algo, and its initial params
        for algo in ("dapo", "pgpo"):
            cfg = _cfg(data, root / f"one-{algo}", algo=algo, seed=EQUIV_SEED[algo], max_refill=0)
            r[f"one-{algo}"] = _single(cfg, "replay", mpatch)
            r[f"init-{algo}"] = _single({**cfg, "out_dir": str(root / f"init-{algo}"), "steps": 0}, "replay", mpatch)
        # one SFT step (each rank half the records, loss weighed by its token share) and a sharded greedy eval
        r["one-sft"] = _single(_cfg(data, root / "one-sft", **SFT), "replay", mpatch)
        r["one-sft-text"] = _single(_cfg(data, root / "one-sft-text", **SFT_TEXT), "replay", mpatch)
        # a one-process run with a checkpoint at step 2, to resume at 2 ranks
        r["one-ckpt"] = _single(_cfg(data, root / "one-ckpt", steps=2), "inject", mpatch)
    shutil.copytree(root / "one-ckpt", root / "one-to-two")

    long = _cfg(data, root / "full", steps=3)
    os.makedirs(root / "busy")
    busy = {"cfg": _cfg(data, root / "busy"), "answers": "replay", "dump": str(root / "busy"), "expect_error": True}
    sigterm = {  # also the run with FSDP2's CPUOffloadPolicy (on CPU it only runs the flag's code path)
        "cfg": _cfg(data, root / "sigterm", steps=3, fsdp_cpu_offload=True),
        "answers": "inject",
        "dump": str(root / "sigterm"),
        "expect_error": True,
        "sigterm_at_rollout": 2,
    }
    with RunDirLock(str(root / "busy")):  # another run holds this run dir
        _spawn(
            [busy, sigterm]
            + [
                {
                    # no refill: a refill round's size is rounded up to whole prompts per rank under torchrun,
                    # so only the first round is the same global batch at 1 and 2 ranks
                    "cfg": _cfg(data, root / f"two-{a}", algo=a, seed=EQUIV_SEED[a], max_refill=0),
                    "answers": "replay",
                    "dump": str(root / f"two-{a}.pt"),
                }
                for a in ("dapo", "pgpo")
            ]
            + [{"cfg": long, "answers": "inject", "dump": str(root / "full.pt")}]
            + [{"cfg": _cfg(data, root / "two-sft", **SFT), "answers": "replay", "dump": str(root / "two-sft.pt")}]
            + [{"cfg": _cfg(data, root / "two-sft-text", **SFT_TEXT), "answers": "replay",
                "dump": str(root / "two-sft-text.pt")}]
        )
    os.makedirs(root / "cut-saves")
    cut = {**long, "out_dir": str(root / "cut")}
    with pytest.raises(mp.ProcessExitedException):  # killed right after its step-2 checkpoint
        _spawn(
            [
                {
                    "cfg": cut,
                    "answers": "inject",
                    "dump": str(root / "unused.pt"),
                    "kill_after_save": 2,
                    "dump_saves": str(root / "cut-saves"),
                }
            ]
        )
    shutil.copytree(root / "cut", root / "two-to-one")
    _spawn(
        [
            {"cfg": {**cut, "resume": True}, "answers": "inject", "dump": str(root / "resumed.pt")},
            {
                "cfg": _cfg(data, root / "one-to-two", steps=3, resume=True),
                "answers": "inject",
                "dump": str(root / "one-to-two.pt"),
                "dump_load": str(root / "one-to-two-loaded.pt"),
            },
        ]
    )
    with pytest.MonkeyPatch.context() as mpatch:  # the killed 2-rank run's step-2 checkpoint, resumed in one process
        mpatch.setattr(sampling, "rollout", _patched_rollout("inject"))
        loaded = {}
        real_load = dist_checkpoint.load

        def load(path, model, *a, **kw):
            st = real_load(path, model, *a, **kw)
            loaded.update(_full_params(model))
            return st

        mpatch.setattr(dist_checkpoint, "load", load)
        out = train_mod.train(TrainConfig(**{**cut, "out_dir": str(root / "two-to-one"), "resume": True, "steps": 4}))
        r["two-to-one-loaded"], r["two-to-one"] = loaded, _full_params(out["model"])
    return r


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("algo", ["dapo", "pgpo"])
def test_two_ranks_update_equals_one_process(runs, algo):
    root = runs["root"]
    one, two = runs[f"one-{algo}"], torch.load(root / f"two-{algo}.pt")
    l1, l2 = _lines(root / f"one-{algo}")[-1], _lines(root / f"two-{algo}")[-1]
    assert 0 < l1["data/kept_frac"] < 1, "the batch must keep some groups and drop others"
    assert _kept(root, f"two-{algo}.pt") == EQUIV_KEPT[algo], "the rank layout the test is meant to check"
    assert _max_diff(one, runs[f"init-{algo}"]) > 1e-4, "the update must move the parameters"
    assert _max_diff(one, two) < 1e-5
    for k in ("reward/mean", "data/kept_frac", "adv/mean_abs", "actor/loss", "actor/grad_norm", "actor/entropy"):
        assert l2[k] == pytest.approx(l1[k], rel=1e-4, abs=1e-6), k
    if algo == "pgpo":
        for k in ("pgpo/kl_mean", "pgpo/weight_mean", "pgpo/weight_std", "pgpo/kl_max"):
            assert l2[k] == pytest.approx(l1[k], rel=1e-4, abs=1e-6), k


def test_two_ranks_sft_step_and_eval_equal_one_process(runs):
    root = runs["root"]
    one, two = runs["one-sft"], torch.load(root / "two-sft.pt")
    assert _max_diff(one, two) < 1e-5
    l1, l2 = _lines(root / "one-sft")[-1], _lines(root / "two-sft")[-1]
    assert l1["phase"] == l2["phase"] == "sft"
    assert l2["sft/loss"] == pytest.approx(l1["sft/loss"], rel=1e-5)
    # greedy eval, 5 records split 3 + 2 over the ranks; after one SFT step these are mostly 0, so this shows the
    # sharded eval runs and merges, not that the merge weights are right (test_merged_metrics... checks those)
    for k in ("eval/acc", "eval/reward", "eval/format"):
        assert l2[k] == pytest.approx(l1[k], abs=1e-9), k


def test_two_ranks_sft_text_only_share_equals_one_process(runs):
    """--sft-text-only-prob under torchrun: the rows are drawn over the global batch, and a rank without rows of
    one kind runs that kind's forward at zero weight (FSDP's collectives pair): the same step as one process."""
    root = runs["root"]
    assert _max_diff(runs["one-sft-text"], torch.load(root / "two-sft-text.pt")) < 1e-5
    l1, l2 = _lines(root / "one-sft-text")[-1], _lines(root / "two-sft-text")[-1]
    assert l1["sft/text_rows"] == l2["sft/text_rows"] == 2.0
    assert l2["sft/loss"] == pytest.approx(l1["sft/loss"], rel=1e-5)


def test_killed_two_rank_run_resumes_exactly(runs):
    root = runs["root"]
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("timing/")}
    full, cut = _lines(root / "full"), _lines(root / "cut")
    assert [x["step"] for x in cut] == [1, 2, 3]
    assert sum("actor/loss" in x for x in full) >= 2, "the run must really update"
    assert [strip(x) for x in full] == [strip(x) for x in cut]
    a, b = torch.load(root / "full.pt"), torch.load(root / "resumed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    path = latest_checkpoint(str(root / "cut" / "checkpoints"))
    assert path.endswith("step-00000003")
    assert {"rng-rank0.pt", "rng-rank1.pt", ".metadata"} <= set(os.listdir(path))


def test_two_ranks_to_one_process(runs):
    root = runs["root"]
    saved = torch.load(root / "cut-saves" / "saved-2.pt")  # what the 2-rank run held at its step-2 checkpoint
    assert _max_diff(saved, runs["two-to-one-loaded"]) == 0.0
    lines = _lines(root / "two-to-one")
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert _max_diff(runs["two-to-one"], saved) > 0, "training continues at one process"


def test_one_process_to_two_ranks(runs):
    root = runs["root"]
    loaded = torch.load(root / "one-to-two-loaded.pt")
    assert _max_diff(runs["one-ckpt"], loaded) == 0.0
    lines = _lines(root / "one-to-two")
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert _max_diff(torch.load(root / "one-to-two.pt"), runs["one-ckpt"]) > 0, "training continues at two ranks"


def test_kill_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The sharded save publishes (rename + `latest`) only after every rank's shards and RNG are written."""
    from pgpo_train.run.distributed import SINGLE

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    first = dist_checkpoint.save(SINGLE, str(tmp_path), 1, model, opt, {"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def dying(*args, **kwargs):  # the process dies after DCP wrote its shards, before its RNG file
        raise KeyboardInterrupt

    monkeypatch.setattr(dist_checkpoint, "rng_state", dying)
    with pytest.raises(KeyboardInterrupt):
        dist_checkpoint.save(SINGLE, str(tmp_path), 2, model, opt, {"step": 2})
    monkeypatch.undo()
    assert os.path.exists(tmp_path / ".tmp-step-00000002" / ".metadata")  # the shards were written...
    assert latest_checkpoint(str(tmp_path)) == first  # ...but never published
    fresh = torch.nn.Linear(4, 3)
    state = dist_checkpoint.load(first, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    assert state["step"] == 1 and state["world_size"] == 1
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def _kept(root, dump: str) -> list[list[int]]:
    out = []
    for r in range(2):
        with open(root / f"{dump}.kept{r}") as f:
            out.append(json.load(f))
    return out


def _errors(root, name: str) -> list[dict]:
    out = []
    for r in range(2):
        with open(root / f"{name}.rank{r}") as f:
            out.append(json.load(f))
    return out


def test_busy_run_dir_fails_on_every_rank(runs):
    """Rank 0 holds the run dir lock; when another run has it, every rank stops with rank 0's one-line error."""
    errs = _errors(runs["root"], "busy")
    assert errs[0]["type"] == "RunDirBusy" and "in use by another run" in errs[0]["msg"]
    assert errs[1]["msg"] == errs[0]["msg"]


def test_sigterm_on_one_rank_stops_all_at_the_same_step(runs):
    root = runs["root"]
    errs = _errors(root, "sigterm")
    assert [e["type"] for e in errs] == ["TrainingInterrupted"] * 2
    # rank 1 signalled itself in its 2nd rollout (step 1's refill round or step 2): both finish that step, then stop
    stopped = errs[0]["step"]
    assert errs[1]["step"] == stopped and stopped in (1, 2)
    assert latest_checkpoint(str(root / "sigterm" / "checkpoints")).endswith(f"step-{stopped:08d}")
    assert [x["step"] for x in _lines(root / "sigterm")] == list(range(1, stopped + 1))


def test_merged_metrics_equal_the_pooled_ones():
    """merge_rank_metrics over two ranks' parts gives what one process computes on all the values."""
    from pgpo_train.run.distributed import merge_rank_metrics

    g = torch.Generator().manual_seed(0)
    w = [torch.rand(7, generator=g) * 3, torch.rand(12, generator=g)]  # two ranks' token weights
    rewards = [torch.rand(8, generator=g), torch.rand(8, generator=g)]
    parts = [
        (
            {
                "pgpo/weight_mean": float(wi.mean()),
                "pgpo/weight_std": float(wi.std()),
                "pgpo/weight_max": float(wi.max()),
                "pgpo/weight_min": float(wi.min()),
                "reward/mean": float(ri.mean()),
                "timing/update": float(i + 1),
                "actor/loss": 0.25 * (i + 1),
                "sample/response": f"rank {i}",
            },
            float(len(ri)),
            float(len(wi)),
        )
        for i, (wi, ri) in enumerate(zip(w, rewards))
    ]
    out = merge_rank_metrics(parts)
    all_w, all_r = torch.cat(w).double(), torch.cat(rewards).double()
    assert out["pgpo/weight_mean"] == pytest.approx(float(all_w.mean()), rel=1e-6)
    assert out["pgpo/weight_std"] == pytest.approx(float(all_w.std()), rel=1e-6)
    assert out["pgpo/weight_max"] == float(torch.cat(w).max()) and out["pgpo/weight_min"] == float(torch.cat(w).min())
    assert out["reward/mean"] == pytest.approx(float(all_r.mean()), rel=1e-6)
    assert out["timing/update"] == 2.0 and out["actor/loss"] == pytest.approx(0.75)
    assert out["sample/response"] == "rank 0"
    # a key only one rank has (the other kept no rows) is that rank's value
    assert merge_rank_metrics([({"pgpo/kl_mean": 0.5}, 8.0, 5.0), ({}, 8.0, 0.0)])["pgpo/kl_mean"] == 0.5


def test_torchrun_cli(data, tmp_path):
    """`torchrun --nproc-per-node 2 -m pgpo_train ...` end to end: one summary line (rank 0), rank 0's metrics,
    a sharded checkpoint with both ranks' RNG."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pgpo_train"]
    cmd += ["--dataset", data, "--prompt-template", "tiny", "--out-dir", str(out)]
    cmd += ["--steps", "1", "--sft-steps", "1", "--sft-batch-size", "4", "--prompts-per-step", "2"]
    cmd += ["--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pgpo-train: done") == 1, proc.stdout
    assert [(x["step"], x["phase"]) for x in _lines(out)] == [(1, "sft"), (2, "rl")]
    path = latest_checkpoint(str(out / "checkpoints"))
    assert path.endswith("step-00000002")
    assert {"rng-rank0.pt", "rng-rank1.pt", ".metadata", "trainer_state.json"} <= set(os.listdir(path))
