"""Seeded random streams: :func:`seeded_generator`, which keys every stream the bundle draws (training noise,
validation noise, samples), and the training noise and timestep sampling whose state travels with the checkpoint."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["NoiseSampler", "seeded_generator"]


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` whose stream is fixed by the integers ``keys`` alone, e.g. (seed, rank, draw)
    or (seed, sample index).

    NumPy's ``SeedSequence`` mixes the keys into one 64-bit seed, so distinct key tuples get unrelated streams
    (``seed + index`` would give index 1 of seed 0 the stream of index 0 of seed 1). Each key, taken modulo 2⁶⁴ (as
    ``torch.Generator.manual_seed`` takes a negative seed), enters as two 32-bit words after the number of keys:
    ``SeedSequence`` alone gives (0, 1) and (0, 1, 0) one stream, and (2³², 1) and (0, 2³² + 1) another.
    """
    words = [len(keys)]
    for key in keys:
        key = int(key) % 2**64
        words += [key & 0xFFFFFFFF, key >> 32]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


class NoiseSampler:
    """Draws ε ~ N(0, I) and t ~ U{0, …, T−1}: draw n of process ``rank`` comes from :func:`seeded_generator` of
    ``(seed, rank, n)`` alone, so a resumed run draws exactly what an uninterrupted one would, on every rank (the
    checkpoint keeps n, the same on every rank, and each rank keeps its own stream).

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

    def sample(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise like images, timesteps (B,))`` on the images' device."""
        generator = seeded_generator(self.seed, self.rank, self.draws)
        self.draws += 1
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=generator)
        return noise.to(images.device), timesteps.to(images.device)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
