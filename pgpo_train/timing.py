"""Wall-clock sections of a step, summed into its `timing/*` metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0
