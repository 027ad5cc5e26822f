"""Per-iteration training statistics in TensorBoard: loss terms, step time, peak memory, learning rate; and, after
the first steps, the measured time per step and what the whole run will take."""

from __future__ import annotations

import logging
import time

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from ..diffusion.loss import LOSS_TERMS
from ..process_memory import proc_status_bytes

__all__ = ["SMALL_CPU_RECIPE", "StepStatsHandler", "peak_memory_bytes"]

logger = logging.getLogger(__name__)

# the overrides of README.md's command that trains a small model on a CPU in minutes (tests/test_handlers.py checks)
SMALL_CPU_RECIPE = (
    '--spatial_size "[32,32,32]" --network_def#channels "[16,32,64]" --attention_levels "[false,true,true]" '
    "--num_train_timesteps 100 --batch_size 2 --train#trainer#max_epochs 2"
)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU; the process's peak RSS (``VmHWM``) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM") or 0


def readable_duration(seconds: float) -> str:
    """``"42 s"``, ``"17 min"``, ``"3 h 5 min"`` or ``"2 d 4 h"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h"


class StepStatsHandler:
    """Writes, every ``interval`` iterations, ``train/step_seconds``, ``train/peak_memory_mb`` (that step's
    CUDA peak on a GPU, the process peak RSS on the CPU), ``train/lr`` and the Eq. 8 terms found in the
    trainer output (``train/prediction_mse`` …) to TensorBoard with ``summary_writer`` (the run's shared writer, which
    it never closes: :func:`bundle.handlers.summary_writer`); also keeps the latest values in :attr:`latest`.

    After the :attr:`ETA_AFTER`-th iteration of a run it logs once what the run will take (:meth:`log_estimate`).
    """

    ETA_AFTER = 3  # iterations of this run before the estimate; the first is warm-up and is not counted
    LONG_ON_CPU = 3600.0  # seconds: an estimate above this on the CPU warns and names the small CPU recipe

    def __init__(self, optimizer: torch.optim.Optimizer, *, summary_writer: SummaryWriter, interval: int = 1) -> None:
        self.optimizer = optimizer
        self.summary_writer = summary_writer
        self.interval = interval
        self.latest: dict[str, float] = {}
        self._start = 0.0
        self._run_start_iteration = 0
        self._timed: list[float] = []  # step_seconds of this run's iterations 2 … ETA_AFTER

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._run_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _run_started(self, engine: Engine) -> None:
        self._run_start_iteration = engine.state.iteration  # > 0 when resumed
        self._timed = []

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
        done_in_run = engine.state.iteration - self._run_start_iteration
        if 1 < done_in_run <= self.ETA_AFTER:
            self._timed.append(self.latest["step_seconds"])
            if done_in_run == self.ETA_AFTER:
                self.log_estimate(engine, sum(self._timed) / len(self._timed))
        if engine.state.iteration % self.interval:
            return
        for name, value in self.latest.items():
            self.summary_writer.add_scalar(f"train/{name}", value, engine.state.iteration)

    def log_estimate(self, engine: Engine, step_seconds: float) -> None:
        """Logs (INFO) the measured time per step and the estimated time of the run's training steps: the steps
        in all (``max_epochs`` × iterations per epoch, less those done before a resumed run) × ``step_seconds``
        (the mean of this run's iterations 2 … :attr:`ETA_AFTER`, the first being warm-up; a step is the
        trainer's step alone, so data loading and validation come on top). On the CPU an estimate above
        :attr:`LONG_ON_CPU` also warns, naming README.md's small CPU model: the default is the paper's
        426M-parameter network, for a GPU."""
        state = engine.state
        steps = state.max_epochs * state.epoch_length - self._run_start_iteration
        seconds = steps * step_seconds
        shape = f"{state.max_epochs} epochs × {state.epoch_length} iterations"
        if self._run_start_iteration:
            what = f"{steps} steps in this resumed run ({shape}, less {self._run_start_iteration} done before)"
        else:
            what = f"{steps} steps in all ({shape})"
        logger.info(
            "measured %.3g s per training step; %s ≈ %s (training steps only: validation comes on top).",
            step_seconds,
            what,
            readable_duration(seconds),
        )
        if state.device.type == "cpu" and seconds > self.LONG_ON_CPU:
            parameters = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
            logger.warning(
                "training this %s-parameter network on the CPU would take about %s. The default configuration "
                "trains the paper's 426M-parameter network, which needs a GPU. README.md's smoke test trains a small "
                "model on a CPU in a minute (python -m monai.bundle run training --config_file configs/train.json "
                "%s); its anatomy recipe (docs/generation.md) trains a small model of the built-in brains at 6 mm, "
                "1,224 steps in under two hours.",
                f"{parameters:,}",
                readable_duration(seconds),
                SMALL_CPU_RECIPE,
            )
