"""Invertible Diffusion Model (IDM) MONAI bundle."""

from .errors import BadInputError, NonFiniteLossError, exit_on_bad_input

__version__ = "0.1.0"
__all__ = ["BadInputError", "NonFiniteLossError", "exit_on_bad_input", "__version__"]
