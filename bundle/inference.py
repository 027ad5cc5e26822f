"""Generation: checkpoint → N synthetic volumes, one NIfTI per modality plus a mid-slice PNG per sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from .checkpoint import load_checkpoint
from .settings import InferenceSettings
from .visualize import save_mid_slices_png

__all__ = ["generate"]

logger = logging.getLogger(__name__)


def generate(
    *,
    network: nn.Module,
    inferer: Inferer,
    ckpt_path: str | Path,
    modalities: Sequence[str],
    run_record: dict,
    settings: InferenceSettings,
) -> list[dict[str, Path]]:
    """Samples ``settings.num_samples`` volumes, ``settings.batch_size`` at a time, and writes them to
    ``settings.output_dir`` (:meth:`~bundle.settings.InferenceSettings.sample_paths`; values in [0, 1], on the training
    voxel grid ``run_record["affine"]``).

    The settings were checked when ``settings`` was built, earlier samples included; with ``overwrite`` every sample
    file of an earlier run is removed once the checkpoint has loaded, before sampling, so that none is left beside this
    run's samples or taken for one of them (also when this run has fewer samples, or is stopped part-way).

    Raises:
        BadInputError: for a checkpoint that does not fit ``network``.
    """
    device, output_dir = torch.device(settings.device), settings.output_dir
    num_samples, batch_size = settings.num_samples, settings.batch_size
    paths = settings.sample_paths(modalities)
    earlier = settings.earlier_samples()
    load_checkpoint(network, ckpt_path).to(device)
    for path in earlier:
        path.unlink()
    if earlier:
        logger.warning("--overwrite true: removed %d sample files of an earlier run from %s.", len(earlier), output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    affine = np.asarray(run_record["affine"], dtype=float)
    shape = (len(modalities), *run_record["spatial_size"])
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        samples = inferer(torch.zeros((count, *shape), device=device), network).cpu()
        for offset, sample in enumerate(samples):
            entry = paths[start + offset]
            for channel, modality in enumerate(modalities):
                nib.save(nib.Nifti1Image(sample[channel].numpy().astype(np.float32), affine), entry[modality])
            save_mid_slices_png(sample, modalities, entry["png"])
        logger.info("wrote samples %d–%d of %d to %s", start, start + count - 1, num_samples, output_dir)
    return paths
