"""The gradient filter's skipped tile fraction on a policy's own next-token distributions: pgpo-train's tiny
Qwen2.5-VL (V = its tokenizer's ~384 tokens) through 120 SFT warm-up steps and 3 RL steps, CPU.

Every fused_linear_logp call of the run (SFT update and RL update/old-logp passes, --pgpo.fused-lm-head on) also
hands its hidden states, lm_head and targets to pgpo_kernels.logp_filter.filter_tiles, which applies the Triton
backward's rule (grad_filter = CCE's 2**-12 for bf16 gradients, the dtype the GPU path would train in; the CPU run
itself is fp32) at the GPU tiles (128 x 128) and at 64 x 128; the targets are the responses (SFT: reference
solutions; RL: the policy's own samples). Writes skip_fraction_tiny.json beside this file.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/results/logp/skip_fraction_tiny.py /tmp/run_dir
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import pgpo_kernels
from pgpo_kernels.logp_filter import filter_tiles

RECORDS = []
_real = pgpo_kernels.fused_linear_logp


def _spy(hidden, weight, targets, bias=None, **kw):
    caller = os.path.basename(inspect.stack()[1].filename)
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    rec = {"caller": caller, "rows": int((t != kw.get("ignore_index", -100)).sum()), "vocab": int(weight.shape[0])}
    for bn, bv in ((128, 128), (64, 128)):
        ft = filter_tiles(h, weight.detach(), t, None if bias is None else bias.detach(), grad_filter=2.0**-12,
                          temperature=kw.get("temperature", 1.0), block_n=bn, block_v=bv,
                          ignore_index=kw.get("ignore_index", -100))
        rec[f"{bn}x{bv}"] = {"tiles": ft.tiles, "skipped": ft.skipped, "mass_max": ft.skipped_mass_max,
                             "mass_mean": ft.skipped_mass_mean}
    RECORDS.append(rec)
    return _real(hidden, weight, targets, bias, **kw)


def main() -> None:
    out_dir = sys.argv[1]
    import pgpo_train.cli as cli

    pgpo_kernels.fused_linear_logp = _spy  # callers that import it at call time

    for name, mod in list(sys.modules.items()):
        if name.startswith("pgpo_train") and getattr(mod, "fused_linear_logp", None) is _real:
            mod.fused_linear_logp = _spy
    cli.main(["--out-dir", out_dir, "--overwrite", "--sft-steps", "120", "--steps", "3", "--eval-every", "0",
              "--pgpo.fused-lm-head", "on", "--save-every", "0"])
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "skip_fraction_tiny.json"), "w") as f:
        json.dump({"script": os.path.basename(__file__), "grad_filter": 2.0**-12, "records": RECORDS}, f, indent=1)


if __name__ == "__main__":
    main()
