"""The training configuration's settings, checked before anything is built, loaded or written."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.schedulers import Scheduler

from .diffusion.engines import autocast_dtype
from .diffusion.loss import micro_batches
from .diffusion.sampling import check_noise_scheduler
from .errors import BadInputError

__all__ = ["check_output_folder", "check_training_settings"]


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_device(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise BadInputError(f"device is {str(device)!r}, but this machine has {found}; pass --device cpu or another index.")


def check_output_folder(path: str | Path, name: str) -> None:
    """Raises :class:`BadInputError` naming ``name`` unless ``path`` is a folder, or can be created as one, that
    this process may write to: not a file, not below a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{name} {str(path)!r} is a file; give a folder (it is created when missing).")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder itself, or its nearest ancestor
    if not existing.is_dir():
        raise BadInputError(f"{name} {str(path)!r} cannot be created: {str(existing)!r} is a file; give another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{name} {str(path)!r} cannot be written: no write permission in {str(existing)!r}.")


def check_training_settings(
    spatial_size: Sequence[int],
    batch_size: int,
    micro_batch_size: int | None,
    amp: bool | str,
    noise_scheduler: Scheduler,
    schedule: str,
    learning_rate: float,
    ema_decay: float,
    lambda_rec: float,
    lambda_l2: float,
    val_interval: int,
    drift_interval: int,
    val_timestep_fractions: Sequence[float],
    preview_interval: int,
    device: torch.device | str,
    ckpt_dir: str | Path,
    output_dir: str | Path,
) -> None:
    """Checks the user settings of ``configs/train.json`` (same names) before training builds anything:
    the batch split (:func:`~bundle.diffusion.micro_batches`), ``amp``
    (:func:`~bundle.diffusion.autocast_dtype`), the noise scheduler against the samplers'
    (:func:`~bundle.diffusion.check_noise_scheduler`), the numbers' ranges, the device and the output folders.

    Raises:
        BadInputError: naming the first setting out of range and what it accepts.
    """
    if (isinstance(spatial_size, (str, bytes)) or not isinstance(spatial_size, Sequence) or len(spatial_size) != 3
            or not all(_positive_int(s) for s in spatial_size)):
        raise BadInputError(f"spatial_size must be three positive integers such as [64,64,64]; got {spatial_size!r}.")
    micro_batches(batch_size, micro_batch_size)
    autocast_dtype(amp)
    check_noise_scheduler(noise_scheduler, schedule)
    if not _number(learning_rate) or learning_rate <= 0:
        raise BadInputError(f"learning_rate must be a positive number such as 2e-4; got {learning_rate!r}.")
    if not _number(ema_decay) or not 0 <= ema_decay < 1:
        raise BadInputError(f"ema_decay must be in [0, 1) (0 turns EMA off; the default is 0.999); got {ema_decay!r}.")
    for name, value in (("lambda_rec", lambda_rec), ("lambda_l2", lambda_l2)):
        if not _number(value) or value < 0:
            raise BadInputError(f"{name} must be a number ≥ 0 (0 drops its term of Eq. 8); got {value!r}.")
    for name, value in (("val_interval", val_interval), ("drift_interval", drift_interval),
                        ("preview_interval", preview_interval)):
        if not _positive_int(value):
            raise BadInputError(f"{name} must be a positive integer (every n-th epoch, step or validation); got {value!r}.")
    if (isinstance(val_timestep_fractions, (str, bytes)) or not isinstance(val_timestep_fractions, Sequence)
            or not val_timestep_fractions or not all(_number(f) and 0 <= f < 1 for f in val_timestep_fractions)):
        raise BadInputError(
            f"val_timestep_fractions must be a list of fractions of T in [0, 1) such as [0.05,0.25,0.5]; "
            f"got {val_timestep_fractions!r}."
        )
    _check_device(device)
    check_output_folder(ckpt_dir, "ckpt_dir")
    check_output_folder(output_dir, "output_dir")
