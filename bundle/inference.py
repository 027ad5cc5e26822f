"""Generation: checkpoint → N synthetic volumes, one NIfTI per modality plus a mid-slice PNG per sample, on the
training grid or, for a registered dataset trained on its native grid, on the dataset's own grid."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import SpatialResample
from torch import nn

from .checkpoint import load_checkpoint
from .run_record import TrainedModel
from .settings import InferenceSettings
from .visualize import save_mid_slices_png

__all__ = ["generate", "onto_grid", "to_original_grid"]

logger = logging.getLogger(__name__)


def onto_grid(sample: torch.Tensor, affine: torch.Tensor | np.ndarray, target_affine: np.ndarray,
              spatial_size: Sequence[int]) -> torch.Tensor:
    """``sample`` (C, *S) on the grid of ``affine`` resampled (trilinear, by the affines: the same world points)
    onto the grid of ``target_affine`` and ``spatial_size``; zero outside the sample's box."""
    return SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=True)(
        MetaTensor(sample, affine=torch.as_tensor(affine, dtype=torch.float64)),
        dst_affine=torch.as_tensor(target_affine, dtype=torch.float64), spatial_size=list(spatial_size),
    ).as_tensor()


def to_original_grid(sample: torch.Tensor, run_record: dict) -> tuple[torch.Tensor, np.ndarray]:
    """``sample`` (C, *S) on the training grid (``run_record["affine"]``) → (the sample on the dataset's own grid,
    its affine): resampled (trilinear) onto ``run_record["original_grid"]`` where the run record has one (a registered
    dataset on the native grid, :func:`~bundle.run_record.run_record`), zero outside the training box; else
    ``sample`` and the training grid's affine."""
    affine = np.asarray(run_record["affine"], dtype=float)
    grid = run_record.get("original_grid")
    if grid is None:
        return sample, affine
    target = np.asarray(grid["affine"], dtype=float)
    return onto_grid(sample, affine, target, grid["spatial_size"]), target


def generate(
    *,
    network: nn.Module,
    inferer: Inferer,
    model: TrainedModel,
    settings: InferenceSettings,
) -> list[dict[str, Path]]:
    """Samples ``settings.num_samples`` volumes of the trained ``model`` (``network`` is built from it, and its
    checkpoint loaded here), ``settings.batch_size`` at a time, and writes them to ``settings.output_dir``
    (:meth:`~bundle.settings.InferenceSettings.sample_paths`; values in [0, 1], on the dataset's own grid where the
    run record has one, else on the training grid ``model.record["affine"]``: :func:`to_original_grid`).

    The settings were checked when ``settings`` was built, earlier samples included; with ``overwrite`` every sample
    file of an earlier run is removed once the checkpoint has loaded, before sampling, so that none is left beside this
    run's samples or taken for one of them (also when this run has fewer samples, or is stopped part-way).

    Raises:
        BadInputError: for a checkpoint that does not fit ``network``.
    """
    device, output_dir = torch.device(settings.device), settings.output_dir
    num_samples, batch_size = settings.num_samples, settings.batch_size
    modalities, run_record = model.modalities, model.record
    paths = settings.sample_paths(modalities)
    earlier = settings.earlier_samples()
    load_checkpoint(network, model.ckpt_path).to(device)
    for path in earlier:
        path.unlink()
    if earlier:
        logger.warning("--overwrite true: removed %d sample files of an earlier run from %s.", len(earlier), output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    shape = (len(modalities), *run_record["spatial_size"])
    if "original_grid" in run_record:
        logger.info("samples are written on the dataset's grid (%s voxels), the training box padded back",
                    "×".join(map(str, run_record["original_grid"]["spatial_size"])))
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        samples = inferer(torch.zeros((count, *shape), device=device), network).cpu()
        for offset, sample in enumerate(samples):
            entry = paths[start + offset]
            written, affine = to_original_grid(sample, run_record)
            for channel, modality in enumerate(modalities):
                nib.save(nib.Nifti1Image(written[channel].numpy().astype(np.float32), affine), entry[modality])
            save_mid_slices_png(sample, modalities, entry["png"])
        logger.info("wrote samples %d–%d of %d to %s", start, start + count - 1, num_samples, output_dir)
    return paths
