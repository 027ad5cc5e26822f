"""Errors for bad input and stopped training; the bundle's entry points report them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["BadInputError", "NonFiniteLossError", "exit_on_bad_input", "state_dict_mismatch"]


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


def state_dict_mismatch(network: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``network`` (weights missing, unexpected or of another shape,
    with examples), or ``""`` when it loads: the message of a checkpoint of another ``network_def``."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return "; ".join(
        part for part in (
            f"{len(missing)} weights missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else "",
        ) if part
    )
