"""Ignite handlers: checkpoints, non-finite guard, step statistics, inversion drift, previews."""

from .checkpoint import TrainingCheckpoint, atomic_save, check_checkpoint_folder
from .drift import InversionDriftMonitor
from .nonfinite import NonFiniteLossGuard
from .previews import PreviewHandler
from .step_stats import StepStatsHandler, peak_memory_bytes

__all__ = [
    "InversionDriftMonitor",
    "NonFiniteLossGuard",
    "PreviewHandler",
    "StepStatsHandler",
    "TrainingCheckpoint",
    "atomic_save",
    "check_checkpoint_folder",
    "peak_memory_bytes",
]
