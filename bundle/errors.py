"""Errors for bad input and stopped training; the bundle's entry points report them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["BadInputError", "NonFiniteLossError", "exit_on_bad_input"]


class BadInputError(ValueError):
    """An input (file, directory, argument) that the bundle cannot use; the message says what would do."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or gradient) and was stopped before the weights were updated."""


def exit_on_bad_input(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls ``function``; a :class:`BadInputError`, :class:`NonFiniteLossError` or missing dataset is
    printed once, as one paragraph ``ERROR: …`` on stderr (where ``python -m monai.bundle run`` reports
    errors; the log on stdout does not repeat it), and ends the process with exit code 1, without a traceback."""
    try:
        return function(*args, **kwargs)
    except (BadInputError, NonFiniteLossError, FileNotFoundError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(1)
