"""Diffusion: the maths, the training objectives, the Eq. 8 loss, noise and patch sampling, the samplers and the Ignite
training/validation engines."""

from .ema import ema_with_warmup
from .engines import IDMEvaluator, IDMTrainer, autocast_dtype, given_modalities
from .loss import LOSS_TERMS, idm_loss, idm_loss_backward, micro_batches, weight_norm
from .maths import (
    predict_start_from_noise,
    predict_start_from_velocity,
    to_image_range,
    to_model_range,
    with_condition,
)
from .noise import NoiseSampler, seeded_generator
from .objectives import (
    OBJECTIVES,
    denoise_at,
    noise_schedule,
    objective_of,
    predict_start_and_noise,
    training_scheduler,
    training_target,
)
from .patches import PatchSampler
from .sampling import (
    DEFAULT_SAMPLERS,
    SAMPLERS,
    DiffusionSampler,
    DPMSolverScheduler,
    FlowEulerScheduler,
    GridDDIMScheduler,
    invert,
    make_sampler,
    monitoring_sampler,
    sample_from,
)

__all__ = [
    "DEFAULT_SAMPLERS",
    "LOSS_TERMS",
    "OBJECTIVES",
    "SAMPLERS",
    "DPMSolverScheduler",
    "DiffusionSampler",
    "FlowEulerScheduler",
    "GridDDIMScheduler",
    "IDMEvaluator",
    "IDMTrainer",
    "NoiseSampler",
    "PatchSampler",
    "autocast_dtype",
    "denoise_at",
    "ema_with_warmup",
    "given_modalities",
    "idm_loss",
    "idm_loss_backward",
    "invert",
    "make_sampler",
    "micro_batches",
    "monitoring_sampler",
    "noise_schedule",
    "objective_of",
    "predict_start_and_noise",
    "predict_start_from_noise",
    "predict_start_from_velocity",
    "sample_from",
    "seeded_generator",
    "to_image_range",
    "to_model_range",
    "training_scheduler",
    "training_target",
    "weight_norm",
    "with_condition",
]
