"""The kernel package stands alone: importable with nothing but torch and triton."""

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
