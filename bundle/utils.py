"""Small helpers shared by the workflows: the module inside a DDP wrapper, and output-folder checks."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import BadInputError

__all__ = ["check_output_folder", "unwrap"]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the module itself)."""
    return getattr(network, "module", network)


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
