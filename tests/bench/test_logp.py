"""pgpo-bench logp at a tiny shape: every CPU provider runs in its own process and reports memory, time, error."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_logp_bench_cpu_rows(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "pgpo_bench.cli", "logp", "--tokens", "48", "--vocab", "301",
                           "--hidden", "16", "--reps", "1", "--providers",
                           "logits,ours_torch,liger_scaled,ours_triton,ours_triton_bwd64",
                           "--json",
                           str(out), "--quiet"], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["provider"]: r for r in json.loads(out.read_text())["records"]}
    for name in ("logits", "ours_torch", "liger_scaled"):  # Liger's scaled CE: its torch fallback off sm_90
        assert recs[name]["status"] == "ok", recs[name]
        assert recs[name]["peak_extra_bytes"] >= 0 and recs[name]["us_per_token"] > 0
        assert recs[name]["max_abs_err_logp"] < 1e-4
    for name in ("ours_triton", "ours_triton_bwd64"):
        assert recs[name]["status"] == "skipped" and "CUDA" in recs[name]["reason"]
    assert "| 48 | ours_torch |" in proc.stdout
