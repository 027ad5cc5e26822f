"""Diffusion: the Eq. 8 loss, noise sampling and the Ignite training/validation engines."""

from .ema import ema_with_warmup
from .engines import IDMEvaluator, IDMTrainer, autocast_dtype, one_step_denoise, to_model_range
from .loss import idm_loss, idm_loss_backward, micro_batches, unwrap, weight_norm
from .noise import NoiseSampler, seeded_generator
from .sampling import SAMPLERS, SAMPLING_SCHEDULE, DiffusionSampler, GridDDIMScheduler, check_noise_schedule, check_noise_scheduler, make_sampling_scheduler

__all__ = ["SAMPLERS", "SAMPLING_SCHEDULE", "DiffusionSampler", "GridDDIMScheduler", "check_noise_schedule", "check_noise_scheduler", "make_sampling_scheduler", "IDMEvaluator", "IDMTrainer", "autocast_dtype", "ema_with_warmup", "NoiseSampler", "seeded_generator", "idm_loss", "idm_loss_backward", "micro_batches", "one_step_denoise", "to_model_range", "unwrap", "weight_norm"]
