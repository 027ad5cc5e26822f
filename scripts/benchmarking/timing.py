"""Step times over interleaved repetitions, in a fresh process (docs/architecture.md, "Measuring").

Each round times every workload once, in turn, so a ratio of two workloads' times is taken within a round
(paired) before a median over rounds: drifts of a shared machine that last longer than a round then
cancel out of the ratio (:func:`paired_ratio`).

The process (a :class:`~scripts.benchmarking.child_process.FreshProcess`) runs with
``MALLOC_MMAP_THRESHOLD_=65536``, as the peak-memory process does: tensors are mapped and unmapped, so
freed memory goes back to the OS and the process holds no more than one step's working set beyond the
models (glibc's default would keep growing its heap, and four networks timed side by side at 128³ would
not fit in 24 GiB). Every step then pays page faults for the memory it allocates, the memory-hungry
steps the most.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from .child_process import FreshProcess, measuring_device
from .workload import Workload, build_network, make_training_step

__all__ = ["interleaved_times", "measure_times_in_subprocess", "paired_ratio"]


def interleaved_times(steps: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each step in each of ``repeats`` rounds, timing the steps in turn (A B C A B C …) so that
    drifts of the machine (thermal, other load) hit every step alike. ``warmup`` untimed rounds come first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` over rounds of ``seconds[i] / reference[i]``: two workloads timed in the same
    rounds of :func:`interleaved_times`."""
    if len(seconds) != len(reference) or not seconds:
        raise ValueError(
            f"paired_ratio needs two equally long, non-empty lists of rounds, got {len(seconds)} and {len(reference)}."
        )
    ratios = [a / b for a, b in zip(seconds, reference, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def measure_times_in_subprocess(
    workloads: Sequence[Workload], repeats: int, timeout: float = 3600
) -> list[list[float]]:
    """Step seconds of each workload (in their order) in each round, measured together in one fresh process;
    a ``RuntimeError`` saying why where that process failed or gave no result within ``timeout`` seconds."""
    result = FreshProcess(_time_steps, list(workloads), repeats).result(timeout)
    if "error" in result:
        raise RuntimeError(f"timing process failed: {result['error']}")
    return result["seconds"]


def _time_steps(workloads: list[Workload], repeats: int) -> dict:
    device = measuring_device()
    steps = {str(i): make_training_step(w, build_network(w).to(device), device).step for i, w in enumerate(workloads)}
    return {"seconds": list(interleaved_times(steps, repeats).values())}
