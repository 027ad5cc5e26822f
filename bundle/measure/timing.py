"""Median step time over interleaved repetitions (DESIGN §5)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["interleaved_median_times"]


def interleaved_median_times(
    steps: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each step, timing them in turn (A B C A B C …) so that drifts of the
    machine (thermal, other load) hit every step alike. ``warmup`` untimed rounds come first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
