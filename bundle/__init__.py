"""Invertible Diffusion Model (IDM) MONAI bundle."""

import json
from pathlib import Path

from .errors import BadInputError, NonFiniteLossError, exit_on_bad_input
from .flags import as_flag

# the bundle's version is defined once, in configs/metadata.json (which the model zoo reads)
__version__ = json.loads((Path(__file__).resolve().parents[1] / "configs" / "metadata.json").read_text())["version"]
__all__ = ["BadInputError", "NonFiniteLossError", "as_flag", "exit_on_bad_input", "__version__"]
