"""Per-iteration training statistics in TensorBoard: loss terms, step time, peak memory, learning rate."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from ..diffusion.loss import LOSS_TERMS
from ..process_memory import proc_status_bytes

__all__ = ["StepStatsHandler", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process's peak RSS (``VmHWM``) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM") or 0


class StepStatsHandler:
    """Writes, every ``interval`` iterations, ``train/step_seconds``, ``train/peak_memory_mb`` (that step's
    CUDA peak on a GPU, the process peak RSS on the CPU), ``train/lr`` and the Eq. 8 terms found in the
    trainer output (``train/eps_mse`` …) to TensorBoard under ``log_dir``; also keeps the latest values
    in :attr:`latest`."""

    def __init__(self, optimizer: torch.optim.Optimizer, log_dir: str, interval: int = 1) -> None:
        self.optimizer = optimizer
        self.log_dir = log_dir
        self.interval = interval
        self.latest: dict[str, float] = {}
        self._start = 0.0
        self._writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _started(self, engine: Engine) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.state.device)
        self._start = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        if engine.state.device.type == "cuda":
            torch.cuda.synchronize(engine.state.device)
        output = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        self.latest = {
            "step_seconds": time.perf_counter() - self._start,
            "peak_memory_mb": peak_memory_bytes(engine.state.device) / 2**20,
            "lr": self.optimizer.param_groups[0]["lr"],
        } | {k: float(output[k]) for k in LOSS_TERMS if k in output}
        if engine.state.iteration % self.interval:
            return
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        for name, value in self.latest.items():
            self._writer.add_scalar(f"train/{name}", value, engine.state.iteration)

    def _close(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
