"""Boolean (and memory-budget) settings as the bundle's command lines deliver them.

``python -m monai.bundle run … --overwrite false`` passes the string ``"false"`` (fire parses only
``True``/``False`` as booleans), and a non-empty string is truthy: every boolean setting is read through
:func:`as_flag`, so that ``false`` means false.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import BadInputError

__all__ = ["as_flag", "as_flags", "as_memory_budget", "network_memory_budget"]


def as_flag(value: bool | str, name: str) -> bool:
    """``value`` as a bool: a bool, or the string ``"true"``/``"false"`` in any case.

    Raises:
        BadInputError: naming ``name`` for anything else (a number, another string).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadInputError(f"{name} must be true or false, got {value!r}.")


def as_flags(values: Sequence[bool | str], name: str) -> tuple[bool, ...]:
    """Booleans from bools or the strings "true"/"false" (how a command line such as
    ``--attention_levels "[false,true,true]"`` delivers them).

    Raises:
        BadInputError: naming ``name`` and the values when one of them is neither.
    """
    if isinstance(values, (str, bool)) or not all(isinstance(v, (bool, str)) for v in values):
        raise BadInputError(f"{name} must be a list of true/false values, got {values!r}.")
    try:
        return tuple(as_flag(value, name) for value in values)
    except BadInputError:
        raise BadInputError(f"{name} must hold true/false values, got {list(values)}.") from None


def as_memory_budget(value: float | str) -> float | str:
    """``memory_budget`` of ``configs/train.json`` as bytes (a float ≥ 0; ``"inf"`` or ``float("inf")``: no limit)
    or ``"auto"`` (what the device has to spare, by the memory plan).

    Raises:
        BadInputError: for anything else, naming what is accepted.
    """
    if isinstance(value, str) and value.strip().lower() in ("auto", "inf"):
        return value.strip().lower() if value.strip().lower() == "auto" else math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise BadInputError(
            f"memory_budget must be a number of bytes ≥ 0 (0: rebuild every activation, the least memory; e.g. 4e9), "
            f"inf (keep every activation: plain autograd's speed) or auto (what the device has to spare, by the "
            f"memory plan); got {value!r}."
        )
    return float(value)


def network_memory_budget(value: float | str) -> float:
    """The budget the network is built with: ``memory_budget``'s bytes, or 0 for ``"auto"`` (the memory plan then
    sets it, :class:`~bundle.memory_plan.TrainingMemoryPlan`)."""
    budget = as_memory_budget(value)
    return 0.0 if budget == "auto" else budget
