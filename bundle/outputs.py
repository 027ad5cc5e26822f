"""The files inference writes, in one place: one NIfTI volume per modality ([0, 1], float32) with a PNG of the
mid-slices beside them, and the refusal of a run whose outputs would replace an earlier run's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .errors import BadInputError
from .visualize import save_mid_slices_png

__all__ = ["refuse_earlier_outputs", "write_volumes"]


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
