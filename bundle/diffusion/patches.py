"""Patch training (Patch Diffusion, Wang et al. 2023, arXiv 2304.12526) in d dimensions: each training step trains on
patches of one size, drawn from a few fractions of the training grid, each patch with its voxels' coordinates in the
whole volume, so that the network learns where a patch lies and samples whole volumes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BadInputError
from ..networks.idm import voxel_coordinates
from ..utils import unwrap
from .noise import seeded_generator

__all__ = ["PATCH_STREAM", "PatchSampler"]

PATCH_STREAM = 1
"""The last key of a patch draw's :func:`~bundle.diffusion.noise.seeded_generator`s, whose streams are then their own
beside the noise's (seed, rank, draw): (seed, draw, PATCH_STREAM) for the size, (seed, rank, draw, PATCH_STREAM) for
the places."""


class PatchSampler:
    """The patches of each training step.

    Draw n picks one patch size, fraction f of each side of the training grid with its probability, the same on every
    rank (DDP's ranks then take equally long), and on process ``rank`` cuts ``repeats``
    patches of that size from each volume of the batch, at places drawn uniformly inside the volume (every voxel
    can be in a patch; the background is not avoided): a batch of B volumes of V voxels becomes ``B · round(V / P)``
    patches of P voxels, about the voxels of the whole batch, so that each step costs about the same. Each patch's
    condition is followed by the coordinates of its voxels in the whole volume
    (:func:`~bundle.networks.voxel_coordinates` cropped as the patch), which a network built with ``coordinates``
    reads as its last d input channels. Both draws come from :func:`~bundle.diffusion.noise.seeded_generator`s of
    their keys alone (:data:`PATCH_STREAM`), so a resumed run draws what an uninterrupted one would (the checkpoint
    keeps n).

    Args:
        spatial_size: the training grid (d sides).
        fractions: patch sides as fractions of the grid's, in (0, 1] (Wang et al.: ¼, ½, 1).
        probabilities: the chance of each fraction per step (Wang et al.: 0.2, 0.3, 0.5); they sum to 1.
        size_divisor: patch sides are rounded to multiples of it (a side that would be smaller is the divisor, a
            larger one the grid's side).
        network: the network it trains, which must read coordinates (``InvertibleDiffusionUNet(coordinates=True)``);
            its ``size_divisor`` (its levels need multiples of it) replaces ``size_divisor``.
        seed: the run's seed.
        rank: the process rank under DDP (ranks draw different patches).

    Raises:
        BadInputError: for fractions or probabilities out of range, of different lengths, or not summing to 1, and
            for a ``network`` that does not read coordinates.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        fractions: Sequence[float] = (0.25, 0.5, 1.0),
        probabilities: Sequence[float] = (0.2, 0.3, 0.5),
        size_divisor: int = 1,
        seed: int = 0,
        rank: int = 0,
        network: nn.Module | None = None,
    ) -> None:
        fractions, probabilities = list(fractions), list(probabilities)
        if network is not None:
            network = unwrap(network)
            if not getattr(network, "coordinates", False):
                raise BadInputError(
                    f"patch_training needs a network that reads each voxel's coordinates, and this "
                    f"{type(network).__name__} does not: set network_def#coordinates true (configs/train.json's "
                    "network_def does so from patch_training; a network_def given whole must say it)."
                )
            size_divisor = network.size_divisor
        if not fractions or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
            raise BadInputError(
                f"patch_fractions must be patch sides as fractions of the training grid's, in (0, 1], such as "
                f"[0.25,0.5,1.0]; got {fractions!r}."
            )
        if (
            len(probabilities) != len(fractions)
            or not all(isinstance(p, (int, float)) and p >= 0 for p in probabilities)
            or abs(sum(probabilities) - 1) > 1e-6
        ):
            raise BadInputError(
                f"patch_probabilities must give each of the {len(fractions)} patch_fractions {fractions} a chance, "
                f"the chances summing to 1, such as [0.2,0.3,0.5]; got {probabilities!r}."
            )
        self.spatial_size = [int(s) for s in spatial_size]
        self.fractions = fractions
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.sizes = [self.patch_size(f, size_divisor) for f in fractions]
        volume = math.prod(self.spatial_size)
        self.repeats = [max(1, round(volume / math.prod(size))) for size in self.sizes]
        self.seed = int(seed)
        self.rank = int(rank)
        self.draws = 0

    def patch_size(self, fraction: float, size_divisor: int = 1) -> list[int]:
        """The patch of sides ``fraction`` of the grid's, each rounded to a multiple of ``size_divisor`` and kept
        within [size_divisor, the grid's side]."""
        return [
            min(side, max(size_divisor, round(fraction * side / size_divisor) * size_divisor))
            for side in self.spatial_size
        ]

    def batches(self, batch_size: int) -> list[tuple[int, list[int]]]:
        """``(patches per step, patch size)`` of each fraction for batches of ``batch_size`` volumes."""
        return [(batch_size * r, size) for r, size in zip(self.repeats, self.sizes, strict=True)]

    def sample(self, images: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's patches: images (B, C, *S) and a conditioned model's condition (B, K, *S) or None →
        ``(patches (B·r, C, *P), their condition with coordinates (B·r, K + d, *P))``; patch j is cut from volume
        j // r."""
        spatial = list(images.shape[2:])
        if spatial != self.spatial_size:
            raise ValueError(f"PatchSampler expects volumes of {self.spatial_size} voxels, got {spatial}.")
        choice = int(
            torch.multinomial(self.probabilities, 1, generator=seeded_generator(self.seed, self.draws, PATCH_STREAM))
        )
        generator = seeded_generator(self.seed, self.rank, self.draws, PATCH_STREAM)
        self.draws += 1
        size, repeats = self.sizes[choice], self.repeats[choice]
        count = images.shape[0] * repeats
        starts = torch.stack(
            [torch.randint(0, s - p + 1, (count,), generator=generator) for s, p in zip(spatial, size, strict=True)], 1
        ).tolist()
        grid = voxel_coordinates(spatial, images.device).to(images.dtype).expand(images.shape[0], -1, *spatial)
        given = grid if condition is None else torch.cat([condition.to(images.dtype), grid], dim=1)

        def cut(volumes: torch.Tensor) -> torch.Tensor:
            boxes = [(slice(None), *(slice(o, o + p) for o, p in zip(start, size, strict=True))) for start in starts]
            return torch.stack([volumes[j // repeats][box] for j, box in enumerate(boxes)])

        return cut(images), cut(given)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
