"""The record of a training run, ``run.json`` beside its checkpoint: what the trained model is, so that it is loaded
rather than described again (as diffusers' ``from_pretrained`` reads ``config.json``). It holds the task
(generation, or translation from given modalities), the modalities, the voxel grid of its images (and, for a
registered dataset on the native grid, the dataset's own grid, on which inference writes its samples), the noise
schedule, the network's constructor arguments and the validation cases.

:func:`run_record` writes it; :class:`TrainedModel` reads it and builds the network, the noise scheduler and the
samplers from it for inference, evaluation and MONAI Label, refusing by name any setting given that disagrees with it;
a resumed run checks its settings against it and takes its validation cases."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import Scheduler
from monai.utils import instantiate
from torch import nn

from .data.transforms import ATLAS_FRAME
from .diffusion.objectives import objective_of
from .diffusion.sampling import make_sampler
from .errors import BadInputError
from .utils import unwrap

__all__ = [
    "RUN_RECORD",
    "TASKS",
    "TrainedModel",
    "check_resumed_run",
    "default_affine",
    "network_record",
    "recorded_validation_cases",
    "run_record",
]

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
TASKS = ("generation", "translation")
"""What a trained model does: generate its modalities from noise, or translate given modalities into them."""


def default_affine(spatial_size: Sequence[int], spacing: float = 1.5) -> np.ndarray:
    """RAS affine with isotropic ``spacing`` mm and the origin at the volume centre."""
    affine = np.diag([spacing] * len(spatial_size) + [1.0])
    affine[: len(spatial_size), -1] = [-spacing * s / 2 for s in spatial_size]
    return affine


def scheduler_record(scheduler: Scheduler, schedule: str) -> dict:
    """What a sampler must share with the training run's noise scheduler: the objective
    (:func:`~bundle.diffusion.objectives.objective_of`), T, the prediction type and, for ε-prediction, the schedule's
    name and ᾱ_0 … ᾱ_{T−1} (which the schedule's arguments, e.g. ``beta_start``, determine); a rectified flow has
    no schedule (None)."""
    record = {
        "class": type(scheduler).__name__,
        "objective": objective_of(scheduler),
        "num_train_timesteps": int(scheduler.num_train_timesteps),
        "schedule": None,
        "prediction_type": str(scheduler.prediction_type),
    }
    if record["objective"] == "epsilon":
        record["schedule"] = schedule
        record["alphas_cumprod"] = [float(f"{a:.9g}") for a in scheduler.alphas_cumprod.tolist()]
    return record


def _spacing_record(spacing: float | Sequence[float] | None) -> list[float] | None:
    """``spacing`` as three floats (mm per axis), None for the resized grid."""
    if spacing is None:
        return None
    values = [spacing] if np.isscalar(spacing) else list(spacing)
    return [float(v) for v in (values * 3 if len(values) == 1 else values)]


def network_record(network: nn.Module) -> dict | None:
    """``{"_target_": the network's class, **its constructor arguments}``, a MONAI bundle component that builds the
    network again, from the network's ``config`` (:class:`~bundle.networks.InvertibleDiffusionUNet`'s); None for a
    network without one (e.g. the regression baseline's MONAI ``UNet``, which its config describes)."""
    network = unwrap(network)
    config = getattr(network, "config", None)
    if config is None:
        return None
    return {"_target_": f"{type(network).__module__}.{type(network).__qualname__}", **config}


def run_record(
    *,
    case: Mapping,
    modalities: Sequence[str],
    noise_scheduler: Scheduler,
    schedule: str,
    validation_cases: Sequence[str],
    network: nn.Module,
    spacing: float | Sequence[float] | None = None,
    condition_modalities: Sequence[str] = (),
    patch_sampler=None,
) -> dict:
    """The record of a training run: its ``task`` (:data:`TASKS`: translation when it has ``condition_modalities``,
    the given ones; generation when they are empty), its ``modalities`` (the generated ones), the voxel grid
    (``affine``, ``spatial_size``) of a preprocessed training case's ``"image"`` (C, *S) MetaTensor, its ``spacing``
    (None: the resized grid), the ``noise_scheduler`` built with ``schedule`` (:func:`scheduler_record`), the
    ``network``'s constructor arguments (:func:`network_record`; a network trained on patches reads coordinates,
    which it then adds itself for whole volumes), the ``patches`` it trained on (fractions, probabilities and sizes of
    its :class:`~bundle.diffusion.PatchSampler`; None: whole volumes) and the case ids of its validation split.
    On the native grid, for a case of a registered dataset (``case["frame"]`` is
    :data:`~bundle.data.transforms.ATLAS_FRAME`: one box of one frame for every case) also ``original_grid``, the
    affine and shape of the case's files, on which inference writes its samples."""
    image = case["image"]
    affine = np.asarray(getattr(image, "affine", default_affine(image.shape[1:])), dtype=float)
    record = {
        "task": TASKS[1] if condition_modalities else TASKS[0],
        "affine": affine.tolist(),
        "spatial_size": list(image.shape[1:]),
        "spacing": _spacing_record(spacing),
        "modalities": list(modalities),
        "condition_modalities": list(condition_modalities),
        "noise_scheduler": scheduler_record(noise_scheduler, schedule),
        "network": network_record(network),
        "patches": None
        if patch_sampler is None
        else {
            "fractions": list(patch_sampler.fractions),
            "probabilities": patch_sampler.probabilities.tolist(),
            "sizes": patch_sampler.sizes,
        },
        "validation_cases": list(validation_cases),
    }
    if spacing is not None and case.get("frame") == ATLAS_FRAME:
        record["original_grid"] = {
            "affine": np.asarray(image.meta["original_affine"], dtype=float).tolist(),
            "spatial_size": [int(s) for s in image.meta["spatial_shape"]],
        }
        logger.info(
            "native grid: one box of %s voxels in the dataset's atlas frame for every case; samples are "
            "written back on its %s grid",
            record["spatial_size"],
            record["original_grid"]["spatial_size"],
        )
    elif spacing is not None:
        logger.info(
            "native grid: the cases are not in one registered frame (a datalist), so each is cropped to a box "
            "of %s voxels around its own foreground, and samples stay on the training grid",
            record["spatial_size"],
        )
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
            "the training run's.",
            RUN_RECORD,
            ckpt_path,
        )
        return None
    return record["validation_cases"]


def _flag(value: object, name: str = "") -> str:
    """``value`` of setting ``name`` as a command line takes it: ``"[64,64,64]"``, ``1.5``, ``cosine``, ``null``; a
    spacing that is the same on every axis as one number."""
    if name == "spacing" and isinstance(value, list) and len(set(value)) == 1:
        return str(value[0])
    if isinstance(value, list):
        text = json.dumps(value).replace(" ", "").replace('"', "'")
        return f'"{text}"'
    return "null" if value is None else str(value)


class TrainedModel:
    """A checkpoint and the record of its training run beside it (``run.json``, :func:`run_record`): the model is
    read, not described again. Inference, evaluation and MONAI Label build the network (:meth:`network_def`), the
    noise scheduler (:meth:`noise_scheduler`) and the samplers (:meth:`sampler`) from it, and take its task, modalities
    and grid from the attributes below; :meth:`check` refuses a setting given on the command line that disagrees.

    Raises:
        BadInputError: when there is no checkpoint at ``ckpt_path`` or no record beside it.
    """

    def __init__(self, ckpt_path: str | Path) -> None:
        self.ckpt_path = Path(ckpt_path)
        if not self.ckpt_path.is_file():
            raise BadInputError(
                f"The checkpoint {str(ckpt_path)!r} does not exist; pass --ckpt_path with the model.pt "
                "that training wrote (in its ckpt_dir)."
            )
        self.path = _record_path(ckpt_path)
        record = _read(self.path)
        if record is None:
            raise BadInputError(
                f"There is no {RUN_RECORD} beside {ckpt_path}: the record of its training run, which says what the "
                "model is (modalities, grid, noise schedule, network). configs/train.json writes it beside model.pt; "
                "copy it with the checkpoint (a model zoo bundle ships models/run.json), or pass the --ckpt_path of a "
                "model this bundle trained."
            )
        self.record = record

    def check(self, **settings: object) -> TrainedModel:
        """Raises :class:`BadInputError` unless each of ``settings`` (``objective``, ``modalities``,
        ``condition_modalities``, ``spatial_size``, ``spacing``, ``num_train_timesteps``, ``schedule``: a workflow's
        values, which are the recorded ones unless the command line gave others) equals the recorded value, naming the
        first that does not, in the order given. Returns the model."""
        for name, value in settings.items():
            recorded = getattr(self, name)
            given = _spacing_record(value) if name == "spacing" else list(value) if isinstance(value, tuple) else value
            if given != recorded:
                raise BadInputError(
                    f"{self.path} says the model was trained with {name}={_flag(recorded, name)}, but this run gives "
                    f"{name}={_flag(given, name)}; pass --{name} {_flag(recorded, name)}, or leave it out where the "
                    "workflow reads the model (inference and evaluation take the recorded value)."
                )
        return self

    @property
    def task(self) -> str:
        """``"generation"`` or ``"translation"`` (:data:`TASKS`)."""
        return self.record["task"]

    @property
    def modalities(self) -> list[str]:
        """The generated modalities, in the network's output channel order."""
        return list(self.record["modalities"])

    @property
    def condition_modalities(self) -> list[str]:
        """The given modalities (a translation model's; empty for generation), in the network's input order."""
        return list(self.record["condition_modalities"])

    @property
    def spatial_size(self) -> list[int]:
        """The training images' voxel grid size (the network's input size)."""
        return list(self.record["spatial_size"])

    @property
    def spacing(self) -> list[float] | None:
        """The native grid's spacing in mm per axis; None for the resized grid."""
        return self.record["spacing"]

    @property
    def num_train_timesteps(self) -> int:
        """T of the noise schedule."""
        return self.record["noise_scheduler"]["num_train_timesteps"]

    @property
    def objective(self) -> str:
        """What the model predicts (:data:`~bundle.diffusion.objectives.OBJECTIVES`): ε, or a rectified flow's
        velocity."""
        return self.record["noise_scheduler"]["objective"]

    @property
    def schedule(self) -> str | None:
        """The name of MONAI's noise schedule the model was trained with (None for a rectified flow)."""
        return self.record["noise_scheduler"]["schedule"]

    @property
    def validation_cases(self) -> list[str]:
        """The case ids of the training run's validation split."""
        return list(self.record["validation_cases"])

    def network_def(self) -> nn.Module:
        """A new network of the recorded constructor arguments (its weights are loaded from the checkpoint by the
        workflow).

        Raises:
            BadInputError: for a record without them (a network the bundle cannot describe, e.g. the regression
                baseline, whose config builds it).
        """
        spec = self.record.get("network")
        if spec is None:
            raise BadInputError(
                f"{self.path} does not record its network's constructor arguments (a network built outside "
                "InvertibleDiffusionUNet's own arguments, e.g. the regression baseline): run it with the config that "
                "trained it (e.g. configs/regression.json), which builds its network_def."
            )
        arguments = dict(spec)
        return instantiate(arguments.pop("_target_"), "default", **arguments)

    def noise_scheduler(self) -> Scheduler:
        """The training run's noise scheduler, which noises as it did: DDPM with the recorded schedule and T, or the
        rectified flow's (whose sampler also noises, as MONAI's ``RFlowScheduler``)."""
        return self.sampler("ddpm" if self.objective == "epsilon" else "euler")

    def reconstruction_sampler(self) -> Scheduler:
        """The deterministic first-order sampler of the model's objective, which evaluation's reconstruction runs
        from a given x_t: DDIM with η = 0, or the rectified flow's Euler steps."""
        return self.sampler("ddim" if self.objective == "epsilon" else "euler")

    def sampler(self, name: str | None = None, eta: float = 0.0) -> Scheduler:
        """The sampler ``name`` of the model's objective (:data:`~bundle.diffusion.sampling.SAMPLERS`; None: the
        objective's default, :data:`~bundle.diffusion.sampling.DEFAULT_SAMPLERS`) along the recorded noise
        schedule.

        Raises:
            BadInputError: for a name that is no sampler of the objective or an ``eta`` it does not take, and when
                the schedule's ᾱ differs from the recorded one (a training run that overrode the schedule's
                arguments).
        """
        scheduler = make_sampler(name, self.num_train_timesteps, self.schedule, eta, self.objective)
        _check_scheduler(self.record["noise_scheduler"], scheduler, self.schedule, self.path)
        return scheduler


def _check_scheduler(recorded: dict, scheduler: Scheduler, schedule: str | None, path: Path) -> None:
    """Raises :class:`BadInputError` unless ``scheduler`` (built with ``schedule``, and with the recorded T and schedule
    name, which :meth:`TrainedModel.check` compares, and of the recorded objective) noises as the recorded one did:
    its prediction type and ᾱ."""
    if recorded["objective"] != "epsilon":
        return  # a rectified flow: its straight path has no schedule to compare
    if scheduler.prediction_type != recorded["prediction_type"]:
        raise BadInputError(
            f"{path} says the model predicts {recorded['prediction_type']!r}, but the scheduler's prediction_type is "
            f"{scheduler.prediction_type!r}: the bundle trains and samples ε-prediction models (drop any "
            "prediction_type override)."
        )
    expected = torch.tensor(recorded["alphas_cumprod"], dtype=torch.float64)
    found = scheduler.alphas_cumprod.to(torch.float64)
    if not torch.allclose(found, expected, rtol=1e-5, atol=1e-7):
        t = int((found - expected).abs().argmax())
        raise BadInputError(
            f"The noise schedule differs from the one {path} records (ᾱ at t={t}: {found[t]:.6f} vs "
            f"{expected[t]:.6f}), although both are {schedule!r}: its training run overrode the schedule's arguments "
            "(e.g. --noise_scheduler#beta_start). A resumed run must pass the same; inference and evaluation build the "
            "named schedule with its own arguments, so train such a model without overrides (or choose another "
            "--schedule)."
        )


def check_resumed_run(
    ckpt_path: str | Path,
    *,
    spatial_size: Sequence[int],
    modalities: Sequence[str],
    condition_modalities: Sequence[str],
    spacing: float | Sequence[float] | None,
    noise_scheduler: Scheduler,
    schedule: str,
) -> None:
    """Checks a resumed run's settings against the record of the run it continues (:meth:`TrainedModel.check`): its
    objective first (that of ``noise_scheduler``), then the rest, and that ``noise_scheduler`` (built with
    ``schedule``, which a rectified flow ignores) noises as the recorded one did.

    Raises:
        BadInputError: naming the setting, the recorded value and the flag to pass.
    """
    objective = objective_of(noise_scheduler)
    model = TrainedModel(ckpt_path).check(
        objective=objective,
        modalities=modalities,
        condition_modalities=condition_modalities,
        spatial_size=spatial_size,
        spacing=spacing,
        num_train_timesteps=noise_scheduler.num_train_timesteps,
        schedule=schedule if objective == "epsilon" else None,
    )
    _check_scheduler(model.record["noise_scheduler"], noise_scheduler, schedule, model.path)
