"""The diffusion maths that the trainer, the validator, the samplers and evaluation share, each written once: the
intensity ranges of images and of the model, and x̂₀ from a noise prediction."""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler
from torch import nn

__all__ = ["denoise_at", "predict_start_from_noise", "to_image_range", "to_model_range", "with_condition"]


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


def denoise_at(
    network: nn.Module,
    scheduler: Scheduler,
    images: torch.Tensor,
    t: int,
    generator: torch.Generator,
    condition: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One-step denoising at the fixed timestep ``t``: ε ~ N(0, I) from ``generator`` (on the CPU, so that the draw is
    the same on every device), ``x_t`` = ``scheduler.add_noise``, ε̂ = ``network(x_t, t)`` (given ``condition``:
    :func:`with_condition`) and x̂₀ clamped to [−1, 1].

    Args:
        images: x₀ (B, C, *S) in the model's [−1, 1].
        condition: a conditioned model's given modalities (B, K, *S) in [−1, 1], or None.

    Returns:
        ``{"noise": ε, "noisy": x_t, "eps_pred": ε̂, "denoised": x̂₀}``, each (B, C, *S).
    """
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
    noisy = scheduler.add_noise(images, noise, timesteps)
    eps = network(with_condition(noisy, condition), timesteps)
    abar = scheduler.alphas_cumprod.to(images.device)[timesteps].reshape(-1, *([1] * (images.ndim - 1)))
    denoised = predict_start_from_noise(noisy, eps, abar).clamp(-1, 1)
    return {"noise": noise, "noisy": noisy, "eps_pred": eps, "denoised": denoised}
