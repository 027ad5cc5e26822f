"""The memorization audit's measure: how like its nearest training case a volume is, as a radiologist compares two
scans: inside the head, over every modality, whatever each scan's brightness and contrast, and allowing the few
voxels of shift that any two acquisitions differ by.

:func:`nearest_cases` finds each volume's nearest reference by that similarity, the normalised cross-correlation of
their standardised head voxels, maximised over shifts of up to ``max_shift`` voxels per axis. :func:`copy_threshold`
sets the line from data: how near its nearest training case a new patient (a held-out real volume) comes.
"""

from __future__ import annotations

import itertools

import torch

from .errors import BadInputError
from .sample_quality import FOREGROUND_THRESHOLD

__all__ = ["copy_threshold", "head_standardised", "nearest_cases"]


def head_standardised(volumes: torch.Tensor, threshold: float = FOREGROUND_THRESHOLD) -> torch.Tensor:
    """Volumes (N, C, *S) in [0, 1] with each channel standardised inside the volume's head (the voxels whose mean
    over the channels exceeds ``threshold``): zero mean and unit variance there, zero outside, and the whole volume
    scaled to unit norm, so that the dot product of two is their correlation in the head."""
    volumes = volumes.float()
    head = (volumes.mean(1, keepdim=True) > threshold).float()  # (N, 1, *S)
    count = head.flatten(2).sum(2).clamp_min(1)[..., None]  # (N, 1, 1)
    flat, mask = volumes.flatten(2), head.flatten(2)
    mean = (flat * mask).sum(2, keepdim=True) / count
    centred = (flat - mean) * mask
    centred = centred / centred.square().sum(2, keepdim=True).add(1e-12).sqrt()  # each modality weighs the same
    whole = centred.flatten(1)
    return (whole / whole.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(volumes)


def nearest_cases(
    queries: torch.Tensor,
    references: torch.Tensor,
    max_shift: int = 1,
    threshold: float = FOREGROUND_THRESHOLD,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's nearest reference: ``(similarity (Nq,), index (Nq,))``, the similarity being the largest
    correlation of the two :func:`head_standardised` volumes over shifts of the reference by up to ``max_shift``
    voxels along each axis (1 for a copy; two different heads' scans correlate less), references taken ``chunk`` at a
    time.

    Args:
        queries: (Nq, C, *S) volumes in [0, 1] (e.g. generated samples).
        references: (Nr, C, *S) volumes in [0, 1] on the same grid (e.g. the training cases).

    Raises:
        BadInputError: for volumes of other grids or channels, or no references.
    """
    if queries.shape[1:] != references.shape[1:] or not len(references):
        raise BadInputError(
            f"The volumes to compare must share channels and grid: got queries {tuple(queries.shape[1:])} and "
            f"{len(references)} references {tuple(references.shape[1:])}."
        )
    spatial = tuple(range(2, queries.ndim))
    q = head_standardised(queries, threshold).flatten(1)
    best = torch.full((len(queries), len(references)), -1.0)
    for start in range(0, len(references), chunk):
        part = head_standardised(references[start : start + chunk], threshold)
        for shift in itertools.product(range(-max_shift, max_shift + 1), repeat=len(spatial)):
            moved = torch.roll(part, shift, dims=spatial).flatten(1)  # the head's border wraps into background
            block = best[:, start : start + chunk]
            torch.maximum(block, q @ moved.T, out=block)
    similarity, index = best.max(1)
    return similarity, index


def copy_threshold(held_out_similarities: torch.Tensor) -> float:
    """The similarity above which a volume is flagged as a near-copy of its nearest training case: the largest
    nearest-training similarity of the held-out real volumes, i.e. nearer to a training case than any new patient
    came. No held-out volume is flagged by construction; how far below it new samples stay is the audit's evidence.

    Raises:
        BadInputError: without held-out similarities (a run with no validation cases).
    """
    if not len(held_out_similarities):
        raise BadInputError("The copy threshold needs the nearest-training similarity of at least one held-out case.")
    return float(held_out_similarities.max())
