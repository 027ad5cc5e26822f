"""Errors for bad input and stopped training; the bundle's entry points report them without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["BadInputError", "NonFiniteLossError", "exit_on_bad_input"]

logger = logging.getLogger("bundle")


class BadInputError(ValueError):
    """An input (file, directory, argument) that the bundle cannot use; the message says what would do."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss and was stopped before the weights were updated."""


def exit_on_bad_input(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls ``function``; a :class:`BadInputError`, :class:`NonFiniteLossError` or missing dataset is
    logged as one clear paragraph and ends the process with exit code 1 (no traceback)."""
    try:
        return function(*args, **kwargs)
    except (BadInputError, NonFiniteLossError, FileNotFoundError) as error:
        logger.error("%s", error)
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(1)
