"""Packaging: the kernel package stands alone (torch and triton only); the wheel holds what it should."""

import subprocess
import sys


def test_kernels_import_pulls_no_training_stack():
    code = (
        "import sys, pgpo_kernels\n"
        "heavy = [m for m in ('transformers', 'datasets', 'math_verify', 'pgpo_train', 'trl', 'liger_kernel') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(pgpo_kernels.token_kl) and callable(pgpo_kernels.reshape_weights)\n"
        "assert callable(pgpo_kernels.pgpo_token_weights)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_wheel_ships_no_results_and_no_generic_top_level_name(tmp_path):
    """The wheel (built from a copy of the sources, offline) holds pgpo_kernels, pgpo_train and pgpo_bench, no
    benchmarks/results scripts (copied in, they must stay out), and pgpo-bench runs from it alone."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pgpo_kernels", "pgpo_train", "pgpo_bench", "benchmarks"):
        shutil.copytree(root / name, src / name, ignore=ignore)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pgpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pgpo_kernels", "pgpo_train", "pgpo_bench"}, tops
    assert not [n for n in names if "results" in n.split("/")], "benchmark results shipped"
    assert "pgpo_bench/cli.py" in names and "pgpo_train/integrations/trl.py" in names
    assert "pgpo_kernels/torch_fallback/token_kl.py" in names, "a pgpo_kernels subpackage missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pgpo-bench = pgpo_bench.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the installed benchmark tools import each other as pgpo_bench, never through a top-level `benchmarks`
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    code = "import sys, pgpo_bench.cli; assert 'benchmarks' not in sys.modules, 'imports benchmarks'; print('ok')"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
