"""The measurements of ``scripts/benchmark.py``, their helpers shared with the tests
(docs/architecture.md, "Measuring")."""

from .baselines import CheckpointedBlock, count_parameters, enable_activation_checkpointing, matched_monai_unet
from .saved_bytes import saved_activation_bytes

__all__ = [
    "CheckpointedBlock",
    "count_parameters",
    "enable_activation_checkpointing",
    "matched_monai_unet",
    "saved_activation_bytes",
]
