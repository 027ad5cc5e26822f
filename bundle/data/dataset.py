"""Training data: discovery, the built-in phantom default, preflight and the train/validation split."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import BadInputError
from ..utils import is_not_rank0
from .discovery import DatasetNotFoundError, discover_cases
from .phantoms import BRATS_MODALITIES, PHANTOM_FOLDER, PHANTOM_GRID, PHANTOM_PREFIX, write_brats_phantoms
from .preflight import preflight

__all__ = ["split_cases", "training_cases"]

logger = logging.getLogger(__name__)


def split_cases(
    records: Sequence[dict], *, val_fraction: float, seed: int, validation_cases: Sequence[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """``(train, validation)`` records. The validation split is, in this order of precedence (the log says which):

    * with ``validation_cases`` (case ids: those a training run recorded,
      :func:`~bundle.run_record.recorded_validation_cases`), these cases, in that order, whatever ``seed`` and
      ``val_fraction`` say; for the ids that the same ``seed`` and records gave, that is the seeded split itself;
    * the records of a datalist's ``validation`` list (marked ``"split": "validation"`` by
      :func:`~bundle.data.discovery.discover_cases`), sorted by case id;
    * the last ``val_fraction`` (in (0, 1), checked with the settings: :class:`~bundle.settings.TrainingSettings`;
      at least one case) of the records shuffled by ``seed``.

    The training split is the other records, in the order of that deterministic shuffle.

    Raises:
        BadInputError: when there are fewer than 2 records, a case of
            ``validation_cases`` is not among ``records`` (naming it), or a datalist lists every record for validation.
    """
    if len(records) < 2:
        raise BadInputError(
            f"Training needs at least 2 usable cases (one or more for training, one or more for validation); "
            f"found {len(records)}. Add cases below dataset_dir."
        )
    shuffled = sorted(records, key=lambda r: r["case"])
    random.Random(seed).shuffle(shuffled)
    by_case = {r["case"]: r for r in records}
    listed = sorted(r["case"] for r in records if r.get("split") == "validation")
    if validation_cases is not None:
        missing = [case for case in validation_cases if case not in by_case]
        if missing:
            raise BadInputError(
                f"Of the {len(validation_cases)} validation cases that the training run recorded (validation_cases in "
                f"the run.json beside its checkpoint), these are not among the {len(records)} usable cases below "
                f"dataset_dir: {', '.join(missing)}. Point dataset_dir at the data the run trained on, with these "
                "cases present and valid: any other validation split could hold cases the run trained on."
            )
        logger.info(
            "Validation split: the %d cases that the training run recorded in its run.json.", len(validation_cases)
        )
    elif listed:
        if len(listed) == len(records):
            raise BadInputError(
                f"The datalist lists all {len(records)} usable cases under 'validation' and none under 'training'; "
                "training needs at least one: move cases to the datalist's 'training' list."
            )
        logger.info(
            "Validation split: the %d cases of the datalist's 'validation' list (val_fraction is not used).",
            len(listed),
        )
        validation_cases = listed
    else:
        n_val = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
        logger.info(
            "Validation split: %d of the %d cases, drawn with seed %s and val_fraction %s.",
            n_val,
            len(shuffled),
            seed,
            val_fraction,
        )
        return shuffled[:-n_val], shuffled[-n_val:]
    held_out = set(validation_cases)
    return [r for r in shuffled if r["case"] not in held_out], [by_case[case] for case in validation_cases]


def training_cases(
    dataset_dir: str | Path,
    *,
    modalities: Sequence[str] = ("t1", "t2"),
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
    num_phantoms: int = 16,
    validation_cases: Sequence[str] | None = None,
    write_phantoms: bool = True,
    phantom_grid: tuple[Sequence[int], float] = PHANTOM_GRID,
) -> dict[str, list[dict]]:
    """``{"train": records, "validation": records}`` for the dataset below ``dataset_dir``: the split of
    :func:`split_cases` (the recorded ``validation_cases`` when given, else a datalist's ``validation`` list, else by
    ``seed`` and ``val_fraction``).

    When ``dataset_dir`` does not exist or is empty (hidden files and ``IDM_phantoms`` aside) and
    ``write_phantoms`` (a new training run), ``num_phantoms`` synthetic cases ``IDM_Phantom_XXX`` are written to
    ``dataset_dir/IDM_phantoms`` (once, on ``phantom_grid``: (shape, spacing in mm); later runs find them) and used;
    every run that uses them says so loudly in the log, and they are left out as soon as real data is found
    (:func:`~bundle.data.discovery.discover_cases`).
    Without ``write_phantoms`` (evaluation, a resumed run: they use the data a run trained on, and never create
    any) such a ``dataset_dir`` raises :class:`~bundle.data.discovery.DatasetNotFoundError` instead. A
    ``dataset_dir`` that holds other files but no dataset of a known layout raises it too, and nothing is written
    to it. Every case passes :func:`~bundle.data.preflight.preflight` first. Under ``torch.distributed`` rank 0
    prepares the data while the other ranks wait, then they discover what it wrote.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    leader = not is_not_rank0()
    if not leader:
        torch.distributed.barrier()
    try:
        return _prepare_cases(
            dataset_dir,
            modalities,
            val_fraction,
            seed,
            skip_invalid,
            num_phantoms,
            validation_cases,
            write_phantoms,
            phantom_grid,
        )
    finally:
        if distributed and leader:
            torch.distributed.barrier()


def _other_entries(root: Path) -> list[str]:
    """Names of what ``root`` holds besides hidden files and the phantom folder (none when it does not exist)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != PHANTOM_FOLDER)


def _prepare_cases(
    dataset_dir: str | Path,
    modalities: Sequence[str],
    val_fraction: float,
    seed: int,
    skip_invalid: bool,
    num_phantoms: int,
    validation_cases: Sequence[str] | None,
    write_phantoms: bool,
    phantom_grid: tuple[Sequence[int], float],
) -> dict[str, list[dict]]:
    """:func:`training_cases` on the leader rank (its arguments)."""
    root = Path(dataset_dir)
    try:
        records = discover_cases(root, modalities)
    except DatasetNotFoundError as error:
        others = _other_entries(root)
        if others:
            listing = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise DatasetNotFoundError(
                f"{error} It holds {listing}, so no synthetic phantoms are written there: put each case's files in "
                f"a folder named after the case (<case>/<case>_t1.nii.gz, …), list them in a datalist JSON, or set "
                f"dataset_dir to a missing or empty folder to train on the built-in phantoms."
            ) from None
        if not write_phantoms:
            raise DatasetNotFoundError(
                f"{error} Only a new training run writes the built-in synthetic phantoms (into a missing or empty "
                f"dataset_dir); evaluation and a resumed run (--resume true) never create data: pass --dataset_dir "
                f"with the folder that the training run used."
            ) from None
        unknown = [m for m in modalities if m.lower() not in BRATS_MODALITIES]
        if unknown:
            raise BadInputError(
                f"{error} The built-in phantoms that would be written instead do not provide "
                f"{', '.join(map(repr, unknown))}: choose modalities from {', '.join(BRATS_MODALITIES)}."
            ) from None
        if isinstance(num_phantoms, bool) or not isinstance(num_phantoms, int) or num_phantoms < 2:
            raise BadInputError(
                f"{error} num_phantoms, the number of built-in phantoms written instead, must be an integer ≥ 2 "
                f"(training and validation need one case each); got {num_phantoms!r}."
            ) from None
        target = root / PHANTOM_FOLDER
        shape, spacing = phantom_grid
        logger.warning(
            "No dataset below %s: writing %d synthetic phantoms (%s voxels of %g mm) to %s.",
            root,
            num_phantoms,
            "×".join(map(str, shape)),
            spacing,
            target,
        )
        # nothing usable is in target (discovery found no case), so only an interrupted earlier write is replaced
        write_brats_phantoms(
            target,
            num_cases=num_phantoms,
            shape=tuple(shape),
            spacing=spacing,
            seed=seed,
            prefix=PHANTOM_PREFIX,
            overwrite=True,
        )
        records = discover_cases(root, modalities)
    records = preflight(records, modalities, skip_invalid)
    train, validation = split_cases(records, val_fraction=val_fraction, seed=seed, validation_cases=validation_cases)
    logger.info("%d training and %d validation cases from %s", len(train), len(validation), dataset_dir)
    return {"train": train, "validation": validation}
