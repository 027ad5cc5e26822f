"""Image → noise (``configs/invert.json``): each volume mapped to the noise the model's deterministic chain would
sample it from (:func:`~bundle.diffusion.invert`), the round trip back (:func:`~bundle.diffusion.sample_from`), and
the scores a real-against-generated detector reads from them.

A volume the model generated lies on its chain's paths, so inverting and sampling it again returns it closely; a real
volume is only approximated by the model and comes back with a larger error, and the noise it inverts to departs
further from N(0, I). ``inversion.json`` gives per volume the round trip's mean absolute error (in [0, 1] intensity
units), and the inverted noise's mean, standard deviation and Kolmogorov–Smirnov distance from N(0, 1); the noise is
written as ``<name>_noise_<modality>.nii.gz`` on the training grid.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from .auditing import case_volumes, sample_volumes
from .diffusion import invert, sample_from
from .diffusion.sampling import FlowEulerScheduler, GridDDIMScheduler
from .run_record import TrainedModel

__all__ = ["INVERSION_FILE", "inversion_scores", "invert_volumes", "noise_ks_distance", "volumes_to_invert"]

logger = logging.getLogger(__name__)

INVERSION_FILE = "inversion.json"


def noise_ks_distance(noise: torch.Tensor) -> torch.Tensor:
    """The Kolmogorov–Smirnov distance of each volume's values (B, …) from N(0, 1): (B,), the largest gap between
    their empirical distribution function and the normal's."""
    values = noise.flatten(1).double().sort(dim=1).values
    count = values.shape[1]
    normal = 0.5 * (1 + torch.erf(values / math.sqrt(2)))
    above = torch.arange(1, count + 1, dtype=torch.float64) / count - normal
    below = normal - torch.arange(0, count, dtype=torch.float64) / count
    return torch.maximum(above, below).max(dim=1).values.float()


def inversion_scores(
    network: nn.Module,
    scheduler: GridDDIMScheduler | FlowEulerScheduler,
    volumes: torch.Tensor,
    num_inference_steps: int,
    condition: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(noise (B, C, *S), scores)`` of ``volumes`` (B, C, *S) in [0, 1]: the inverted noise and, per volume (B,),
    ``round_trip_error`` (mean |sample_from(noise) − volume|), ``noise_mean``, ``noise_std`` and ``noise_ks``."""
    noise = invert(network, scheduler, volumes, num_inference_steps, condition)
    back = sample_from(network, scheduler, noise, condition)
    scores = {
        "round_trip_error": (back - volumes).abs().flatten(1).mean(1),
        "noise_mean": noise.flatten(1).mean(1),
        "noise_std": noise.flatten(1).std(1),
        "noise_ks": noise_ks_distance(noise),
    }
    return noise, scores


def volumes_to_invert(model: TrainedModel, samples_dir: str | Path | None, held_out) -> tuple[list[str], torch.Tensor]:
    """``(names, volumes (N, C, *S))`` on the training grid: the samples in ``samples_dir`` as inference writes them
    (:func:`~bundle.auditing.sample_volumes`), or with ``samples_dir`` None the run's held-out cases (``held_out``, a
    dataset of its preprocessed validation cases), named by their case ids."""
    if samples_dir is None:
        return case_volumes(held_out)
    return sample_volumes(samples_dir, model.modalities, model.record)


def invert_volumes(
    model: TrainedModel,
    network: nn.Module,
    names: Sequence[str],
    volumes: torch.Tensor,
    output_dir: str | Path,
    num_inference_steps: int = 50,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
) -> dict:
    """Inverts ``volumes`` (N, C, *S) on the training grid (named ``names``) with the model's deterministic sampler
    (``TrainedModel.reconstruction_sampler``: DDIM with η = 0, or Euler), ``batch_size`` at a time on ``device``;
    writes each one's noise and :data:`INVERSION_FILE` (its scores) to ``output_dir`` and returns that file's
    content."""
    scheduler = model.reconstruction_sampler()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(model.record["affine"], dtype=float)
    rows = []
    for start in range(0, len(names), batch_size):
        batch = volumes[start : start + batch_size].to(device)
        noise, scores = inversion_scores(network, scheduler, batch, num_inference_steps)
        for i, name in enumerate(names[start : start + batch_size]):
            for channel, modality in enumerate(model.modalities):
                image = nib.Nifti1Image(noise[i, channel].cpu().numpy().astype(np.float32), affine)
                nib.save(image, out / f"{name}_noise_{modality}.nii.gz")
            rows.append({"name": name} | {key: float(value[i]) for key, value in scores.items()})
    result = {
        "sampler": type(scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "volumes": rows,
    }
    (out / INVERSION_FILE).write_text(json.dumps(result, indent=1))
    logger.info(
        "inverted %d volumes with %d %s steps: round-trip error %.4f on average (in [0, 1] units); %s",
        len(rows),
        num_inference_steps,
        type(scheduler).__name__,
        float(np.mean([r["round_trip_error"] for r in rows])),
        out / INVERSION_FILE,
    )
    return result
