"""The measurements of ``scripts/benchmark.py``, their helpers shared with the tests (DESIGN §5)."""

from .baselines import CheckpointedBlock, count_parameters, enable_activation_checkpointing, matched_monai_unet
from .saved_bytes import saved_activation_bytes

__all__ = ["CheckpointedBlock", "enable_activation_checkpointing", "count_parameters", "matched_monai_unet", "saved_activation_bytes"]
