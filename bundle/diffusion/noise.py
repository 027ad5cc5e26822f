"""Seeded noise and timestep sampling whose state travels with the training checkpoint."""

from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["NoiseSampler"]

logger = logging.getLogger(__name__)


class NoiseSampler:
    """Draws ε ~ N(0, I) and t ~ U{0, …, T−1}: draw n of process ``rank`` comes from a generator seeded with
    ``(seed, rank, n)`` alone, so a resumed run draws exactly what an uninterrupted one would, on every
    rank (the checkpoint keeps n, the same on every rank, and each rank keeps its own stream).

    Args:
        num_train_timesteps: T.
        seed: the run's seed.
        rank: the process rank under DDP (ranks draw different noise).
    """

    def __init__(self, num_train_timesteps: int, seed: int = 0, rank: int = 0) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be ≥ 1, got {num_train_timesteps}.")
        self.num_train_timesteps = num_train_timesteps
        self.seed = int(seed)
        self.rank = int(rank)
        self.draws = 0

    def _generator(self) -> torch.Generator:
        entropy = np.random.SeedSequence([self.seed, self.rank, self.draws]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(entropy) & (2**63 - 1))

    def sample(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise like images, timesteps (B,))`` on the images' device."""
        generator = self._generator()
        self.draws += 1
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=generator)
        return noise.to(images.device), timesteps.to(images.device)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        if "draws" not in state:  # written by bundle 0.2 (one generator's state, rank 0's)
            logger.warning("The checkpoint's noise state is from an older bundle: noise draws restart their "
                           "stream from its beginning, so this run is not bit-identical with an uninterrupted one.")
            return
        self.draws = int(state["draws"])
