"""Run one case on every requested backend and turn the measurements into result records (plain dicts).

Per backend, in order: build (or record why it can't run), one first call (timed alone: it includes any compile),
one call under the peak-memory counter whose output is checked against the float64 reference, then the timing.
Out-of-memory and other failures are recorded with their reason; the sweep goes on.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import torch

from .cases import Case
from .cases import max_abs_errors
from .providers import Unavailable
from .providers import build
from .timing import call_with_peak_memory
from .timing import synchronize
from .timing import time_fn


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def base_record(case: Case, backend: str) -> dict[str, Any]:
    return {
        "op": case.op,
        "tokens": case.tokens,
        "shape": dict(case.shape),
        "dtype": str(case.dtype).removeprefix("torch."),
        "backend": backend,
        "bytes": case.bytes_moved,
        "flops": case.flops,
        "status": "ok",
        "reason": None,
        "time_ms": None,
        "first_call_ms": None,
        "GBps": None,
        "copy_fraction": None,
        "TFLOPs": None,
        "peak_extra_bytes": None,
        "max_abs_err": None,
        "errors": None,
        "err_rows": int(case.check_index.numel()),
    }


def run_backend(case: Case, backend: str, *, copy_gbps: float | None, warmup_ms: float, rep_ms: float) -> dict:
    """Measure `case` on one backend -> a result record (status ok / unavailable / error)."""
    rec = base_record(case, backend)
    try:
        fn = build(backend, case)
    except Unavailable as exc:
        rec.update(status="unavailable", reason=str(exc))
        return rec
    except Exception as exc:  # noqa: BLE001 - a backend that breaks while being set up is a result too
        rec.update(status="error", reason=_reason(exc))
        return rec
    try:
        t0 = time.perf_counter()
        out = fn()
        synchronize(case.device)
        rec["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        del out
        _free(case.device)
        out, peak = call_with_peak_memory(fn, case.device)
        rec["peak_extra_bytes"] = peak
        errs = max_abs_errors(case, out)
        del out
        _free(case.device)
        rec["errors"] = errs
        rec["max_abs_err"] = max(errs.values())
        stats = time_fn(fn, case.device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    except torch.OutOfMemoryError as exc:
        rec.update(status="error", reason="out of memory: " + _reason(exc))
        _free(case.device)
        return rec
    except Exception as exc:  # noqa: BLE001 - a failing baseline is a result to report, not a crash
        rec.update(status="error", reason=_reason(exc))
        _free(case.device)
        return rec
    seconds = stats.median_ms * 1e-3
    rec["time_ms"] = stats.as_dict()
    rec["GBps"] = case.bytes_moved / seconds / 1e9 if seconds > 0 else math.inf
    if copy_gbps:
        rec["copy_fraction"] = rec["GBps"] / copy_gbps
    if case.flops is not None and seconds > 0:
        rec["TFLOPs"] = case.flops / seconds / 1e12
    _free(case.device)
    return rec


def run_case(case: Case, backends: list[str], *, copy_gbps: float | None, warmup_ms: float, rep_ms: float,
             on_record=None) -> list[dict]:
    """All backends on one case, in the given order; on_record(rec) is called after each (for progress)."""
    records = []
    for backend in backends:
        rec = run_backend(case, backend, copy_gbps=copy_gbps, warmup_ms=warmup_ms, rep_ms=rep_ms)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return records
