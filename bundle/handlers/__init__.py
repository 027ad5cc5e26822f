"""Ignite handlers: checkpoints, non-finite guard, step statistics, previews."""

from .checkpoint import TrainingCheckpoint, atomic_save, check_checkpoint_folder
from .nonfinite import NonFiniteLossGuard
from .previews import PreviewHandler
from .step_stats import StepStatsHandler, peak_memory_bytes

__all__ = [
    "NonFiniteLossGuard",
    "PreviewHandler",
    "StepStatsHandler",
    "TrainingCheckpoint",
    "atomic_save",
    "check_checkpoint_folder",
    "peak_memory_bytes",
]
