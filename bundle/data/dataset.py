"""Training data: discovery, the built-in phantom default, preflight and the train/validation split."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from .discovery import DatasetNotFoundError, discover_cases
from .phantoms import write_brats_phantoms
from .preflight import preflight

__all__ = ["PHANTOM_FOLDER", "split_cases", "training_cases"]

logger = logging.getLogger(__name__)
PHANTOM_FOLDER = "IDM_phantoms"


def split_cases(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle by ``seed``, then the last ``val_fraction`` (at least one case) for validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if len(records) < 2:
        raise ValueError(f"Need at least 2 cases to split into training and validation, found {len(records)}.")
    shuffled = sorted(records, key=lambda r: r["case"])
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(val_fraction * len(shuffled))))
    return shuffled[:-n_val], shuffled[-n_val:]


def training_cases(
    dataset_dir: str | Path,
    modalities: Sequence[str] = ("t1", "t2"),
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
    num_phantoms: int = 16,
) -> dict[str, list[dict]]:
    """``{"train": records, "validation": records}`` for the dataset below ``dataset_dir``.

    When ``dataset_dir`` holds no dataset, ``num_phantoms`` synthetic BraTS-layout cases are written to
    ``dataset_dir/IDM_phantoms`` (once; later runs find them) and used, with a loud warning.
    Every case passes :func:`~bundle.data.preflight.preflight` first. Under ``torch.distributed`` rank 0
    prepares the data while the other ranks wait, then they discover what it wrote.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    leader = not distributed or torch.distributed.get_rank() == 0
    if not leader:
        torch.distributed.barrier()
    try:
        return _prepare_cases(dataset_dir, modalities, val_fraction, seed, skip_invalid, num_phantoms)
    finally:
        if distributed and leader:
            torch.distributed.barrier()


def _prepare_cases(dataset_dir, modalities, val_fraction, seed, skip_invalid, num_phantoms) -> dict[str, list[dict]]:
    try:
        records = discover_cases(dataset_dir, modalities)
    except DatasetNotFoundError as error:
        target = Path(dataset_dir) / PHANTOM_FOLDER
        banner = "=" * 78
        logger.warning(
            "\n%s\nNO DATASET FOUND: %s\nTraining on %d SYNTHETIC PHANTOMS written to %s.\n"
            "Put BraTS2020 (or Decathlon Task01) below dataset_dir to train on real MRI.\n%s",
            banner, error, num_phantoms, target, banner,
        )
        write_brats_phantoms(target, num_cases=num_phantoms, seed=seed)
        records = discover_cases(dataset_dir, modalities)
    records = preflight(records, modalities, skip_invalid)
    train, validation = split_cases(records, val_fraction, seed)
    logger.info("%d training and %d validation cases from %s", len(train), len(validation), dataset_dir)
    return {"train": train, "validation": validation}
