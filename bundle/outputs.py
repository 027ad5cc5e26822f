"""The files inference writes, in one place: one NIfTI volume per modality ([0, 1], float32) with a PNG of the
mid-slices beside them, the grid they are written on, and the refusal of a run whose outputs would replace an earlier
run's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from .errors import BadInputError
from .visualize import save_mid_slices_png

__all__ = ["onto_grid", "refuse_earlier_outputs", "to_original_grid", "write_volumes", "writing_grid"]


def refuse_earlier_outputs(earlier: Sequence[Path], output_dir: str | Path) -> None:
    """Raises :class:`BadInputError` when ``earlier`` (files of an earlier run in ``output_dir`` that this run would
    replace or leave beside its own) is not empty, naming one and the flags that would be accepted."""
    if earlier:
        raise BadInputError(
            f"{len(earlier)} output files of an earlier run already exist in output_dir {str(output_dir)!r} (e.g. "
            f"{Path(earlier[0]).name}); pass --overwrite true to replace them or choose another --output_dir."
        )


def write_volumes(
    volume: torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    paths: Mapping[str, Path],
    preview: torch.Tensor,
    preview_names: Sequence[str],
) -> None:
    """Writes channel c of ``volume`` (C, *S) to the c-th path of ``paths`` (``{modality: path, …, "png": path}``,
    the modalities in channel order) as a float32 NIfTI with ``affine``, and the mid-slices of ``preview``
    (P, *S′: e.g. the given and the generated volumes on the model's grid) named ``preview_names`` to
    ``paths["png"]``."""
    volumes = [path for name, path in paths.items() if name != "png"]
    affine = np.asarray(affine, dtype=float)
    for channel, path in enumerate(volumes):
        nib.save(nib.Nifti1Image(volume[channel].detach().cpu().numpy().astype(np.float32), affine), path)
    save_mid_slices_png(preview, preview_names, paths["png"])


def onto_grid(
    sample: torch.Tensor, affine: torch.Tensor | np.ndarray, target_affine: np.ndarray, spatial_size: Sequence[int]
) -> torch.Tensor:
    """``sample`` (C, *S) on the grid of ``affine`` resampled (trilinear, by the affines: the same world points)
    onto the grid of ``target_affine`` and ``spatial_size``; zero outside the sample's box."""
    return SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=True)(
        MetaTensor(sample, affine=torch.as_tensor(affine, dtype=torch.float64)),
        dst_affine=torch.as_tensor(target_affine, dtype=torch.float64),
        spatial_size=list(spatial_size),
    ).as_tensor()


def writing_grid(run_record: dict) -> tuple[np.ndarray, list[int]]:
    """The affine and shape inference writes a run's samples on (:func:`to_original_grid`): the dataset's own grid
    where the run record has one (``original_grid``: a registered dataset on the native grid,
    :func:`~bundle.run_record.run_record`), else the training grid."""
    grid = run_record.get("original_grid") or run_record
    return np.asarray(grid["affine"], dtype=float), list(grid["spatial_size"])


def to_original_grid(sample: torch.Tensor, run_record: dict) -> tuple[torch.Tensor, np.ndarray]:
    """``sample`` (C, *S) on the training grid (``run_record["affine"]``) → (the sample on :func:`writing_grid`, its
    affine): resampled (trilinear) onto ``run_record["original_grid"]`` where the run record has one, zero outside the
    training box; else ``sample`` and the training grid's affine."""
    affine = np.asarray(run_record["affine"], dtype=float)
    if run_record.get("original_grid") is None:
        return sample, affine
    target, shape = writing_grid(run_record)
    return onto_grid(sample, affine, target, shape), target
