"""The record of a training run, ``run.json`` beside its checkpoint: the voxel grid and modalities of its images (and,
for a registered dataset on the native grid, the dataset's own grid, on which inference writes its samples), its
noise schedule and its validation cases. Inference and evaluation check their settings against it, and evaluation and
a resumed run take its validation cases."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import Scheduler

from .data.transforms import ATLAS_FRAME
from .errors import BadInputError

__all__ = ["RUN_RECORD", "default_affine", "load_run_record", "recorded_validation_cases", "run_record"]

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"


def default_affine(spatial_size: Sequence[int], spacing: float = 1.5) -> np.ndarray:
    """RAS affine with isotropic ``spacing`` mm and the origin at the volume centre."""
    affine = np.diag([spacing] * len(spatial_size) + [1.0])
    affine[: len(spatial_size), -1] = [-spacing * s / 2 for s in spatial_size]
    return affine


def scheduler_record(scheduler: Scheduler, schedule: str) -> dict:
    """What a sampler must share with the training run's noise scheduler: T, the schedule's name, the prediction
    type and ᾱ_0 … ᾱ_{T−1} (which the schedule's arguments, e.g. ``beta_start``, determine)."""
    return {
        "class": type(scheduler).__name__,
        "num_train_timesteps": int(scheduler.num_train_timesteps),
        "schedule": schedule,
        "prediction_type": scheduler.prediction_type,
        "alphas_cumprod": [float(f"{a:.9g}") for a in scheduler.alphas_cumprod.tolist()],
    }


def _spacing_record(spacing: float | Sequence[float] | None) -> list[float] | None:
    """``spacing`` as three floats (mm per axis), None for the resized grid."""
    if spacing is None:
        return None
    values = [spacing] if np.isscalar(spacing) else list(spacing)
    return [float(v) for v in (values * 3 if len(values) == 1 else values)]


def run_record(
    *,
    case: Mapping,
    modalities: Sequence[str],
    noise_scheduler: Scheduler,
    schedule: str,
    validation_cases: Sequence[str],
    spacing: float | Sequence[float] | None = None,
    condition_modalities: Sequence[str] = (),
) -> dict:
    """The record of a training run: the voxel grid (``affine``, ``spatial_size``) of a preprocessed training case's
    ``"image"`` (C, *S) MetaTensor, its ``spacing`` (None: the resized grid), its ``modalities`` (the generated ones)
    and ``condition_modalities`` (the given ones of a conditioned model; empty: unconditional), the
    ``noise_scheduler`` built with ``schedule`` (:func:`scheduler_record`) and the case ids of its validation split.
    On the native grid, for a case of a registered dataset (``case["frame"]`` is
    :data:`~bundle.data.transforms.ATLAS_FRAME`: one box of one frame for every case) also ``original_grid``, the
    affine and shape of the case's files, on which inference writes its samples."""
    image = case["image"]
    affine = np.asarray(getattr(image, "affine", default_affine(image.shape[1:])), dtype=float)
    record = {
        "affine": affine.tolist(),
        "spatial_size": list(image.shape[1:]),
        "spacing": _spacing_record(spacing),
        "modalities": list(modalities),
        "condition_modalities": list(condition_modalities),
        "noise_scheduler": scheduler_record(noise_scheduler, schedule),
        "validation_cases": list(validation_cases),
    }
    if spacing is not None and case.get("frame") == ATLAS_FRAME:
        record["original_grid"] = {
            "affine": np.asarray(image.meta["original_affine"], dtype=float).tolist(),
            "spatial_size": [int(s) for s in image.meta["spatial_shape"]],
        }
        logger.info("native grid: one box of %s voxels in the dataset's atlas frame for every case; samples are "
                    "written back on its %s grid", record["spatial_size"], record["original_grid"]["spatial_size"])
    elif spacing is not None:
        logger.info("native grid: the cases are not in one registered frame (a datalist), so each is cropped to a box "
                    "of %s voxels around its own foreground, and samples stay on the training grid",
                    record["spatial_size"])
    return record


def _record_path(ckpt_path: str | Path) -> Path:
    """The run record beside the checkpoint ``ckpt_path``."""
    return Path(ckpt_path).with_name(RUN_RECORD)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_validation_cases(ckpt_path: str | Path) -> list[str] | None:
    """The case ids of the validation split that the training run of ``ckpt_path`` recorded beside it; None, with a
    warning, when there is no record (a checkpoint from elsewhere): the split is then recomputed from ``seed``,
    ``val_fraction`` and the cases found (:func:`~bundle.data.split_cases`), which is the training run's only if all
    three are."""
    record = _read(_record_path(ckpt_path))
    if record is None:
        logger.warning(
            "There is no %s beside %s to say which cases its training run validated on: the validation split is "
            "recomputed from seed, val_fraction and the cases found, and holds training cases unless all three are "
            "the training run's.", RUN_RECORD, ckpt_path,
        )
        return None
    return record["validation_cases"]


def _check_scheduler(recorded: dict, scheduler: Scheduler, schedule: str, path: Path) -> None:
    """Raises :class:`BadInputError` unless ``scheduler`` (built with ``schedule``) noises as the recorded one did."""
    if scheduler.num_train_timesteps != recorded["num_train_timesteps"]:
        raise BadInputError(
            f"{path} says the model was trained with num_train_timesteps={recorded['num_train_timesteps']}, but this "
            f"run has {scheduler.num_train_timesteps}; pass --num_train_timesteps {recorded['num_train_timesteps']} "
            "(sampling with another diffusion length gives noise, not images)."
        )
    if schedule != recorded["schedule"]:
        raise BadInputError(
            f"{path} says the model was trained with the {recorded['schedule']!r} noise schedule, but this run has "
            f"{schedule!r}; pass --schedule {recorded['schedule']}."
        )
    if scheduler.prediction_type != recorded["prediction_type"]:
        raise BadInputError(
            f"{path} says the model predicts {recorded['prediction_type']!r}, but the sampler's prediction_type is "
            f"{scheduler.prediction_type!r}; drop the sampler's prediction_type override."
        )
    expected = torch.tensor(recorded["alphas_cumprod"], dtype=torch.float64)
    found = scheduler.alphas_cumprod.to(torch.float64)
    if not torch.allclose(found, expected, rtol=1e-5, atol=1e-7):
        t = int((found - expected).abs().argmax())
        raise BadInputError(
            f"The sampler's noise schedule differs from the one {path} records (ᾱ at t={t}: {found[t]:.6f} vs "
            f"{expected[t]:.6f}), although both are {schedule!r}: pass the schedule arguments the training run "
            "overrode (e.g. --noise_scheduler#beta_start in training) to the sampler as well."
        )


def load_run_record(
    ckpt_path: str | Path,
    *,
    spatial_size: Sequence[int],
    modalities: Sequence[str],
    noise_scheduler: Scheduler | None = None,
    schedule: str | None = None,
    spacing: float | Sequence[float] | None | str = "recorded",
    condition_modalities: Sequence[str] = (),
) -> dict:
    """The record beside ``ckpt_path``, checked against this run's ``spatial_size``, ``modalities``,
    ``condition_modalities`` (a record without them is of an unconditional model), ``spacing``
    (unless ``"recorded"``: a run that reads no images takes the record's) and (when given) the ``noise_scheduler``
    built with ``schedule`` that will sample or evaluate. Without a record (a checkpoint from
    elsewhere) a centred 1.5 mm RAS grid of ``spatial_size`` is returned, with a warning that nothing was checked.

    Raises:
        BadInputError: naming the setting, the training run's value and the override to pass, for any mismatch.
    """
    path = _record_path(ckpt_path)
    record = _read(path)
    if record is None:
        logger.warning("There is no %s beside %s: its voxel grid, modalities and noise schedule are not checked; "
                       "they must be those of the training run.", RUN_RECORD, ckpt_path)
        return {"affine": default_affine(spatial_size).tolist(), "spatial_size": list(spatial_size),
                "modalities": list(modalities), "condition_modalities": list(condition_modalities)}
    if list(record["spatial_size"]) != list(spatial_size) or list(record["modalities"]) != list(modalities):
        raise BadInputError(
            f"{path} says the model was trained on spatial_size={record['spatial_size']} with modalities="
            f"{record['modalities']}, but the configuration asks for spatial_size={list(spatial_size)}, "
            f"modalities={list(modalities)}; pass the training values (--spatial_size, --modalities)."
        )
    given = list(record.get("condition_modalities", []))
    if given != list(condition_modalities):
        trained = f"generate {record['modalities']} from {given}" if given else "generate unconditionally"
        value = json.dumps(given).replace(" ", "").replace('"', "'")
        raise BadInputError(
            f"{path} says the model was trained to {trained}, but the configuration gives condition_modalities="
            f"{list(condition_modalities)}; pass --condition_modalities \"{value}\" (a model reads only the "
            "modalities it was trained on), or train a model for this condition."
        )
    if spacing != "recorded" and record.get("spacing") != _spacing_record(spacing):
        recorded = record.get("spacing")
        trained = f"a {recorded} mm native grid" if recorded else "the resized grid (spacing null)"
        value = ("null" if recorded is None else str(recorded[0]) if len(set(recorded)) == 1
                 else f"'{json.dumps(recorded).replace(' ', '')}'")
        raise BadInputError(f"{path} says the model was trained on {trained}, but the configuration asks for "
                            f"spacing={spacing!r}; pass --spacing {value}.")
    if noise_scheduler is not None:
        _check_scheduler(record["noise_scheduler"], noise_scheduler, schedule, path)
    return record
