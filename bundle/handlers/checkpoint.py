"""Atomic training checkpoints: ``model.pt`` for inference and a full state for ``resume``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..diffusion.loss import unwrap
from ..errors import BadInputError

__all__ = ["TrainingCheckpoint", "atomic_save"]

logger = logging.getLogger(__name__)


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: a killed process never
    leaves a half-written ``path`` (the previous one stays intact)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` with :func:`_replace_atomically`."""
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


class TrainingCheckpoint:
    """Writes, after every epoch, ``ckpt_dir/model.pt`` (the network's state dict, EMA weights when EMA
    is on: loadable straight into ``network_def``) and ``ckpt_dir/training_state.pt`` (network, EMA,
    optimizer, LR scheduler, noise-sampler RNG, epoch and iteration), both atomically. Only rank 0
    writes under ``torch.distributed``.

    Args:
        ckpt_dir: output directory.
        network, optimizer, lr_scheduler, noise_sampler: the training objects to save and restore.
        ema: the ``AveragedModel`` of the network, or None.
        geometry: the training volumes' geometry (:func:`bundle.data.geometry_of`), written once as
            ``ckpt_dir/geometry.json`` so inference gives samples the same voxel grid.
    """

    MODEL = "model.pt"
    STATE = "training_state.pt"

    def __init__(
        self, ckpt_dir: str, network: nn.Module, optimizer, lr_scheduler, noise_sampler, ema=None, geometry: dict | None = None
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.geometry = geometry
        self.objects = {
            "network": unwrap(network),
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "noise_sampler": noise_sampler,
        }
        if ema is not None:
            self.objects["ema"] = ema
        self.ema = ema

    @property
    def model_path(self) -> Path:
        return self.ckpt_dir / self.MODEL

    @property
    def state_path(self) -> Path:
        return self.ckpt_dir / self.STATE

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def prepare(self, engine: Engine, resume: bool, overwrite: bool = False) -> None:
        """Before training: restore the full state when ``resume``; otherwise refuse to overwrite an
        earlier run's checkpoints unless ``overwrite``."""
        if resume:
            self.load(engine)
            return
        existing = [str(p) for p in (self.model_path, self.state_path) if p.exists()]
        if existing and not overwrite:
            raise BadInputError(
                f"ckpt_dir {str(self.ckpt_dir)!r} already holds {', '.join(existing)} from an earlier run. "
                "Pass --resume true to continue that run, --overwrite true to start afresh over it, or "
                "another --ckpt_dir."
            )

    def save(self, engine: Engine) -> None:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        atomic_save(state, self.state_path)
        weights = self.ema.module if self.ema is not None else self.objects["network"]
        atomic_save(weights.state_dict(), self.model_path)
        if self.geometry is not None:
            text = json.dumps(self.geometry, indent=1)
            _replace_atomically(self.ckpt_dir / "geometry.json", lambda tmp: tmp.write_text(text))
        logger.info("epoch %d: saved %s and %s", engine.state.epoch, self.model_path, self.state_path)

    def load(self, engine: Engine) -> None:
        if not self.state_path.is_file():
            raise BadInputError(
                f"--resume true, but there is no {self.STATE} in ckpt_dir {str(self.ckpt_dir)!r} to resume "
                "from; run without --resume to start a new training there."
            )
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise BadInputError(
                f"{self.state_path} lacks {missing}: it was written with another configuration "
                "(e.g. EMA on/off); resume with the configuration that wrote it."
            )
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        engine.state.epoch = state["trainer"]["epoch"]
        engine.state.iteration = state["trainer"]["iteration"]
        logger.info("resumed from %s at epoch %d", self.state_path, engine.state.epoch)
