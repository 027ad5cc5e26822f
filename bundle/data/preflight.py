"""Checks every case before any work starts (docs/architecture.md, "Bad input"): all problems reported
together, with paths."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage

from ..errors import BadInputError

__all__ = ["PreflightError", "check_case", "preflight"]

logger = logging.getLogger(__name__)


class PreflightError(BadInputError):
    """Some cases cannot be used; the message lists every problem with its file."""


def _load(path: str, channel: int | None) -> np.ndarray:
    """The volume of one modality, channel-first (C, *S), C = 1 after channel selection."""
    image = LoadImage(image_only=True, ensure_channel_first=True)(path)
    array = np.asarray(image)
    if channel is not None:
        if array.ndim != 4:
            raise ValueError(f"expected a 4D volume to take channel {channel} from, got shape {array.shape[1:]}")
        if channel >= array.shape[0]:
            raise ValueError(f"has {array.shape[0]} channels, channel {channel} was asked for")
        array = array[channel : channel + 1]
    return array


def check_case(record: dict, modalities: Sequence[str]) -> list[str]:
    """Problems of one case record (empty when it is usable): missing or unreadable files, wrong
    dimensionality, non-finite or constant values, shapes that differ between modalities."""
    problems, shapes = [], {}
    for m in modalities:
        path = record.get(m)
        channel = record.get("channels", {}).get(m)
        where = f"case {record['case']}, {m}: {path}"
        if path is None or not Path(path).exists():
            problems.append(f"{where}: file missing")
            continue
        try:
            array = _load(path, channel)
        except Exception as error:  # noqa: BLE001 - any reader failure is a problem of this file, reported with the rest
            problems.append(f"{where}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            continue
        if array.ndim != 4 or array.shape[0] != 1:
            expected = "a 3D volume" if channel is None else f"a 4D volume with channel {channel}"
            shape = tuple(array.shape[1:]) if array.ndim > 1 else array.shape
            problems.append(f"{where}: has shape {shape}, expected {expected}")
            continue
        if not np.isfinite(array).all():
            problems.append(f"{where}: contains {int((~np.isfinite(array)).sum())} non-finite values")
        elif float(array.max()) == float(array.min()):
            problems.append(f"{where}: is constant ({float(array.min())})")
        shapes[m] = tuple(array.shape[1:])
    if len(set(shapes.values())) > 1:
        problems.append(f"case {record['case']}: modalities differ in shape: {shapes}")
    return problems


def preflight(
    records: Sequence[dict], modalities: Sequence[str], skip_invalid: bool = False, purpose: str = "train on"
) -> list[dict]:
    """The usable records. Raises :class:`PreflightError` listing every problem unless ``skip_invalid``,
    in which case the bad cases are skipped with a warning. Always raises when no case is usable. ``purpose``: what
    the messages say is done with the valid cases ("train on", "translate")."""
    problems: dict[str, list[str]] = {}
    for record in records:
        found = check_case(record, modalities)
        if found:
            problems[record["case"]] = found
    valid = [r for r in records if r["case"] not in problems]
    if problems:
        listing = "\n".join(f"  - {p}" for found in problems.values() for p in found)
        summary = f"{len(problems)} of {len(records)} cases failed the preflight check:\n{listing}"
        if not skip_invalid or not valid:
            raise PreflightError(
                f"{summary}\nFix or remove these cases, or set skip_invalid: true to {purpose} the "
                f"{len(valid)} valid ones."
                if valid
                else f"{summary}\nNo usable case is left."
            )
        logger.warning("%s\nskip_invalid is true: going on to %s the %d valid cases.", summary, purpose, len(valid))
    return valid
