"""Ignite handlers: non-finite guard, step statistics, inversion drift, previews (the checkpoint handler is
:class:`bundle.checkpoint.TrainingCheckpoint`)."""

from .drift import InversionDriftMonitor
from .nonfinite import NonFiniteLossGuard
from .previews import PreviewHandler
from .step_stats import StepStatsHandler, peak_memory_bytes

__all__ = [
    "InversionDriftMonitor",
    "NonFiniteLossGuard",
    "PreviewHandler",
    "StepStatsHandler",
    "peak_memory_bytes",
]
