"""verl 0.9.1's real code with PGPO, in the environment verl pins (tests/support/verl_real_cases.py).

verl 0.9.1 needs transformers < 5.11 while the main suite runs a newer one, and verl's model patches replace
transformers classes process-wide, so the cases run in a second virtualenv that .ci/run builds (.venv-verl, or
$PGPO_VERL_VENV), as a pytest subprocess from here. CI sets PGPO_REQUIRE_REAL_CODE=1, so a missing venv fails there;
on a dev machine without it the test skips and says how to build it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("PGPO_VERL_VENV") or ROOT / ".venv-verl")


def test_pgpo_on_verls_real_driver_engine_and_model_patches(tmp_path):
    python = VENV / "bin" / "python"
    if not python.exists():
        msg = (f"no verl 0.9.1 virtualenv at {VENV} (build it as .ci/run does, or point PGPO_VERL_VENV at one): "
               "the real-code verl cases did not run")
        if os.environ.get("PGPO_REQUIRE_REAL_CODE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    report = tmp_path / "figures.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PGPO_REAL_CODE_REPORT=str(report))
    env.pop("PGPO_VERL_VENV", None)
    res = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
                          "tests/support/verl_real_cases.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800, check=False)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    figures = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(figures) == 8, figures  # 7 supported configurations + the refused one, each measured
    for f in figures:  # shown with -s / on failure: the acceptance figures of this run
        print(json.dumps(f), file=sys.stderr)
