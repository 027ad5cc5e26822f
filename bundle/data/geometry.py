"""The voxel geometry (affine) of the training volumes, kept beside the checkpoint for inference."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError

__all__ = ["GEOMETRY_FILE", "default_affine", "geometry_of", "load_geometry"]

GEOMETRY_FILE = "geometry.json"


def default_affine(spatial_size: Sequence[int], spacing: float = 1.5) -> np.ndarray:
    """RAS affine with isotropic ``spacing`` mm and the origin at the volume centre."""
    affine = np.diag([spacing] * len(spatial_size) + [1.0])
    affine[: len(spatial_size), -1] = [-spacing * s / 2 for s in spatial_size]
    return affine


def geometry_of(image: torch.Tensor, modalities: Sequence[str]) -> dict:
    """``{"affine", "spatial_size", "modalities"}`` of a preprocessed training image (C, *S) MetaTensor."""
    affine = np.asarray(getattr(image, "affine", default_affine(image.shape[1:])), dtype=float)
    return {"affine": affine.tolist(), "spatial_size": list(image.shape[1:]), "modalities": list(modalities)}


def load_geometry(ckpt_path: str | Path, spatial_size: Sequence[int], modalities: Sequence[str]) -> dict:
    """The geometry saved beside ``ckpt_path`` (``geometry.json``), checked against the configuration;
    a centred 1.5 mm RAS grid of ``spatial_size`` when there is none (e.g. a checkpoint from elsewhere)."""
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
    return geometry
