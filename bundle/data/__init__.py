"""Dataset discovery, preprocessing, the built-in anatomical phantoms, test phantoms and preflight checks."""

from .anatomy import (
    BRATS_MODALITIES,
    PHANTOM_FOLDER,
    PHANTOM_PREFIX,
    anatomy_spacing,
    case_anatomy,
    case_grid,
    load_template,
    make_case,
    write_anatomy_cases,
)
from .dataset import split_cases, training_cases
from .discovery import DatasetNotFoundError, discover_cases
from .phantoms import make_ellipsoid_phantom, write_ellipsoid_phantoms
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
    "BRATS_MODALITIES",
    "PHANTOM_FOLDER",
    "PHANTOM_PREFIX",
    "DatasetNotFoundError",
    "NativeBoxd",
    "PreflightError",
    "SelectChanneld",
    "SplitConditiond",
    "anatomy_spacing",
    "case_anatomy",
    "case_grid",
    "check_case",
    "check_spacing",
    "discover_cases",
    "foreground",
    "load_template",
    "make_case",
    "make_ellipsoid_phantom",
    "preflight",
    "preprocessing",
    "split_cases",
    "training_cases",
    "write_anatomy_cases",
    "write_ellipsoid_phantoms",
]
