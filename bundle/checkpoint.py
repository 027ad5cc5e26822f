"""Checkpoints, written and read in one place: ``model.pt`` (the network's weights, for inference, evaluation and
export), ``training_state.pt`` (everything a resumed run needs), both written atomically, and the checks of a checkpoint
folder and of a state dict against a network."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.networks.schedulers import Scheduler
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR

from .errors import BadInputError
from .run_record import RUN_RECORD, check_resumed_run
from .utils import is_not_rank0, unwrap

__all__ = [
    "TrainingCheckpoint",
    "atomic_save",
    "check_checkpoint_folder",
    "load_checkpoint",
    "remove_stale_temporary_files",
    "state_dict_mismatch",
]

logger = logging.getLogger(__name__)

IMPLEMENTATION_OPTIONS = ("fused", "foreach")
"""Optimizer options that choose the update kernel, not the training: resuming keeps the configured ones."""


TEMPORARY_FILE = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)")
"""The name of the temporary file that process ``pid`` writes before renaming it over ``name``."""


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a killed process never
    leaves a half-written ``path`` (the previous one stays intact)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporary_files(folder: str | Path) -> list[Path]:
    """Removes (and logs) the temporary files in ``folder`` of writers that no longer run (:func:`_replace_atomically`
    of a process killed while it wrote: for the paper's network several GB each); returns them. Files of a running
    process other than this one are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in sorted(folder.iterdir()):
        match = TEMPORARY_FILE.fullmatch(path.name)
        if match and path.is_file():
            pid = int(match["pid"])
            if pid == os.getpid() or not _running(pid):
                path.unlink(missing_ok=True)
                stale.append(path)
    if stale:
        logger.warning(
            "Removed %d temporary files left by writers that no longer run: %s.",
            len(stale),
            ", ".join(p.name for p in stale),
        )
    return stale


def state_dict_mismatch(network: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``network`` (weights missing, unexpected or of another shape,
    with examples), or ``""`` when it loads: the message of a checkpoint of another ``network_def``."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return "; ".join(
        part
        for part in (
            f"{len(missing)} weights missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else "",
        )
        if part
    )


def load_checkpoint(network: nn.Module, ckpt_path: str | Path) -> nn.Module:
    """Loads a ``model.pt`` state dict into ``network``; a missing file or a checkpoint of another
    architecture raises :class:`BadInputError` naming what differs."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise BadInputError(
            f"Checkpoint {str(path)!r} does not exist. Pass --ckpt_path with the model.pt that training wrote "
            "(in its ckpt_dir)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BadInputError(f"Checkpoint {str(path)!r} is not a readable PyTorch state dict ({error}).") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(
            f"Checkpoint {str(path)!r} is not a state dict of tensors (is it training_state.pt? use model.pt)."
        )
    details = state_dict_mismatch(network, state)
    if details:
        raise BadInputError(
            f"Checkpoint {str(path)!r} does not match network_def: {details}. Use the same network_def "
            "overrides (channels, num_blocks, attention_levels, modalities) as the training run."
        )
    network.load_state_dict(state)
    return network


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` with :func:`_replace_atomically`."""
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def _continue_cosine_schedule(scheduler: CosineAnnealingLR, optimizer: Optimizer, t_max: int) -> None:
    """Gives a restored ``scheduler`` the schedule length ``t_max`` and sets ``optimizer``'s learning rates to
    the ones that length gives the current epoch (the closed form ``η_min + (η_0 − η_min)(1 + cos(π e / T_max)) / 2``).

    ``CosineAnnealingLR.step`` updates the rate recursively from the previous one, so changing ``T_max`` alone
    would carry on from the old schedule's rate (0 at its end); with the rate reset, the later steps follow
    the cosine of length ``t_max``.
    """
    scheduler.T_max = t_max
    progress = (1 + math.cos(math.pi * scheduler.last_epoch / t_max)) / 2
    rates = [scheduler.eta_min + (base - scheduler.eta_min) * progress for base in scheduler.base_lrs]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports, as step() would have set it


class TrainingCheckpoint:
    """Writes, after every epoch, ``ckpt_dir/model.pt`` (the network's state dict, EMA weights when EMA
    is on: loadable straight into ``network_def``) and ``ckpt_dir/training_state.pt`` (network, EMA,
    optimizer, LR scheduler, noise-sampler RNG, epoch and iteration), both atomically. Only rank 0
    writes under ``torch.distributed``.

    Resuming restores all of it, except that a ``CosineAnnealingLR``'s configured length ``T_max`` (the
    bundle's: ``train#trainer#max_epochs``) replaces the saved one: a run resumed with a larger
    ``max_epochs`` continues the cosine over the new length (:func:`_continue_cosine_schedule`).

    An overwriting run removes the earlier run's files before it trains (:meth:`prepare`); what a checkpoint folder
    refuses (a new run over an earlier one without ``overwrite``, a resume without a state or of another run) is
    checked before, with the other settings (:func:`check_checkpoint_folder`, from
    :class:`~bundle.settings.TrainingSettings`).

    Args:
        ckpt_dir: output directory.
        network, optimizer, lr_scheduler, noise_sampler: the training objects to save and restore.
        ema: the ``AveragedModel`` of the network, or None.
        patch_sampler: the :class:`~bundle.diffusion.PatchSampler` of patch training (its draws), or None.
        run_record: the record of the run (:func:`~bundle.run_record.run_record`), written as ``ckpt_dir/run.json``,
            so that inference gives samples the same voxel grid and checks its settings, and evaluation and a resumed
            run take its validation cases.
        log_dir: the run's TensorBoard folder (``output_dir``), whose earlier event files an overwriting run
            removes; None: none.
        resume, overwrite: the run's settings: what :meth:`prepare` does when the handler is attached to the trainer
            (as the trainer is built, before it runs).
    """

    MODEL = "model.pt"
    STATE = "training_state.pt"

    def __init__(
        self,
        ckpt_dir: str,
        network: nn.Module,
        optimizer,
        lr_scheduler,
        noise_sampler,
        ema=None,
        run_record: dict | None = None,
        log_dir: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
        patch_sampler=None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.resume, self.overwrite = resume, overwrite
        self.run_record = run_record
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.objects = {
            "network": unwrap(network),
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "noise_sampler": noise_sampler,
        }
        if ema is not None:
            self.objects["ema"] = ema
        if patch_sampler is not None:
            self.objects["patch_sampler"] = patch_sampler
        self.ema = ema

    @property
    def model_path(self) -> Path:
        return self.ckpt_dir / self.MODEL

    @property
    def state_path(self) -> Path:
        return self.ckpt_dir / self.STATE

    @property
    def record_path(self) -> Path:
        return self.ckpt_dir / RUN_RECORD

    def earlier_event_files(self) -> list[Path]:
        """The TensorBoard event files in ``log_dir`` that other processes wrote: earlier runs'. This run's writers
        open theirs when the configuration is parsed, before :meth:`prepare`; TensorBoard names each
        ``events.out.tfevents.<time>.<host>.<pid>.<n>``."""
        if self.log_dir is None or not self.log_dir.is_dir():
            return []
        own = f".{socket.gethostname()}.{os.getpid()}."
        return sorted(p for p in self.log_dir.glob("events.out.tfevents.*") if own not in p.name)

    def attach(self, engine: Engine) -> None:
        """Prepares the checkpoint folder for ``engine`` (:meth:`prepare`) and saves after every epoch."""
        self.prepare(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def prepare(self, engine: Engine) -> None:
        """Before training, once :func:`check_checkpoint_folder` has passed: removes the temporary files of earlier
        writers that were killed (:func:`remove_stale_temporary_files`), then restores the full state when ``resume``.

        Otherwise, with ``overwrite`` the earlier run's ``model.pt``, ``training_state.pt`` and ``run.json`` and the
        earlier event files in ``log_dir`` (:meth:`earlier_event_files`) are removed now, before training starts,
        and the log lists them: a run stopped before its first checkpoint leaves nothing that ``--resume true``
        would continue as if it were this run, and no curves that would merge with this run's. Without it, earlier
        event files in ``log_dir`` only get a warning (TensorBoard and :func:`bundle.visualize.read_scalars` merge
        them with this run's).
        """
        if not is_not_rank0():
            remove_stale_temporary_files(self.ckpt_dir)
        if self.resume:
            self.load(engine)
            return
        if is_not_rank0():
            return
        events = self.earlier_event_files()
        if not self.overwrite:
            if events:
                logger.warning(
                    "output_dir %s already holds %d TensorBoard event files of earlier runs: TensorBoard and "
                    "scripts/plot_training_curve.py show their curves merged with this run's. Pass --overwrite true to "
                    "remove them, or another --output_dir.",
                    self.log_dir,
                    len(events),
                )
            return
        earlier = [p for p in (self.model_path, self.state_path, self.record_path) if p.exists()] + events
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            logger.warning(
                "--overwrite true: removed %s of an earlier run before training starts.", ", ".join(map(str, earlier))
            )

    def save(self, engine: Engine) -> None:
        if is_not_rank0():
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        atomic_save(state, self.state_path)
        weights = self.ema.module if self.ema is not None else self.objects["network"]
        atomic_save(weights.state_dict(), self.model_path)
        if self.run_record is not None:
            text = json.dumps(self.run_record, indent=1)
            _replace_atomically(self.record_path, lambda tmp: tmp.write_text(text))
        logger.info("epoch %d: saved %s and %s", engine.state.epoch, self.model_path, self.state_path)

    def load(self, engine: Engine) -> None:
        """Restores the training state; refused by name when it is not this configuration's run (the objects saved,
        the network's weights, the epochs left; the run record was checked by :func:`check_checkpoint_folder`)."""
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise BadInputError(
                f"{self.state_path} lacks {missing}: it was written with another configuration "
                "(e.g. EMA on/off); resume with the configuration that wrote it."
            )
        mismatch = state_dict_mismatch(self.objects["network"], state["network"])
        if mismatch:
            raise BadInputError(
                f"{self.state_path} was written by another network_def: {mismatch}. Resume with the training "
                "run's network_def overrides (channels, num_blocks, attention_levels, modalities)."
            )
        done = state["trainer"]["epoch"]
        if done >= engine.state.max_epochs:
            raise BadInputError(
                f"{self.state_path} has already trained {done} epoch(s), and train#trainer#max_epochs is "
                f"{engine.state.max_epochs}: there is nothing left to train. Pass --train#trainer#max_epochs greater "
                f"than {done} to train longer (the cosine learning-rate schedule continues over the new length)."
            )
        scheduler, optimizer = self.objects["lr_scheduler"], self.objects["optimizer"]
        t_max = scheduler.T_max if isinstance(scheduler, CosineAnnealingLR) else None
        # the configured update kernel (fused AdamW), not the saved one: a state saved by an optimizer
        # built without ``fused`` would otherwise bring back the slower update and its allocations
        kernels = [{k: group[k] for k in IMPLEMENTATION_OPTIONS if k in group} for group in optimizer.param_groups]
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        for group, options in zip(optimizer.param_groups, kernels, strict=True):
            group.update(options)
        if t_max is not None and scheduler.T_max != t_max:
            logger.info(
                "learning-rate schedule length T_max %d → %d (the configured one): the cosine continues "
                "over the new length",
                scheduler.T_max,
                t_max,
            )
            _continue_cosine_schedule(scheduler, optimizer, t_max)
        engine.state.epoch = done
        engine.state.iteration = state["trainer"]["iteration"]
        logger.info("resumed from %s at epoch %d", self.state_path, engine.state.epoch)


def check_checkpoint_folder(
    ckpt_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    spatial_size: Sequence[int],
    modalities: Sequence[str],
    noise_scheduler: Scheduler,
    schedule: str,
    spacing: float | Sequence[float] | None = None,
    condition_modalities: Sequence[str] = (),
) -> None:
    """What a training run refuses that the files in ``ckpt_dir`` alone tell, checked before data is read or anything
    is built: a resume without ``training_state.pt``, or of a run whose record (``run.json``) differs in
    ``spatial_size``, ``spacing``, ``modalities``, ``condition_modalities`` or noise schedule
    (:func:`~bundle.run_record.check_resumed_run`); a new run over an earlier run's checkpoints without ``overwrite``.

    Raises:
        BadInputError: naming the file and the flag or override to pass.
    """
    ckpt_dir = Path(ckpt_dir)
    model, state = ckpt_dir / TrainingCheckpoint.MODEL, ckpt_dir / TrainingCheckpoint.STATE
    if resume:
        if not state.is_file():
            raise BadInputError(
                f"--resume true, but there is no {state.name} in ckpt_dir {str(ckpt_dir)!r} to resume from; run "
                "without --resume to start a new training there."
            )
        check_resumed_run(
            model,
            spatial_size=spatial_size,
            modalities=modalities,
            noise_scheduler=noise_scheduler,
            schedule=schedule,
            spacing=spacing,
            condition_modalities=condition_modalities,
        )
        return
    existing = [str(p) for p in (model, state) if p.exists()]
    if existing and not overwrite:
        raise BadInputError(
            f"ckpt_dir {str(ckpt_dir)!r} already holds {', '.join(existing)} from an earlier run. Pass --resume "
            "true to continue that run, --overwrite true to start afresh over it, or another --ckpt_dir."
        )
