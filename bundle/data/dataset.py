"""Training data: discovery, the built-in anatomical phantoms, preflight and the train/validation split."""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError
from ..utils import is_not_rank0
from .anatomy import BRATS_MODALITIES, PHANTOM_FOLDER, anatomy_spacing, write_anatomy_cases
from .discovery import DatasetNotFoundError, discover_cases
from .preflight import preflight

__all__ = ["PHANTOM_MANIFEST", "split_cases", "training_cases"]

logger = logging.getLogger(__name__)

PHANTOM_MANIFEST = "phantoms.json"  # written last into the built-in set's folder: what it holds, and that it is whole


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
    spatial_size: Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] | None = None,
) -> dict[str, list[dict]]:
    """``{"train": records, "validation": records}`` for the dataset below ``dataset_dir``: the split of
    :func:`split_cases` (the recorded ``validation_cases`` when given, else a datalist's ``validation`` list, else by
    ``seed`` and ``val_fraction``).

    When ``dataset_dir`` does not exist or holds nothing but the built-in set (hidden files aside) and
    ``write_phantoms`` (a new training run), the built-in set is used: ``num_phantoms`` anatomical phantoms
    ``IDM_Phantom_XXX`` (:func:`~bundle.data.anatomy.write_anatomy_cases`, one fixed data set: case i of seed i) in
    ``dataset_dir/IDM_phantoms``, on BraTS's frame at the run's ``spacing`` (a native-grid run) or, for a run that
    resizes to ``spatial_size``, at :func:`~bundle.data.anatomy.anatomy_spacing`; between BraTS's 1 mm and 12 mm. It is
    written unless that folder's manifest (:data:`PHANTOM_MANIFEST`, written last) says it holds these cases already:
    a set that a killed run left part-written, or one of another number or grid, is replaced whole. Every run that
    uses them says so loudly in the log, and they are left out as soon as real data is found
    (:func:`~bundle.data.discovery.discover_cases`).
    Without ``write_phantoms`` (evaluation, a resumed run: they use the data a run trained on, and never create
    any) a ``dataset_dir`` without data raises :class:`~bundle.data.discovery.DatasetNotFoundError` instead. A
    ``dataset_dir`` that holds other files but no dataset of a known layout raises it too, and nothing is written
    to it. Every case passes :func:`~bundle.data.preflight.preflight` first. Under ``torch.distributed`` rank 0
    prepares the data while the other ranks wait, then they discover what it wrote.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    leader = not is_not_rank0()
    if not leader:
        torch.distributed.barrier()
    try:
        root = Path(dataset_dir)
        if leader and write_phantoms and not (root.exists() and not root.is_dir()) and not _other_entries(root):
            _write_phantoms(root, modalities, num_phantoms, _phantom_spacing(spatial_size, spacing))
        return _prepare_cases(root, modalities, val_fraction, seed, skip_invalid, validation_cases, write_phantoms)
    finally:
        if distributed and leader:
            torch.distributed.barrier()


def _other_entries(root: Path) -> list[str]:
    """Names of what ``root`` holds besides hidden files and the phantom folder (none when it does not exist)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != PHANTOM_FOLDER)


def _phantom_spacing(spatial_size: Sequence[int], spacing: float | Sequence[float] | None) -> list[float]:
    """The built-in set's voxel size per axis for a run of ``spacing`` (None: resized to ``spatial_size``)."""
    voxel = anatomy_spacing(spatial_size) if spacing is None else spacing
    return [min(max(float(s), 1.0), 12.0) for s in np.broadcast_to(np.asarray(voxel, dtype=float), (3,))]


def _write_phantoms(root: Path, modalities: Sequence[str], num_phantoms: int, spacing: list[float]) -> None:
    """Writes the built-in set into ``root/IDM_phantoms`` unless its manifest says it holds it (see
    :func:`training_cases`), replacing whatever is there.

    Raises:
        BadInputError: for ``modalities`` the phantoms lack or a ``num_phantoms`` below 2, before anything is written.
    """
    folder = root / PHANTOM_FOLDER
    manifest = folder / PHANTOM_MANIFEST
    wanted = {"cases": num_phantoms, "spacing": spacing, "generator": "bundle.data.anatomy"}
    found = json.loads(manifest.read_text()) if manifest.is_file() else None
    if found == wanted:
        return
    unknown = [m for m in modalities if m.lower() not in BRATS_MODALITIES]
    if unknown:
        raise BadInputError(
            f"No dataset below {str(root)!r}, and the built-in phantoms that would be written there do not provide "
            f"{', '.join(map(repr, unknown))}: choose modalities from {', '.join(BRATS_MODALITIES)}, or give "
            "--dataset_dir with data that has them."
        )
    if isinstance(num_phantoms, bool) or not isinstance(num_phantoms, int) or num_phantoms < 2:
        raise BadInputError(
            f"No dataset below {str(root)!r}: num_phantoms, the number of built-in phantoms written there instead, "
            f"must be an integer ≥ 2 (training and validation need one case each); got {num_phantoms!r}."
        )
    if folder.exists():
        replaced = "left part-written" if found is None else f"of {found.get('cases')} cases at {found.get('spacing')}"
        logger.warning("Replacing the built-in phantoms in %s (%s mm): a set %s.", folder, spacing, replaced)
        shutil.rmtree(folder)
    logger.warning(
        "No dataset below %s: writing %d synthetic brains (BraTS-like cases made from the MNI ICBM152 template, "
        "%s mm voxels) to %s.",
        root,
        num_phantoms,
        "×".join(f"{s:g}" for s in spacing),
        folder,
    )
    write_anatomy_cases(folder, num_phantoms, spacing, progress=sys.stderr.isatty())
    manifest.write_text(json.dumps(wanted))


def _prepare_cases(
    root: Path,
    modalities: Sequence[str],
    val_fraction: float,
    seed: int,
    skip_invalid: bool,
    validation_cases: Sequence[str] | None,
    write_phantoms: bool,
) -> dict[str, list[dict]]:
    """:func:`training_cases` after the built-in set is written where it is used (its arguments)."""
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
        raise
    records = preflight(records, modalities, skip_invalid)
    train, validation = split_cases(records, val_fraction=val_fraction, seed=seed, validation_cases=validation_cases)
    logger.info("%d training and %d validation cases from %s", len(train), len(validation), root)
    return {"train": train, "validation": validation}
