"""Sampling: a MONAI ``Inferer`` that turns noise into images with the full DDPM chain or DDIM."""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from torch import nn
from tqdm import tqdm

from ..errors import BadInputError
from .noise import seeded_generator

__all__ = [
    "SAMPLERS", "SAMPLING_SCHEDULE", "GridDDIMScheduler", "check_noise_schedule", "check_noise_scheduler",
    "make_sampling_scheduler", "DiffusionSampler",
]

SAMPLERS = ("ddpm", "ddim")
SAMPLING_SCHEDULE = "cosine"
"""The noise schedule (β_1 … β_T) that the samplers implement, and so the only one a model can be
trained with and then sampled from."""


def check_noise_schedule(schedule: str, source: str = "noise_scheduler#schedule") -> None:
    """Raises :class:`BadInputError` unless ``schedule`` is :data:`SAMPLING_SCHEDULE`; ``source`` says where the
    value came from (the config key, or the file that records the training run's schedule)."""
    if schedule != SAMPLING_SCHEDULE:
        raise BadInputError(
            f"{source} is {schedule!r}, but the bundle's samplers implement the {SAMPLING_SCHEDULE!r} noise schedule "
            f"only, so a model trained with another could not be sampled; train with --noise_scheduler#schedule "
            f"{SAMPLING_SCHEDULE}."
        )


def check_noise_scheduler(scheduler: Scheduler, schedule: str) -> None:
    """For training: ``scheduler`` (the configuration's ``noise_scheduler``, built with ``schedule``) must noise
    images as the samplers will assume at sampling time, which rebuild the default :data:`SAMPLING_SCHEDULE`
    scheduler from ``num_train_timesteps`` alone (:func:`make_sampling_scheduler`), and predict ε.

    Raises:
        BadInputError: for another schedule, other schedule arguments (ᾱ_t differs) or a prediction type
            other than ``"epsilon"``, naming the override to drop.
    """
    check_noise_schedule(schedule)
    if scheduler.prediction_type != "epsilon":
        raise BadInputError(
            f"noise_scheduler#prediction_type is {scheduler.prediction_type!r}, but the loss (Eq. 8) and the "
            "samplers predict the noise ε; drop the override (or set it to 'epsilon')."
        )
    reference = make_sampling_scheduler("ddpm", scheduler.num_train_timesteps).alphas_cumprod
    if not torch.allclose(scheduler.alphas_cumprod, reference):
        middle = scheduler.num_train_timesteps // 2
        raise BadInputError(
            f"noise_scheduler's schedule arguments differ from the samplers' default {SAMPLING_SCHEDULE} schedule "
            f"(ᾱ at t={middle}: {scheduler.alphas_cumprod[middle]:.4f} vs {reference[middle]:.4f}), which sampling "
            "and evaluation rebuild from num_train_timesteps alone; drop the noise_scheduler#… schedule overrides."
        )


class GridDDIMScheduler(DDIMScheduler):
    """MONAI's :class:`~monai.networks.schedulers.DDIMScheduler` whose :meth:`step` from t goes to the next timestep
    of its own ``timesteps``, so that the network is always evaluated at the noise level the sample has.

    MONAI's step goes from t to t − ⌊T / n⌋, while ``set_timesteps`` spaces the n timesteps (T − 1) / (n − 1) apart:
    with T = 2000 and n = 5 every step goes 400 steps down and the next treats the sample as if it were 100 steps
    less noisy (x̂₀ and ε̂ are then formed at the wrong ᾱ). Here the step is DDIM's Eq. 12 (Song et al., 2021) from
    t to the next timestep t′ of ``timesteps`` (or to x₀ after the last), with σ_t(η) of Eq. 16:

        x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t   (clamped to ``clip_sample_values`` when ``clip_sample``),
        x_t′ = √ᾱ_t′ x̂₀ + √(1 − ᾱ_t′ − σ_t²) ε̂ + σ_t z,   z ~ N(0, I).

    ``timesteps`` may be set to any descending sequence (the evaluation's reconstruction starts one at its t).
    Only ε-prediction is implemented (the bundle trains no other).
    """

    def previous_timestep(self, timestep: int) -> int:
        """The timestep of ``timesteps`` after ``timestep``; −1 (x₀, ᾱ = ``final_alpha_cumprod``) after the last."""
        below = self.timesteps[self.timesteps < timestep]
        return int(below.max()) if len(below) else -1

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t′, x̂₀)`` from ``model_output`` = ε̂ (B, C, *S) and ``sample`` = x_t (B, C, *S)."""
        if self.prediction_type != "epsilon":
            raise NotImplementedError(f"GridDDIMScheduler predicts ε only, got prediction_type={self.prediction_type!r}.")
        previous = self.previous_timestep(int(timestep))
        alpha = self.alphas_cumprod[timestep]
        alpha_previous = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        original = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
        if self.clip_sample:
            original = original.clamp(*self.clip_sample_values)
        sigma = eta * self._get_variance(timestep, previous).sqrt()
        previous_sample = alpha_previous.sqrt() * original + (1 - alpha_previous - sigma**2).sqrt() * model_output
        if eta > 0:
            noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                                device=model_output.device)
            previous_sample = previous_sample + sigma * noise
        return previous_sample, original


def make_sampling_scheduler(sampler: str, num_train_timesteps: int, num_inference_steps: int = 50) -> Scheduler:
    """The :data:`SAMPLING_SCHEDULE` scheduler of ``sampler``: DDPM over all ``num_train_timesteps`` steps (the paper),
    or DDIM (η = 0, :class:`GridDDIMScheduler`) over ``num_inference_steps`` evenly spaced ones from T − 1 to 0.

    Raises:
        BadInputError: for an unknown sampler or ``num_inference_steps`` outside [1, num_train_timesteps].
    """
    if sampler not in SAMPLERS:
        raise BadInputError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if num_train_timesteps < 1:
        raise BadInputError(f"num_train_timesteps must be ≥ 1, got {num_train_timesteps}.")
    if sampler == "ddpm":
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=SAMPLING_SCHEDULE)
        scheduler.set_timesteps(num_train_timesteps)
        return scheduler
    if not 1 <= int(num_inference_steps) <= num_train_timesteps:
        raise BadInputError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps} for DDIM, "
            f"got {num_inference_steps}."
        )
    scheduler = GridDDIMScheduler(num_train_timesteps=num_train_timesteps, schedule=SAMPLING_SCHEDULE)
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


class DiffusionSampler(Inferer):
    """``sampler(inputs, network)`` → images (B, C, *S) in [0, 1], with ``inputs`` only a shape reference.

    Each sample has its own generator (:func:`~bundle.diffusion.noise.seeded_generator` of ``seed`` and the sample's
    index, counted over the calls: the first call's samples are 0 … B−1, the next call's continue from B), which draws
    its x_T ~ N(0, I) and the noise of its DDPM steps. So sample i depends only on ``seed`` and i, not on how the
    samples are batched, and a rerun repeats them. The chain runs over the steps of ``sampler``'s scheduler with a
    progress bar; the result, in the model's [−1, 1], is mapped to [0, 1].

    Args:
        num_train_timesteps: T of the trained model.
        sampler: ``"ddpm"`` (all T steps) or ``"ddim"``.
        num_inference_steps: DDIM steps (1…T).
        seed: seed of the run's samples.
        progress: show a progress bar over the steps.
        num_channels: channels to generate; default: those of ``inputs`` (set it when the reference
            input is, e.g., a one-channel image given by MONAI Label).

    Raises:
        BadInputError: for an unknown sampler or ``num_inference_steps`` outside [1, T].
    """

    def __init__(
        self,
        num_train_timesteps: int = 2000,
        sampler: str = "ddpm",
        num_inference_steps: int = 50,
        seed: int = 0,
        progress: bool = True,
        num_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.scheduler = make_sampling_scheduler(sampler, num_train_timesteps, num_inference_steps)
        self.seed = seed
        self.progress = progress
        self.drawn = 0  # samples generated so far: the index of the next one

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """Samples ``inputs.shape[0]`` images of ``inputs``' spatial shape: (B, C, *S) in [0, 1]."""
        count, device = inputs.shape[0], inputs.device
        shape = (self.num_channels or inputs.shape[1], *inputs.shape[2:])
        generators = [seeded_generator(self.seed, self.drawn + i, device=device) for i in range(count)]
        self.drawn += count
        images = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
        was_training = network.training
        network.eval()
        with torch.no_grad():
            for t in tqdm(self.scheduler.timesteps.tolist(), disable=not self.progress):
                eps = network(images, torch.full((count,), t, device=device, dtype=torch.long))
                images = torch.cat([  # one step per sample, each with its own generator (DDPM step noise)
                    self.scheduler.step(eps[i : i + 1], t, images[i : i + 1], generator=g)[0]
                    for i, g in enumerate(generators)
                ])
        network.train(was_training)
        return ((images + 1) / 2).clamp(0, 1)
