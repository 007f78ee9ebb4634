"""Every setting is checked at start-up, before any work: the CLI exits 2 with one line naming the flag, the Python
API raises ValueError with the same text; bad model dirs, datasets and hub names are one line too, and leave no
run dir behind. Null answers never become the text "None"."""

import importlib.util
import io
import os

import pytest
import torch

from pgpo_train.cli import _train_parser
from pgpo_train.cli import main
from pgpo_train.recipe import train as train_mod
from pgpo_train.recipe.train import train
from pgpo_train.run.config import PGPOWeightsConfig
from pgpo_train.run.config import TrainConfig
from pgpo_train.run.config import config_from_args

BAD_FLAGS = [
    ("--lr -1", "--lr"),
    ("--lr nan", "--lr"),
    ("--sft-lr 0", "--sft-lr"),
    ("--temperature 0", "--temperature"),
    ("--temperature inf", "--temperature"),
    ("--pgpo.eps 0", "--pgpo.eps"),
    ("--pgpo.beta inf", "--pgpo.beta"),
    ("--pgpo.beta -1", "--pgpo.beta"),
    ("--pgpo.tau 1.5", "--pgpo.tau"),
    ("--grad-clip -1", "--grad-clip"),
    ("--clip-ratio-low -1", "--clip-ratio-low"),
    ("--clip-ratio-low 1", "--clip-ratio-low"),
    ("--clip-ratio-high -0.1", "--clip-ratio-high"),
    ("--top-p 0", "--top-p"),
    ("--top-p 1.5", "--top-p"),
    ("--group-size 1", "--group-size"),
    ("--prompts-per-step 0", "--prompts-per-step"),
    ("--micro-batch-size 0", "--micro-batch-size"),
    ("--max-new-tokens -1", "--max-new-tokens"),
    ("--steps -1", "--steps"),
    ("--sft-steps -2", "--sft-steps"),
    ("--save-every -1", "--save-every"),
    ("--keep-checkpoints 0", "--keep-checkpoints"),
    ("--eval-size 0", "--eval-size"),
    ("--weight-decay -0.1", "--weight-decay"),
    ("--acc-weight -1", "--acc-weight"),
    ("--seed -1", "--seed"),
    ("--threads -1", "--threads"),
    ("--device foo", "--device"),
    ("--prompt-template no-question-here", "--prompt-template"),
    ("--vllm-gpu-memory-utilization 0", "--vllm-gpu-memory-utilization"),
    ("--vllm-gpu-memory-utilization 1.5", "--vllm-gpu-memory-utilization"),
    ("--vllm-max-model-len 24", "--vllm-max-model-len"),
    ("--tiny-head-dim 8", "--tiny-head-dim"),
    ("--rollout-engine vllm --tiny-head-dim 16", "--tiny-head-dim"),  # the tiny task's 24 new tokens leave no prompt room
]


@pytest.fixture
def no_work(monkeypatch):
    """Any data or model loading fails the test: validation must come first."""

    def boom(*a, **k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(train_mod, "load_split", boom)
    monkeypatch.setattr(train_mod, "load_policy", boom)
    monkeypatch.setattr(train_mod, "tiny_dataset_path", boom)


def _cli_error(argv, capsys) -> str:
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2, out
    assert "Traceback" not in out.err, out.err
    lines = [ln for ln in out.err.splitlines() if "pgpo-train" in ln]  # (datasets may draw progress bars)
    assert len(lines) == 1, out.err
    assert lines[0].startswith("pgpo-train: error: ")
    return lines[0][len("pgpo-train: error: ") :]


@pytest.mark.parametrize("args,flag", BAD_FLAGS, ids=[a for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_any_work(args, flag, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    argv = [*args.split(), "--out-dir", str(out)]
    msg = _cli_error(argv, capsys)
    assert msg.startswith(flag), msg
    assert not out.exists()
    cfg = config_from_args(_train_parser().parse_args(argv))
    with pytest.raises(ValueError) as e:  # the Python API: the same text
        train(cfg)
    assert str(e.value) == msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(tmp_path, capsys, no_work):
    assert "CUDA is not available" in _cli_error(["--device", "cuda", "--out-dir", str(tmp_path / "r")], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_triton_backend_on_cpu_without_interpreter(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = _cli_error(["--pgpo.backend", "triton", "--out-dir", str(tmp_path / "r")], capsys)
    assert msg.startswith("--pgpo.backend triton needs a CUDA device")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs it (slowly): accepted
    TrainConfig(pgpo=PGPOWeightsConfig(backend="triton"), out_dir=str(tmp_path / "r")).resolved()


@pytest.mark.parametrize("args", ["--dtype foo", "--pgpo.backend foo", "--lr abc", "--no-such-flag 1",
                                  "--rollout-engine sglang"])
def test_argparse_errors_are_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args.split())
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pgpo-train: error: "), err


def test_api_checks_types_and_choices():
    for kw, flag in [
        ({"dtype": "foo"}, "--dtype must be auto, float32, bfloat16 or float16"),
        ({"lr": "1e-4"}, "--lr must be float"),
        ({"steps": 2.5}, "--steps must be int"),
        ({"progress": "no"}, "--progress must be bool"),
        ({"pgpo": PGPOWeightsConfig(renormalize="no")}, "--pgpo.renormalize must be bool"),
        ({"pgpo": PGPOWeightsConfig(backend="cuda")}, "--pgpo.backend must be auto, torch or triton"),
        ({"pgpo": PGPOWeightsConfig(eps=float("inf"))}, "--pgpo.eps must be a finite number"),
        ({"acc_weight": 0.0, "format_weight": 0.0}, "--acc-weight and --format-weight are both 0"),
    ]:
        with pytest.raises(ValueError, match=flag.replace(".", r"\.")):
            TrainConfig(out_dir="o", **kw).resolved()


def test_out_dir_naming_a_file(tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    assert _cli_error(["--out-dir", str(f)], capsys) == f"--out-dir {f} is a file, not a directory"
    assert "is a file" in _cli_error(["--out-dir", str(f / "sub")], capsys)


def test_resume_of_a_missing_run_dir_says_so_and_creates_nothing(tmp_path, capsys, no_work):
    out = tmp_path / "typo"
    assert _cli_error(["--resume", "--out-dir", str(out)], capsys) == f"--resume: there is no run directory {out}"
    assert not out.exists()
    (tmp_path / "empty").mkdir()  # a run stopped before its first checkpoint
    assert "holds no checkpoint" in _cli_error(["--resume", "--out-dir", str(tmp_path / "empty")], capsys)


# %% model sources


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pgpo_train.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_or_truncated_model_dir(tiny_dir, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    msg = _cli_error(["--model", str(tmp_path / "nope"), "--out-dir", str(out)], capsys)
    assert msg == f"--model {tmp_path / 'nope'}: no such file or directory"
    no_cfg = _copy(tiny_dir, tmp_path / "no_cfg")
    os.remove(no_cfg / "config.json")
    assert "has no config.json" in _cli_error(["--model", str(no_cfg), "--out-dir", str(out)], capsys)
    no_w = _copy(tiny_dir, tmp_path / "no_weights")
    os.remove(no_w / "model.safetensors")
    assert "has no weights" in _cli_error(["--model", str(no_w), "--out-dir", str(out)], capsys)
    cut = _copy(tiny_dir, tmp_path / "cut")
    size = os.path.getsize(cut / "model.safetensors")
    with open(cut / "model.safetensors", "r+b") as f:  # an interrupted download
        f.truncate(size // 2)
    msg = _cli_error(["--model", str(cut), "--out-dir", str(out)], capsys)
    assert "model.safetensors is truncated" in msg, msg
    assert not out.exists()


def test_hub_name_without_network_is_one_line_and_fast(tmp_path, capsys, monkeypatch, no_work):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    msg = _cli_error(["--model", "someone/some-vlm", "--out-dir", str(out)], capsys)
    assert time.perf_counter() - t0 < 10
    assert msg.startswith("--model someone/some-vlm: no such local directory, not in the hub cache"), msg
    assert not out.exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in _cli_error(["--dataset", "someone/some-data", "--out-dir", str(out)], capsys)
    assert not out.exists()


def test_cached_hub_name_without_network_goes_offline(tmp_path, capsys, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    from pgpo_train.run.validate import check_sources

    cache = tmp_path / "hub-cache"
    (cache / "models--someone--some-vlm" / "snapshots" / "abc123").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    check_sources(TrainConfig(model="someone/some-vlm", out_dir=str(tmp_path / "run")).resolved())
    assert "using the cached someone/some-vlm" in capsys.readouterr().out
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE  # no retries against the dead hub


# %% datasets


def _write_dataset(path, rows):
    import datasets

    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    os.makedirs(path, exist_ok=True)
    ds = datasets.Dataset.from_list(rows or _rows(1), features=feats).select(range(len(rows)))  # 0 rows too
    ds.to_parquet(str(path / "train.parquet"))
    return str(path)


def _png(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _rows(n, seed=0, **override):
    from pgpo_train.data.tasks import make_count_records

    return [{**r, "image": _png(r["image"]), **override} for r in make_count_records(n, seed=seed)]


def _data_cli(data, out, capsys):
    return _cli_error(["--dataset", data, "--prompt-template", "tiny", "--out-dir", str(out)], capsys)


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(train_mod, "load_policy", boom)


def test_zero_rows_and_undecodable_images_fail_before_the_model_loads(tmp_path, capsys, no_model):
    out = tmp_path / "runs" / "run"
    empty = _write_dataset(tmp_path / "empty", [])
    assert _data_cli(empty, out, capsys) == f"dataset {empty!r} split 'train' has no rows"
    assert not out.parent.exists()  # no empty run dir left behind, nor the runs/ made for it
    junk = _write_dataset(tmp_path / "junk", _rows(6, image={"bytes": b"not an image", "path": None}))
    msg = _data_cli(junk, out, capsys)
    assert msg.startswith("--image-column 'image': none of the first 6 records decodes to an image"), msg
    assert not out.exists()
    null = _write_dataset(tmp_path / "null", _rows(6, answer=None))
    assert "non-empty 'problem' and 'answer'" in _data_cli(null, out, capsys)
    assert not out.exists()


def test_null_or_empty_answers_are_skipped_and_counted(tmp_path):
    from pgpo_train.data.loading import RecordStream
    from pgpo_train.data.loading import Sampler
    from pgpo_train.data.loading import load_split

    rows = _rows(12, seed=1)
    for i in (0, 4, 8):
        rows[i]["answer"] = None
    rows[5]["answer"] = "  "
    path = _write_dataset(tmp_path / "d", rows)
    cols = {"image": "image", "problem": "problem", "answer": "answer"}
    ds = load_split(path, "train", cols)
    stream = RecordStream(ds, cols, Sampler(len(ds), 0))
    recs = stream.next_batch(16)  # more than one epoch: every bad row is met
    assert all(r["answer"].strip() and r["answer"] != "None" for r in recs)
    assert stream.skipped_empty >= 4 and stream.skipped_images == 0


def test_a_missing_answer_never_scores():
    from pgpo_train.data.rewards import compute_score

    resp = "<think>a</think> \\boxed{None}"
    assert compute_score(resp, None)["acc"] == 0.0
    assert compute_score("<think>a</think> \\boxed{}", "")["acc"] == 0.0
    assert compute_score("<think>a</think> \\boxed{3}", "3")["acc"] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_rollout_engine_vllm_without_vllm_is_one_line(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    msg = _cli_error(["--rollout-engine", "vllm", "--out-dir", str(out)], capsys)
    assert msg.startswith("--rollout-engine vllm needs vLLM") and "pip install -e .[vllm]" in msg, msg
    assert not out.exists()
