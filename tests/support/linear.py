"""Timing a parser on 1x, 10x and 100x inputs: linear work grows ~10x per step, quadratic
~100x. The bound is generous (shared CI machines are noisy), and each size takes the
best of a few runs. The time is the thread's CPU time, which other processes on the
machine (a parallel test run) do not add to, unlike the wall clock's."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

# Linear gives ~10 from 10x to 100x; quadratic ~100. Anything under this passes.
MAX_STEP_RATIO = 30.0
# Below this many seconds a run is all noise: the ratio is not meaningful.
FLOOR = 0.002


def best_time(run: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()  # a collection landing in one run is noise, not the parser's cost
        try:
            started = time.thread_time()
            run()
            best = min(best, time.thread_time() - started)
        finally:
            gc.enable()
    return best


def assert_linear(work: Callable[[Any], Any], make_input: Callable[[int], Any],
                  base: int, *, repeat: int = 3, label: str = "") -> list[float]:
    """Times ``work(make_input(n))`` for n = base, 10*base, 100*base; fails unless the
    last step grows by less than MAX_STEP_RATIO (and the first, when it is measurable).
    Returns the three times, printed for the record (pytest -s)."""
    times = []
    for n in (base, 10 * base, 100 * base):
        data = make_input(n)
        times.append(best_time(lambda data=data: work(data), repeat=repeat))
        del data
    print(f"\n{label or getattr(work, '__name__', 'work')}: "
          + ", ".join(f"{n}x {t * 1000:.1f} ms" for n, t in zip((1, 10, 100), times,
                                                                  strict=True)))
    assert times[2] / max(times[1], FLOOR) < MAX_STEP_RATIO, times
    if times[0] > FLOOR:
        assert times[1] / times[0] < MAX_STEP_RATIO, times
    return times
