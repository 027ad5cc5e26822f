"""Errors for bad input and stopped training, and the hook that reports them without a traceback."""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["BadInputError", "NonFiniteLossError", "bad_input_in", "install_error_hook"]


class BadInputError(ValueError):
    """An input (file, directory, argument) that the bundle cannot use; the message says what would do."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or gradient) and was stopped before the weights were updated."""


def bad_input_in(error: BaseException | None) -> BadInputError | NonFiniteLossError | None:
    """The :class:`BadInputError` or :class:`NonFiniteLossError` that ``error`` is, or was raised from: MONAI's config
    parser re-raises an error of an expression or a component as a ``RuntimeError`` from it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (BadInputError, NonFiniteLossError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    found = bad_input_in(error)
    if found is None:
        sys.__excepthook__(kind, error, traceback)
    else:
        print(f"ERROR: {found}", file=sys.stderr)


def install_error_hook() -> None:
    """Makes an uncaught :class:`BadInputError` or :class:`NonFiniteLossError` (also one wrapped by MONAI's config
    parser) end the process as one paragraph ``ERROR: …`` on stderr, where ``python -m monai.bundle run`` reports
    errors, without a traceback; the exit code stays the interpreter's 1. Other errors keep their traceback. Each
    config's ``initialize`` calls it first."""
    sys.excepthook = _report
