"""The voxel geometry (affine), diffusion settings and validation cases of a training run, kept beside the checkpoint
for inference, evaluation and resuming."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..diffusion.sampling import SAMPLING_SCHEDULE, check_noise_schedule
from ..errors import BadInputError

__all__ = [
    "GEOMETRY_FILE", "default_affine", "geometry_of", "load_geometry", "recorded_validation_cases"
]

logger = logging.getLogger(__name__)

GEOMETRY_FILE = "geometry.json"


def default_affine(spatial_size: Sequence[int], spacing: float = 1.5) -> np.ndarray:
    """RAS affine with isotropic ``spacing`` mm and the origin at the volume centre."""
    affine = np.diag([spacing] * len(spatial_size) + [1.0])
    affine[: len(spatial_size), -1] = [-spacing * s / 2 for s in spatial_size]
    return affine


def geometry_of(
    image: torch.Tensor,
    modalities: Sequence[str],
    num_train_timesteps: int,
    schedule: str,
    validation_cases: Sequence[str] | None = None,
) -> dict:
    """``{"affine", "spatial_size", "modalities", "diffusion": {"num_train_timesteps", "schedule"}}`` of a training
    run: the voxel grid of a preprocessed training image (C, *S) MetaTensor and the noise scheduler's settings; with
    ``"validation_cases"`` too when ``validation_cases`` (the case ids of the run's validation split) is given, which
    evaluation and a resumed run take as their validation split (:func:`recorded_validation_cases`)."""
    affine = np.asarray(getattr(image, "affine", default_affine(image.shape[1:])), dtype=float)
    geometry = {
        "affine": affine.tolist(),
        "spatial_size": list(image.shape[1:]),
        "modalities": list(modalities),
        "diffusion": {"num_train_timesteps": int(num_train_timesteps), "schedule": schedule},
    }
    if validation_cases is not None:
        geometry["validation_cases"] = list(validation_cases)
    return geometry


def recorded_validation_cases(ckpt_path: str | Path) -> list[str] | None:
    """The case ids of the validation split that the training run of ``ckpt_path`` recorded in the ``geometry.json``
    beside it (:func:`geometry_of`).

    None, with a warning, when there is no record: a ``geometry.json`` written before the validation cases were
    recorded, or none at all (a checkpoint from elsewhere). The split is then recomputed from ``seed``,
    ``val_fraction`` and the cases found (:func:`~bundle.data.split_cases`), which is the training run's only if all
    three are.
    """
    path = Path(ckpt_path).with_name(GEOMETRY_FILE)
    recomputed = (
        "the validation split is recomputed from seed, val_fraction and the cases found, and holds training cases "
        "unless all three are the training run's"
    )
    if not path.is_file():
        logger.warning("There is no %s beside %s to say which cases its training run validated on: %s.",
                       GEOMETRY_FILE, ckpt_path, recomputed)
        return None
    cases = json.loads(path.read_text()).get("validation_cases")
    if cases is None:
        logger.warning("%s records no validation cases (written by an older version of the bundle): %s.", path, recomputed)
    return cases


def load_geometry(
    ckpt_path: str | Path, spatial_size: Sequence[int], modalities: Sequence[str], num_train_timesteps: int
) -> dict:
    """The geometry saved beside ``ckpt_path`` (``geometry.json``), checked against the configuration:
    ``spatial_size``, ``modalities``, ``num_train_timesteps`` and the noise schedule (which must be the samplers'
    :data:`~bundle.diffusion.SAMPLING_SCHEDULE`). A ``geometry.json`` written before the diffusion settings were
    recorded loads with a warning; a centred 1.5 mm RAS grid of ``spatial_size`` is returned when there is none
    (e.g. a checkpoint from elsewhere).

    Raises:
        BadInputError: naming the setting, the training value and the override to pass, for any mismatch.
    """
    path = Path(ckpt_path).with_name(GEOMETRY_FILE)
    if not path.is_file():
        return {"affine": default_affine(spatial_size).tolist(), "spatial_size": list(spatial_size),
                "modalities": list(modalities)}
    geometry = json.loads(path.read_text())
    if list(geometry["spatial_size"]) != list(spatial_size) or list(geometry["modalities"]) != list(modalities):
        raise BadInputError(
            f"{path} says the model was trained on spatial_size={geometry['spatial_size']} with modalities="
            f"{geometry['modalities']}, but the configuration asks for spatial_size={list(spatial_size)}, "
            f"modalities={list(modalities)}; pass the training values (--spatial_size, --modalities)."
        )
    diffusion = geometry.get("diffusion")
    if diffusion is None:
        logger.warning(
            "%s records no diffusion settings (written by an older version of the bundle): num_train_timesteps=%d "
            "and the %s noise schedule are not checked; they must be the training run's.",
            path, num_train_timesteps, SAMPLING_SCHEDULE,
        )
        return geometry
    if diffusion["num_train_timesteps"] != num_train_timesteps:
        raise BadInputError(
            f"{path} says the model was trained with num_train_timesteps={diffusion['num_train_timesteps']}, but this "
            f"run has {num_train_timesteps}; pass --num_train_timesteps {diffusion['num_train_timesteps']} (sampling "
            "with another diffusion length gives noise, not images)."
        )
    check_noise_schedule(diffusion["schedule"], f"The noise_scheduler#schedule that {path} records")
    return geometry
