"""Invertible Diffusion Model (IDM) MONAI bundle."""

import json
from pathlib import Path

from .errors import BadInputError, NonFiniteLossError, install_error_hook
from .flags import as_flag, as_flags, as_memory_budget, network_memory_budget

# the bundle's version is defined once, in configs/metadata.json (which the model zoo reads)
__version__ = json.loads((Path(__file__).resolve().parents[1] / "configs" / "metadata.json").read_text())["version"]
__all__ = [
    "BadInputError",
    "NonFiniteLossError",
    "__version__",
    "as_flag",
    "as_flags",
    "as_memory_budget",
    "install_error_hook",
    "network_memory_budget",
]
