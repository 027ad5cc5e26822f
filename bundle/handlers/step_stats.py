"""Per-iteration step time, peak memory and learning rate, added to the trainer's ``stats`` output."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

__all__ = ["StepStatsHandler", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process's peak RSS (``VmHWM``) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class StepStatsHandler:
    """Adds ``step_seconds``, ``peak_memory_mb`` and ``lr`` to ``engine.state.output["stats"]`` after
    each iteration (for ``StatsHandler`` / ``TensorBoardStatsHandler`` with ``output_transform`` picking
    ``stats``). The CUDA peak is reset at each iteration start, so it is the peak of that step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.state.device)
        self._start = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.synchronize(engine.state.device)
        stats = engine.state.output.setdefault("stats", {})
        stats["step_seconds"] = time.perf_counter() - self._start
        stats["peak_memory_mb"] = peak_memory_bytes(engine.state.device) / 2**20
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
