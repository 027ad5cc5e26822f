"""Dataset discovery, preprocessing, synthetic phantoms and preflight checks."""

from .dataset import split_cases, training_cases
from .discovery import DatasetNotFoundError, discover_cases
from .phantoms import PHANTOM_FOLDER, PHANTOM_PREFIX, make_phantom, write_brats_phantoms
from .preflight import PreflightError, check_case, preflight
from .transforms import SelectChanneld, foreground, preprocessing

__all__ = [
    "PHANTOM_FOLDER",
    "PHANTOM_PREFIX",
    "DatasetNotFoundError",
    "PreflightError",
    "SelectChanneld",
    "check_case",
    "discover_cases",
    "foreground",
    "make_phantom",
    "preflight",
    "preprocessing",
    "split_cases",
    "training_cases",
    "write_brats_phantoms",
]
