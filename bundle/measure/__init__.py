"""Measurement helpers shared by the tests and the benchmark scripts (DESIGN §5)."""

from .baselines import count_parameters, matched_monai_unet
from .saved_bytes import saved_activation_bytes

__all__ = ["count_parameters", "matched_monai_unet", "saved_activation_bytes"]
