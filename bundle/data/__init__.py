"""Dataset discovery, preprocessing, synthetic phantoms and preflight checks."""

from .dataset import split_cases, training_cases
from .discovery import DatasetNotFoundError, discover_cases
from .phantoms import BRATS_GRID, PHANTOM_FOLDER, PHANTOM_GRID, PHANTOM_PREFIX, make_phantom, write_brats_phantoms
from .preflight import PreflightError, check_case, preflight
from .transforms import (
    ATLAS_FRAME,
    NativeBoxd,
    SelectChanneld,
    SplitConditiond,
    check_spacing,
    foreground,
    preprocessing,
)

__all__ = [
    "ATLAS_FRAME",
    "BRATS_GRID",
    "PHANTOM_FOLDER",
    "PHANTOM_GRID",
    "PHANTOM_PREFIX",
    "DatasetNotFoundError",
    "NativeBoxd",
    "PreflightError",
    "SelectChanneld",
    "SplitConditiond",
    "check_case",
    "check_spacing",
    "discover_cases",
    "foreground",
    "make_phantom",
    "preflight",
    "preprocessing",
    "split_cases",
    "training_cases",
    "write_brats_phantoms",
]
