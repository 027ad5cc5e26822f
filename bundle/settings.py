"""The user settings of each workflow, parsed and checked once, before anything is read, built or written.

Each config builds one settings object from its top-level settings (same names) as the first step of ``initialize``;
the components then read the parsed values from it (``$@settings.resume``). A setting out of range raises
:class:`~bundle.errors.BadInputError` naming it and what it accepts, which the configs' error hook reports as one
paragraph (exit code 1).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.schedulers import Scheduler

from .checkpoint import check_checkpoint_folder
from .data.transforms import check_spacing
from .diffusion.engines import autocast_dtype
from .diffusion.loss import micro_batches
from .diffusion.objectives import objective_of
from .diffusion.patches import PatchSampler
from .diffusion.update_in_backward import check_whole_batch
from .errors import BadInputError
from .flags import as_flag, as_flags, as_memory_budget
from .memory_plan import check_micro_batch_size
from .outputs import refuse_earlier_outputs
from .utils import check_output_folder

__all__ = [
    "AuditSettings",
    "EvaluationSettings",
    "InferenceSettings",
    "InversionSettings",
    "TrainingSettings",
    "check_modalities",
]

GENERATION_REFERENCES = ("validation", "training")  # the splits evaluation compares generated samples with


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return _integer(value) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_spatial_size(spatial_size: Sequence[int]) -> None:
    if (
        isinstance(spatial_size, (str, bytes))
        or not isinstance(spatial_size, Sequence)
        or len(spatial_size) != 3
        or not all(_positive_int(s) for s in spatial_size)
    ):
        raise BadInputError(f"spatial_size must be three positive integers such as [64,64,64]; got {spatial_size!r}.")


def _names(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(v, str) and v for v in value)
    )


def check_modalities(modalities: Sequence[str], condition_modalities: Sequence[str] = ()) -> None:
    """Raises :class:`BadInputError` unless ``modalities`` (generated) is a non-empty list of names and
    ``condition_modalities`` (given) a list of other names."""
    if not _names(modalities) or not modalities or len(set(modalities)) != len(modalities):
        raise BadInputError(
            f"modalities must be a list of distinct names such as ['t1','t2'] (the generated "
            f"sequences); got {modalities!r}."
        )
    if not _names(condition_modalities) or len(set(condition_modalities)) != len(condition_modalities):
        raise BadInputError(
            f"condition_modalities must be a list of distinct names such as ['t1'] (the given "
            f"sequences; [] for unconditional generation); got {condition_modalities!r}."
        )
    both = [m for m in condition_modalities if m in modalities]
    if both:
        raise BadInputError(
            f"{', '.join(map(repr, both))} is in both modalities {list(modalities)} (generated) and "
            f"condition_modalities {list(condition_modalities)} (given): a model generates only what it is not "
            f"given, e.g. --condition_modalities \"['t1']\" --modalities \"['t2']\"."
        )


def _check_val_fraction(val_fraction: float) -> None:
    if not _number(val_fraction) or not 0 < val_fraction < 1:
        raise BadInputError(
            f"val_fraction must be a number in (0, 1), the share of cases held out for validation (e.g. 0.2); "
            f"got {val_fraction!r}."
        )


def _check_val_timestep_fractions(fractions: Sequence[float]) -> None:
    if (
        isinstance(fractions, (str, bytes))
        or not isinstance(fractions, Sequence)
        or not fractions
        or not all(_number(f) and 0 <= f < 1 for f in fractions)
    ):
        raise BadInputError(
            f"val_timestep_fractions must be a list of fractions of T in [0, 1) such as [0.05,0.25,0.5]; "
            f"got {fractions!r}."
        )


def _timesteps(fractions: Sequence[float], num_train_timesteps: int) -> list[int]:
    """Fractions of T as timesteps: ``int(f T)``."""
    return [int(f * num_train_timesteps) for f in fractions]


def _check_device(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise BadInputError(
            f"device is {str(device)!r}, but this machine has {found}; pass --device cpu or another index."
        )


def _check_outputs(output_dir: str | Path, outputs: Sequence[Path], overwrite: bool) -> None:
    """Raises :class:`BadInputError` for an ``output_dir`` that cannot be a folder to write in, or one that holds any of
    the workflow's ``outputs`` from an earlier run while ``overwrite`` is false."""
    check_output_folder(output_dir, "output_dir")
    if not overwrite:
        refuse_earlier_outputs([path for path in outputs if path.exists()], output_dir)


def _check_intervals(val_interval: int, drift_interval: int, preview_interval: int) -> None:
    for name, value in (("val_interval", val_interval), ("drift_interval", drift_interval)):
        if not _positive_int(value):
            raise BadInputError(f"{name} must be a positive integer (every n-th epoch or step); got {value!r}.")
    if not (_integer(preview_interval) and preview_interval >= 0):
        raise BadInputError(
            f"preview_interval must be an integer ≥ 0 (every n-th validation; 0 turns previews off); "
            f"got {preview_interval!r}."
        )


@dataclass(kw_only=True)
class TrainingSettings:
    """The settings of ``configs/train.json`` (same names; see the README's table), which every component of the
    config reads from it (``$@settings.batch_size``), checked in this order: the true/false flags
    (:func:`~bundle.flags.as_flag`: a command line gives ``"false"``), the image grid, the batch split
    (:func:`~bundle.diffusion.micro_batches`; a whole batch with ``optimizer_in_backward``), ``memory_budget``
    (:func:`~bundle.flags.as_memory_budget`), ``amp``, the noise scheduler (ε-prediction for the ε objective), the
    numbers' ranges, the patches (:class:`~bundle.diffusion.PatchSampler`). After the check, ``resume``,
    ``overwrite``, ``skip_invalid``, ``amp``, ``optimizer_in_backward``, ``memory_efficient``, ``recompute_norms`` and
    ``patch_training`` are bools and ``attention_levels`` a tuple of bools. What the machine and the folders hold is
    checked apart, by :meth:`check_device_and_folders` (a training run's ``initialize``; the memory planner plans for a
    device it does not have and never writes).

    Raises:
        BadInputError: naming the first setting out of range and what it accepts.
    """

    spatial_size: Sequence[int]
    spacing: float | Sequence[float] | None
    modalities: Sequence[str]
    condition_modalities: Sequence[str] = ()
    val_fraction: float
    skip_invalid: bool | str
    batch_size: int
    micro_batch_size: int | str | None
    amp: bool | str
    optimizer_in_backward: bool | str = False
    memory_budget: float | str = 0
    noise_scheduler: Scheduler
    schedule: str
    learning_rate: float
    ema_decay: float
    lambda_rec: float
    lambda_l2: float
    attention_levels: Sequence[bool | str]
    memory_efficient: bool | str = True
    recompute_norms: bool | str = False
    val_interval: int
    drift_interval: int
    preview_interval: int
    val_timestep_fractions: Sequence[float]
    generation_interval: int = 0
    patch_training: bool | str = False
    patch_fractions: Sequence[float] = (0.25, 0.5, 1.0)
    patch_probabilities: Sequence[float] = (0.2, 0.3, 0.5)
    device: torch.device | str
    ckpt_dir: str | Path
    output_dir: str | Path
    resume: bool | str
    overwrite: bool | str

    def __post_init__(self) -> None:
        for name in (
            "resume",
            "overwrite",
            "skip_invalid",
            "amp",
            "optimizer_in_backward",
            "memory_efficient",
            "recompute_norms",
            "patch_training",
        ):
            setattr(self, name, as_flag(getattr(self, name), name))
        self.attention_levels = as_flags(self.attention_levels, "attention_levels")
        self.memory_budget = as_memory_budget(self.memory_budget)
        _check_spatial_size(self.spatial_size)
        check_spacing(self.spacing)
        check_modalities(self.modalities, self.condition_modalities)
        if self.condition_modalities and self.generation_interval:
            raise BadInputError(
                f"generation_interval is {self.generation_interval}, but the generation monitor compares unconditional "
                f"samples with the data, and this model generates {list(self.modalities)} from "
                f"{list(self.condition_modalities)}: pass --generation_interval 0 (its validation's PSNR and SSIM "
                "measure the translation; configs/evaluate.json measures whole chains against the real volumes)."
            )
        _check_val_fraction(self.val_fraction)
        check_micro_batch_size(self.micro_batch_size)
        micro_batches(self.batch_size, None if self.micro_batch_size == "auto" else self.micro_batch_size)
        if self.optimizer_in_backward:
            check_whole_batch(self.batch_size, self.micro_batch_size)
        autocast_dtype(self.amp)
        if objective_of(self.noise_scheduler) == "epsilon" and self.noise_scheduler.prediction_type != "epsilon":
            raise BadInputError(
                f"noise_scheduler#prediction_type is {self.noise_scheduler.prediction_type!r}, but the epsilon "
                "objective's loss (Eq. 8) and samplers predict the noise ε; drop the override (or set it to 'epsilon')."
            )
        if not _number(self.learning_rate) or self.learning_rate <= 0:
            raise BadInputError(f"learning_rate must be a positive number such as 2e-4; got {self.learning_rate!r}.")
        if not _number(self.ema_decay) or not 0 <= self.ema_decay < 1:
            raise BadInputError(
                f"ema_decay must be in [0, 1) (0 turns EMA off; the default is 0.999); got {self.ema_decay!r}."
            )
        for name in ("lambda_rec", "lambda_l2"):
            value = getattr(self, name)
            if not _number(value) or value < 0:
                raise BadInputError(f"{name} must be a number ≥ 0 (0 drops its term of Eq. 8); got {value!r}.")
        _check_intervals(self.val_interval, self.drift_interval, self.preview_interval)
        _check_val_timestep_fractions(self.val_timestep_fractions)
        if self.patch_training:
            PatchSampler(self.spatial_size, self.patch_fractions, self.patch_probabilities)

    def check_device_and_folders(self) -> None:
        """Raises :class:`BadInputError` for a device this machine does not have, output folders that cannot be
        created, and a checkpoint folder that disagrees with ``resume`` and ``overwrite``
        (:func:`~bundle.checkpoint.check_checkpoint_folder`): an earlier run's checkpoint without either, or a run to
        resume that was trained with other settings."""
        _check_device(self.device)
        check_output_folder(self.ckpt_dir, "ckpt_dir")
        check_output_folder(self.output_dir, "output_dir")
        check_checkpoint_folder(
            self.ckpt_dir,
            resume=self.resume,
            overwrite=self.overwrite,
            spatial_size=self.spatial_size,
            modalities=self.modalities,
            noise_scheduler=self.noise_scheduler,
            schedule=self.schedule,
            spacing=self.spacing,
            condition_modalities=self.condition_modalities,
        )

    @property
    def validation_timesteps(self) -> list[int]:
        """``val_timestep_fractions`` as timesteps of the noise scheduler's T."""
        return _timesteps(self.val_timestep_fractions, self.noise_scheduler.num_train_timesteps)


@dataclass(kw_only=True)
class InferenceSettings:
    """The settings of ``configs/inference.json`` that need neither network nor checkpoint: the flags (``overwrite``,
    ``skip_invalid``: bools after the check), the number of samples and the batch size (a generation model's), the
    device, and the output folder. A translation model's studies (``input_files``, else those below ``dataset_dir``)
    and each workflow's earlier outputs are checked by the workflow (:func:`~bundle.inference.inference_workflow`).

    Raises:
        BadInputError: naming the setting and what it accepts.
    """

    output_dir: str | Path
    num_samples: int
    batch_size: int
    device: torch.device | str
    overwrite: bool | str
    dataset_dir: str | Path | None = None
    input_files: Mapping[str, str] | None = None
    skip_invalid: bool | str = False

    def __post_init__(self) -> None:
        for name in ("overwrite", "skip_invalid"):
            setattr(self, name, as_flag(getattr(self, name), name))
        for name in ("num_samples", "batch_size"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise BadInputError(f"{name} must be a positive integer; got {value!r}.")
        _check_device(self.device)
        check_output_folder(self.output_dir, "output_dir")


@dataclass(kw_only=True)
class EvaluationSettings:
    """The settings of ``configs/evaluate.json`` (``evaluation_settings``) on top of ``train.json``'s (its
    :class:`TrainingSettings`, which holds the data settings and the model's, e.g. the one-step metrics' timesteps),
    checked before any work: the flags, the output folder and its earlier metrics, the reconstruction timestep, the
    batch and sample counts and the feature extractor. After the check, ``overwrite`` is a bool.

    Raises:
        BadInputError: when ``output_dir`` is a file or cannot be created (naming what is in the way), holds an
            earlier evaluation's metrics and ``overwrite`` is false, ``reconstruction_fraction`` is outside [0, 1),
            a count is not a positive integer, ``feature_extractor`` names no file, or ``generation_reference`` is
            not a split name.
    """

    output_dir: str | Path
    evaluate_batch_size: int
    reconstruction_fraction: float
    reconstruction_steps: int = 50
    num_train_timesteps: int
    num_generated: int
    feature_extractor: str | None
    device: torch.device | str
    overwrite: bool | str
    generation_reference: str = "validation"

    def __post_init__(self) -> None:
        self.overwrite = as_flag(self.overwrite, "overwrite")
        if self.generation_reference not in GENERATION_REFERENCES:
            raise BadInputError(
                f"generation_reference must be one of {list(GENERATION_REFERENCES)} (the split the "
                f"samples are compared with); got {self.generation_reference!r}."
            )
        _check_outputs(self.output_dir, self.outputs, self.overwrite)
        if not _number(self.reconstruction_fraction) or not 0 <= self.reconstruction_fraction < 1:
            raise BadInputError(
                f"reconstruction_fraction must be a fraction of T in [0, 1) such as 0.25; "
                f"got {self.reconstruction_fraction!r}."
            )
        for name in ("evaluate_batch_size", "num_generated", "reconstruction_steps"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise BadInputError(f"{name} must be a positive integer; got {value!r}.")
        if self.feature_extractor is not None and not Path(self.feature_extractor).is_file():
            raise BadInputError(
                f"feature_extractor {self.feature_extractor!r} does not exist; give a TorchScript file or null."
            )
        _check_device(self.device)

    @property
    def outputs(self) -> list[Path]:
        """The files evaluation writes: ``output_dir/metrics.json`` and ``output_dir/metrics.md``."""
        return [Path(self.output_dir) / "metrics.json", Path(self.output_dir) / "metrics.md"]

    @property
    def reconstruction_timestep(self) -> int:
        """The timestep the reconstruction metric noises to: ``reconstruction_fraction`` of T."""
        return _timesteps([self.reconstruction_fraction], self.num_train_timesteps)[0]


@dataclass(kw_only=True)
class AuditSettings:
    """The settings of ``configs/audit.json`` (``audit_settings``), checked before any work: ``samples_dir`` is a
    folder, ``output_dir`` can be written and holds no earlier audit unless ``overwrite``, ``max_shift`` is a whole
    number of voxels ≥ 0. After the check, ``overwrite`` is a bool.

    Raises:
        BadInputError: naming the setting and what it accepts.
    """

    samples_dir: str | Path
    output_dir: str | Path
    overwrite: bool | str
    max_shift: int = 1

    def __post_init__(self) -> None:
        from .auditing import AUDIT_FILES  # (auditing reads the run record, which imports this module's users)

        self.overwrite = as_flag(self.overwrite, "overwrite")
        if not Path(self.samples_dir).is_dir():
            raise BadInputError(
                f"samples_dir {str(self.samples_dir)!r} is not a folder: give the output_dir of configs/inference.json "
                "that holds the samples to audit."
            )
        _check_outputs(self.output_dir, [Path(self.output_dir) / name for name in AUDIT_FILES], self.overwrite)
        if not (_integer(self.max_shift) and self.max_shift >= 0):
            raise BadInputError(
                f"max_shift must be a whole number of voxels ≥ 0 (the shifts the similarity allows; 1 by default); "
                f"got {self.max_shift!r}."
            )


@dataclass(kw_only=True)
class InversionSettings:
    """The settings of ``configs/invert.json`` (``inversion_settings``), checked before any work: ``samples_dir`` is a
    folder or None (the run's held-out cases), ``output_dir`` can be written and holds no earlier inversion unless
    ``overwrite``, ``num_inference_steps`` is in [1, T], ``invert_batch_size`` is positive. After the check,
    ``overwrite`` is a bool.

    Raises:
        BadInputError: naming the setting and what it accepts.
    """

    samples_dir: str | Path | None
    output_dir: str | Path
    overwrite: bool | str
    num_inference_steps: int
    num_train_timesteps: int
    invert_batch_size: int = 2

    def __post_init__(self) -> None:
        from .inverting import INVERSION_FILE  # (inverting reads the run record, which imports this module's users)

        self.overwrite = as_flag(self.overwrite, "overwrite")
        if self.samples_dir is not None and not Path(self.samples_dir).is_dir():
            raise BadInputError(
                f"samples_dir {str(self.samples_dir)!r} is not a folder: give the output_dir of configs/inference.json "
                "that holds the volumes to invert, or leave it null to invert the run's held-out cases."
            )
        _check_outputs(self.output_dir, [Path(self.output_dir) / INVERSION_FILE], self.overwrite)
        if not (_integer(self.num_inference_steps) and 1 <= self.num_inference_steps <= self.num_train_timesteps):
            raise BadInputError(
                f"num_inference_steps must be an integer in [1, {self.num_train_timesteps}] (the model's T); "
                f"got {self.num_inference_steps!r}."
            )
        if not _positive_int(self.invert_batch_size):
            raise BadInputError(f"invert_batch_size must be a positive integer; got {self.invert_batch_size!r}.")
