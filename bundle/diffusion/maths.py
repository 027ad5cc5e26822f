"""The diffusion maths that the trainer, the validator, the samplers and evaluation share, each written once: the
intensity ranges of images and of the model, the conditioned network's input, and x̂₀ from a noise or a velocity
prediction."""

from __future__ import annotations

import torch

__all__ = [
    "predict_start_from_noise",
    "predict_start_from_velocity",
    "to_image_range",
    "to_model_range",
    "with_condition",
]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (as preprocessing gives them) → the model's [−1, 1], as a plain tensor."""
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    return images * 2 - 1


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    """The model's [−1, 1] → images in [0, 1] (the inverse of :func:`to_model_range`; not clamped)."""
    return (x + 1) / 2


def with_condition(noisy: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """The network's input: x_t (B, C, *S) with a conditioned model's given modalities (B, K, *S) concatenated after
    its channels, (B, C + K, *S) (MONAI's ``DiffusionInferer`` ``mode="concat"``); x_t itself without a condition."""
    return noisy if condition is None else torch.cat([noisy, condition.to(noisy.dtype)], dim=1)


def predict_start_from_noise(noisy: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t`` (DDPM, Ho et al. 2020, Eq. 15), not clamped.

    Args:
        noisy: x_t (B, C, *S).
        eps: ε̂ (B, C, *S).
        alphas_cumprod: ᾱ_t, a number or a tensor that broadcasts against x_t (e.g. (B, 1, 1, 1, 1)).
    """
    return (noisy - torch.sqrt(1 - alphas_cumprod) * eps) / torch.sqrt(alphas_cumprod)


def predict_start_from_velocity(
    noisy: torch.Tensor, velocity: torch.Tensor, fraction: float | torch.Tensor
) -> torch.Tensor:
    """``x̂₀ = x_s + s v̂`` of a rectified flow (x_s = (1 − s) x₀ + s ε, v = x₀ − ε), not clamped.

    Args:
        noisy: x_s (B, C, *S).
        velocity: v̂ (B, C, *S).
        fraction: s = t / T, a number or a tensor that broadcasts against x_s (e.g. (B, 1, 1, 1, 1)).
    """
    return noisy + fraction * velocity
