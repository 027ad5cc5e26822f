"""Small helpers shared by the workflows: the module inside a DDP wrapper, the process's rank and process group, and
output-folder checks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import BadInputError

__all__ = ["check_output_folder", "evaluating", "init_process_group", "is_not_rank0", "unwrap"]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the module itself)."""
    return getattr(network, "module", network)


@contextmanager
def evaluating(network: nn.Module) -> Iterator[None]:
    """Runs its block with ``network`` in eval mode and without gradients, then gives the network back its mode."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        network.train(was_training)


def is_not_rank0() -> bool:
    """Whether this process is a rank > 0 of a ``torch.distributed`` group: such ranks train, but leave the run's
    files, logs and progress bars to rank 0."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0


def init_process_group(device: torch.device) -> None:
    """Joins the process group that ``torchrun`` set up (NCCL for a CUDA ``device``, else gloo) unless this process
    already has one, and makes ``device`` the current CUDA device."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def check_output_folder(path: str | Path, name: str) -> None:
    """Raises :class:`BadInputError` naming ``name`` unless ``path`` is a folder, or can be created as one, that
    this process may write to: not a file, not below a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{name} {str(path)!r} is a file; give a folder (it is created when missing).")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder itself, or its nearest ancestor
    if not existing.is_dir():
        raise BadInputError(
            f"{name} {str(path)!r} cannot be created: {str(existing)!r} is a file; give another folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"{name} {str(path)!r} cannot be written: no write permission in {str(existing)!r}.")
