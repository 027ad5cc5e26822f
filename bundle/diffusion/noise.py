"""Seeded noise and timestep sampling whose state travels with the training checkpoint."""

from __future__ import annotations

import torch

__all__ = ["NoiseSampler"]


class NoiseSampler:
    """Draws ε ~ N(0, I) and t ~ U{0, …, T−1} from its own generator, so a resumed run draws exactly
    what an uninterrupted one would (its ``state_dict`` is saved with the checkpoint).

    Args:
        num_train_timesteps: T.
        seed: generator seed (offset by the process rank under DDP so ranks draw different noise).
    """

    def __init__(self, num_train_timesteps: int, seed: int = 0, rank: int = 0) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be ≥ 1, got {num_train_timesteps}.")
        self.num_train_timesteps = num_train_timesteps
        self.generator = torch.Generator().manual_seed(seed + 1000003 * rank)

    def sample(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise like images, timesteps (B,))`` on the images' device."""
        noise = torch.randn(images.shape, generator=self.generator, dtype=images.dtype)
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=self.generator)
        return noise.to(images.device), timesteps.to(images.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
