"""Generation: checkpoint → N synthetic volumes, one NIfTI per modality plus a mid-slice PNG per sample."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from .errors import BadInputError, state_dict_mismatch
from .flags import as_flag
from .settings import check_output_folder
from .visualize import save_mid_slices_png

__all__ = ["load_checkpoint", "sample_paths", "earlier_samples", "generate"]

logger = logging.getLogger(__name__)

SAMPLE_FILE = re.compile(r"sample_\d{3,}(?:_.+\.nii\.gz|\.png)")
"""The names :func:`sample_paths` gives, for any number of samples and any modalities."""


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
        raise BadInputError(f"Checkpoint {str(path)!r} is not a state dict of tensors (is it training_state.pt? use model.pt).")
    details = state_dict_mismatch(network, state)
    if details:
        raise BadInputError(
            f"Checkpoint {str(path)!r} does not match network_def: {details}. Use the same network_def "
            "overrides (channels, num_blocks, attention_levels, modalities) as the training run."
        )
    network.load_state_dict(state)
    return network


def sample_paths(output_dir: str | Path, num_samples: int, modalities: Sequence[str]) -> list[dict[str, Path]]:
    """``[{modality: …/sample_000_<modality>.nii.gz, "png": …/sample_000.png}, …]``."""
    out = Path(output_dir)
    return [
        {m: out / f"sample_{i:03d}_{m}.nii.gz" for m in modalities} | {"png": out / f"sample_{i:03d}.png"}
        for i in range(num_samples)
    ]


def earlier_samples(output_dir: str | Path) -> list[Path]:
    """The sample files (named as :func:`sample_paths` names them, of any run) already in ``output_dir``."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and SAMPLE_FILE.fullmatch(p.name))


def generate(
    network: nn.Module,
    inferer: Inferer,
    ckpt_path: str | Path,
    output_dir: str | Path,
    num_samples: int,
    batch_size: int,
    modalities: Sequence[str],
    geometry: dict,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> list[dict[str, Path]]:
    """Samples ``num_samples`` volumes in batches and writes them (values in [0, 1], the training voxel
    grid ``geometry["affine"]``). Every input is checked before sampling starts.

    Sample files of an earlier run in ``output_dir`` (:func:`earlier_samples`, whichever their number and
    modalities) are refused unless ``overwrite``; with it they are all removed once the checks have passed,
    before sampling, so that none is left beside this run's samples or taken for one of them (also when
    this run has fewer samples, or is stopped part-way).
    """
    overwrite = as_flag(overwrite, "overwrite")
    if num_samples < 1 or batch_size < 1:
        raise BadInputError(f"num_samples and batch_size must be ≥ 1, got {num_samples} and {batch_size}.")
    check_output_folder(output_dir, "output_dir")
    paths = sample_paths(output_dir, num_samples, modalities)
    earlier = earlier_samples(output_dir)
    if earlier and not overwrite:
        raise BadInputError(
            f"{len(earlier)} sample files of an earlier run already exist in output_dir {str(output_dir)!r} (e.g. "
            f"{earlier[0].name}); pass --overwrite true to replace them all (none is kept beside the new samples) "
            "or choose another --output_dir."
        )
    load_checkpoint(network, ckpt_path).to(device)
    for path in earlier:
        path.unlink()
    if earlier:
        logger.warning("--overwrite true: removed %d sample files of an earlier run from %s.", len(earlier), output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    affine = np.asarray(geometry["affine"], dtype=float)
    shape = (len(modalities), *geometry["spatial_size"])
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
