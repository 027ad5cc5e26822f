"""The inversion-drift monitor: how exactly the invertible trunk rebuilds its activations as training goes."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from ..diffusion.maths import with_condition
from ..utils import unwrap

__all__ = ["InversionDriftMonitor"]

logger = logging.getLogger(__name__)


class InversionDriftMonitor:
    """Every ``interval`` iterations, the trunk's round-trip error on that step's noisy inputs
    (``InvertibleDiffusionUNet.trunk_round_trip_error``, the largest over the batch), written as
    ``train/inversion_drift`` to TensorBoard with ``summary_writer`` (the run's shared writer, which it never
    closes: :func:`bundle.handlers.summary_writer`) and kept in :attr:`latest`; above
    ``warn_above`` a warning says that the memory-efficient gradients are no longer exact to float32
    rounding. The memory-efficient backward rebuilds every activation by inversion, so its gradients are
    as exact as that reconstruction; the drift grows with the weights' conditioning as training goes.

    It reads ``image`` (x₀), ``label`` (ε), ``timesteps`` and a conditioned model's ``condition`` from the
    :class:`~bundle.diffusion.IDMTrainer` output and rebuilds ``x_t`` with the trainer's ``scheduler``. One check
    costs a trunk forward and inverse without autograd, about two thirds of a training step.
    """

    def __init__(self, *, summary_writer: SummaryWriter, interval: int = 100, warn_above: float = 1e-3) -> None:
        if interval < 1:
            raise ValueError(f"interval must be ≥ 1, got {interval}.")
        self.summary_writer = summary_writer
        self.interval = interval
        self.warn_above = warn_above
        self.latest: float | None = None  # nan for a network without an invertible trunk

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.measure)

    def measure(self, engine: Engine) -> None:
        """Measures and logs the drift; a network without an invertible trunk (a baseline trained by the same
        configuration) has nothing to check, which is logged once."""
        network = unwrap(engine.network)
        if not hasattr(network, "trunk_round_trip_error"):
            if self.latest is None:
                logger.info("%s has no invertible trunk: no inversion drift to monitor.", type(network).__name__)
                self.latest = float("nan")
            return
        output = engine.state.output  # decollated per sample after the step, or the batch's dict

        def batch(key: str) -> torch.Tensor:  # decollation turns each sample's timestep into a number
            if not isinstance(output, list):
                return output[key]
            return torch.stack([torch.as_tensor(sample[key], device=engine.state.device) for sample in output])

        images, noise, timesteps = batch("image"), batch("label"), batch("timesteps")
        conditioned = "condition" in (output[0] if isinstance(output, list) else output)
        noisy = with_condition(
            engine.scheduler.add_noise(images, noise, timesteps), batch("condition") if conditioned else None
        )
        self.latest = float(network.trunk_round_trip_error(noisy, timesteps).max())
        self.summary_writer.add_scalar("train/inversion_drift", self.latest, engine.state.iteration)
        if self.latest > self.warn_above:
            logger.warning(
                "iteration %d: the invertible trunk's round trip is off by %.1e (relative) on this batch, above %.0e: "
                "the memory-efficient gradients are exact only to about that much. A lower learning rate or "
                "--memory_efficient false (more memory) avoids it.",
                engine.state.iteration,
                self.latest,
                self.warn_above,
            )
