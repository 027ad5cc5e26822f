"""Diffusion: the maths, the Eq. 8 loss, noise sampling, the samplers and the Ignite training/validation engines."""

from .ema import ema_with_warmup
from .engines import IDMEvaluator, IDMTrainer, autocast_dtype, given_modalities
from .loss import LOSS_TERMS, idm_loss, idm_loss_backward, micro_batches, weight_norm
from .maths import denoise_at, predict_start_from_noise, to_image_range, to_model_range, with_condition
from .noise import NoiseSampler, seeded_generator
from .sampling import (
    SAMPLERS,
    DiffusionSampler,
    DPMSolverScheduler,
    GridDDIMScheduler,
    make_sampler,
    noise_schedule,
)

__all__ = [
    "LOSS_TERMS",
    "SAMPLERS",
    "DPMSolverScheduler",
    "DiffusionSampler",
    "GridDDIMScheduler",
    "IDMEvaluator",
    "IDMTrainer",
    "NoiseSampler",
    "autocast_dtype",
    "denoise_at",
    "ema_with_warmup",
    "given_modalities",
    "idm_loss",
    "idm_loss_backward",
    "make_sampler",
    "micro_batches",
    "noise_schedule",
    "predict_start_from_noise",
    "seeded_generator",
    "to_image_range",
    "to_model_range",
    "weight_norm",
    "with_condition",
]
