"""Interleaved timing: on a shared machine, load changes by the second, so the things being compared run in
alternating order within every repetition and are compared repetition by repetition (ratios of neighbours),
then summarized by medians."""

import statistics
import time
from collections.abc import Callable


def interleaved(tasks: dict[str, Callable[[], dict[str, float]]], repetitions: int) -> list[dict[str, float]]:
    """Run every task once per repetition, in an order that alternates between repetitions.

    A task returns the durations it measured (``{"name": seconds, ...}``); the result is one merged dict per
    repetition, so ratios can be taken between durations measured seconds apart.
    """
    names = list(tasks)
    rows = []
    for repetition in range(repetitions):
        row: dict[str, float] = {}
        for name in names if repetition % 2 == 0 else reversed(names):
            row.update(tasks[name]())
        rows.append(row)
    return rows


def timed(fn: Callable[[], object], synchronize: Callable[[], None] | None = None) -> float:
    """Wall-clock seconds of one call of ``fn``; ``synchronize`` (e.g. ``torch.cuda.synchronize``) waits for
    queued device work before the clock starts and before it stops."""
    if synchronize:
        synchronize()
    start = time.perf_counter()
    fn()
    if synchronize:
        synchronize()
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(list(values))


def quartiles(values) -> tuple[float, float]:
    """First and third quartiles: the spread of a per-repetition quantity, reported beside its median."""
    values = sorted(values)
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def median_of(rows: list[dict[str, float]], fn: Callable[[dict[str, float]], float]) -> float:
    """Median over repetitions of a quantity computed within each repetition (e.g. a ratio of two timings)."""
    return median(fn(row) for row in rows)
