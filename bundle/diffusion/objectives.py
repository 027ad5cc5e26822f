"""The training objectives: what the network learns to predict from x_t, and how its prediction gives back x̂₀ and ε̂.

* ``"epsilon"``: the paper's DDPM objective. x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (MONAI's ``DDPMScheduler``, along a
  ``schedule``), and the network predicts ε.
* ``"rectified_flow"``: x_t = (1 − s) x₀ + s ε with s = t / T (MONAI's ``RFlowScheduler``, as MAISI-v2 trains), and
  the network predicts the velocity v = x₀ − ε of the straight path from the noise to the image, which the Euler
  sampler follows (:class:`~bundle.diffusion.sampling.FlowEulerScheduler`). Along it x₀ = x_t + s v and
  ε = x_t − (1 − s) v.

The trainer, validation, evaluation and the run record read the objective of a noise scheduler from its type
(:func:`objective_of`), so the objective is one setting (``objective`` in ``configs/train.json``) and is recorded with
the run as its scheduler is.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler, Scheduler
from monai.networks.schedulers.scheduler import NoiseSchedules
from torch import nn

from ..errors import BadInputError
from .maths import predict_start_from_noise, predict_start_from_velocity, with_condition

__all__ = [
    "OBJECTIVES",
    "denoise_at",
    "noise_schedule",
    "objective_of",
    "predict_start_and_noise",
    "training_scheduler",
    "training_target",
]

OBJECTIVES = ("epsilon", "rectified_flow")


def noise_schedule(schedule: str) -> str:
    """``schedule``, the name of one of MONAI's noise schedules (β_1 … β_T), which every MONAI DDPM-family scheduler
    takes.

    Raises:
        BadInputError: for another name, listing the schedules there are.
    """
    names = sorted(NoiseSchedules.names)
    if schedule not in names:
        raise BadInputError(f"schedule must be one of {names} (MONAI's noise schedules), got {schedule!r}.")
    return schedule


def training_scheduler(objective: str, num_train_timesteps: int, schedule: str, **kwargs) -> Scheduler:
    """The scheduler that noises the training images of ``objective`` (:data:`OBJECTIVES`) over T =
    ``num_train_timesteps`` timesteps: MONAI's ``DDPMScheduler`` along the noise schedule ``schedule``, or its
    ``RFlowScheduler`` (which takes no schedule: its path is straight); ``kwargs`` go to the scheduler (e.g.
    ``beta_start`` of a DDPM schedule).

    Raises:
        BadInputError: for another objective, or a ``schedule`` that is not one of MONAI's.
    """
    if objective == "epsilon":
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=noise_schedule(schedule), **kwargs)
    if objective == "rectified_flow":
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    raise BadInputError(
        f"objective must be one of {list(OBJECTIVES)} (epsilon: the paper's DDPM noise prediction; rectified_flow: "
        f"the velocity of a straight path from noise to image), got {objective!r}."
    )


def objective_of(scheduler: Scheduler) -> str:
    """The objective (:data:`OBJECTIVES`) a model trained with the noise scheduler ``scheduler`` learned."""
    return "rectified_flow" if isinstance(scheduler, RFlowScheduler) else "epsilon"


def training_target(scheduler: Scheduler, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict from x_t (``scheduler.add_noise(images, noise, timesteps)``): ε, or for
    rectified flow the velocity x₀ − ε (at every t). All (B, C, *S)."""
    return images - noise if objective_of(scheduler) == "rectified_flow" else noise


def predict_start_and_noise(
    scheduler: Scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂₀, ε̂)`` from the network's ``prediction`` at x_t = ``noisy`` (B, C, *S) and ``timesteps`` (B,), not
    clamped: ε̂ is the prediction and x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (DDPM, Ho et al. 2020, Eq. 15), or for
    rectified flow x̂₀ = x_t + s v̂ and ε̂ = x_t − (1 − s) v̂."""
    if objective_of(scheduler) == "rectified_flow":
        s = torch.as_tensor(timesteps, device=noisy.device, dtype=noisy.dtype) / scheduler.num_train_timesteps
        s = s.reshape(-1, *([1] * (noisy.ndim - 1)))
        return predict_start_from_velocity(noisy, prediction, s), noisy - (1 - s) * prediction
    alphas = scheduler.alphas_cumprod.to(noisy.device)[torch.as_tensor(timesteps, device=noisy.device).long()]
    return predict_start_from_noise(noisy, prediction, alphas.reshape(-1, *([1] * (noisy.ndim - 1)))), prediction


def denoise_at(
    network: nn.Module,
    scheduler: Scheduler,
    images: torch.Tensor,
    t: int,
    generator: torch.Generator,
    condition: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One-step denoising at the fixed timestep ``t``: ε ~ N(0, I) from ``generator`` (on the CPU, so that the draw is
    the same on every device), ``x_t`` = ``scheduler.add_noise``, the network's prediction at x_t (given
    ``condition``: :func:`~bundle.diffusion.maths.with_condition`), and from it ε̂ and x̂₀ clamped to [−1, 1]
    (:func:`predict_start_and_noise`: ε̂ is the noise either objective implies, so ε-MSE measures both alike).

    Args:
        images: x₀ (B, C, *S) in the model's [−1, 1].
        condition: a conditioned model's given modalities (B, K, *S) in [−1, 1], or None.

    Returns:
        ``{"noise": ε, "noisy": x_t, "eps_pred": ε̂, "denoised": x̂₀}``, each (B, C, *S).
    """
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
    noisy = scheduler.add_noise(images, noise, timesteps)
    prediction = network(with_condition(noisy, condition), timesteps)
    denoised, eps = predict_start_and_noise(scheduler, noisy, prediction, timesteps)
    return {"noise": noise, "noisy": noisy, "eps_pred": eps, "denoised": denoised.clamp(-1, 1)}
