"""Ignite handlers: non-finite guard, step statistics, inversion drift, previews, generation quality, and the run's
shared TensorBoard writer (the checkpoint handler is :class:`bundle.checkpoint.TrainingCheckpoint`)."""

from .drift import InversionDriftMonitor
from .generation import GenerationMonitor
from .nonfinite import NonFiniteLossGuard
from .previews import PreviewHandler
from .step_stats import StepStatsHandler, peak_memory_bytes
from .tensorboard import summary_writer

__all__ = [
    "GenerationMonitor",
    "InversionDriftMonitor",
    "NonFiniteLossGuard",
    "PreviewHandler",
    "StepStatsHandler",
    "peak_memory_bytes",
    "summary_writer",
]
