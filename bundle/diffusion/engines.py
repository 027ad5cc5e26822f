"""Ignite engines (MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator``) for IDM training and validation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import Scheduler
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..errors import BadInputError, NonFiniteLossError
from ..utils import unwrap
from .loss import idm_loss, idm_loss_backward
from .maths import to_image_range, to_model_range
from .noise import NoiseSampler, seeded_generator
from .objectives import denoise_at, training_target
from .patches import PatchSampler
from .update_in_backward import UpdateInBackward, check_whole_batch

__all__ = ["IDMEvaluator", "IDMTrainer", "autocast_dtype", "given_modalities"]


def given_modalities(batchdata: dict, device: torch.device | str) -> torch.Tensor | None:
    """A batch's ``"condition"`` (the given modalities of a conditioned model, :func:`~bundle.data.preprocessing`) in
    the model's [−1, 1] on ``device``; None for an unconditional model's batch."""
    condition = batchdata.get("condition")
    return None if condition is None else to_model_range(condition.to(device))


def autocast_dtype(amp: bool, amp_kwargs: dict | None = None) -> torch.dtype | None:
    """The autocast dtype of :class:`IDMTrainer`'s ``amp`` setting: bfloat16, or None without ``amp``.

    Raises:
        BadInputError: for ``amp_kwargs`` other than ``{"dtype": torch.bfloat16}``.
    """
    if amp_kwargs not in (None, {}, {"dtype": torch.bfloat16}):
        raise BadInputError(
            f"amp_kwargs may only be {{'dtype': torch.bfloat16}} (the default); got {amp_kwargs!r}. float16 "
            "autocast needs loss scaling, whose overflowing steps the non-finite guard would stop."
        )
    return torch.bfloat16 if amp else None


class IDMTrainer(SupervisedTrainer):
    """One iteration: x₀ ∈ [−1, 1], ε and t from ``noise_sampler``, ``x_t = scheduler.add_noise``, Eq. 8 loss on the
    objective's target (ε, or a rectified flow's velocity: :func:`~bundle.diffusion.objectives.training_target`) and
    its backward (a conditioned model's batches also hold ``condition``, the given modalities, which the network reads
    beside x_t and which the output dict keeps), ``micro_batch_size`` samples at a time
    (:func:`~bundle.diffusion.loss.idm_loss_backward`), AdamW step, EMA update.

    ``LOSS_COMPLETED`` fires once the whole batch is back-propagated and before the optimizer step, so a
    handler there (the non-finite guard) can stop training before a bad loss reaches the weights: a
    :class:`~bundle.errors.NonFiniteLossError` raised there skips the step and the EMA update, ends the
    iteration as usual (its handlers log the bad loss) and terminates the run (no ``EPOCH_COMPLETED``, hence
    no checkpoint, and no ``COMPLETED``); :meth:`run` raises it once ignite has stopped, so that it reaches
    the caller without ignite's error log and the tracebacks of the ``EXCEPTION_RAISED`` handlers. The
    output dict holds ``image``, ``label`` (ε), ``timesteps`` (t), ``pred``, ``loss`` and each Eq. 8 term by name
    (``prediction_mse``, ``weight_norm``, ``reconstruction``), decollated per sample after the step as MONAI
    trainers do (so stock handlers such as ``StatsHandler`` and ``MLFlowHandler`` read ``loss`` with their
    defaults).

    Args:
        scheduler: the training noise scheduler (``add_noise``; a ``DDPMScheduler``, or an ``RFlowScheduler`` for
            the rectified flow objective: :func:`~bundle.diffusion.objectives.training_scheduler`).
        noise_sampler: source of ε and t (:class:`~bundle.diffusion.noise.NoiseSampler`).
        lambda_rec, lambda_l2: λ_R and λ_L2 of Eq. 8.
        micro_batch_size: samples back-propagated at once (gradient accumulation: the same gradient as the
            whole batch, with the activation memory of ``micro_batch_size`` samples), or None for the whole
            batch at once.
        ema: ``torch.optim.swa_utils.AveragedModel`` of the network, updated after each step, or None.
        patch_sampler: patch training: each step trains on the patches it cuts from the batch, each with its voxels'
            coordinates after the condition (:class:`~bundle.diffusion.patches.PatchSampler`; the network reads them:
            ``InvertibleDiffusionUNet(coordinates=True)``), or None for whole volumes.
        amp: mixed precision: the forward passes run under ``torch.autocast`` on the training device in
            bfloat16 (float32's range, so no loss scaling); the invertible trunk keeps its state in float32
            (:mod:`bundle.networks.engine`). ``amp_kwargs`` may only repeat ``{"dtype": torch.bfloat16}``:
            float16 would need a gradient scaler, whose skipped overflow steps the non-finite guard stops.
        optimizer_in_backward: each weight's AdamW and EMA updates run as soon as its gradient is complete, and the
            gradient is freed (:class:`~bundle.diffusion.update_in_backward.UpdateInBackward`): no full set of
            gradients exists (4 bytes per parameter less at the peak). Needs the whole batch at once
            (``micro_batch_size`` None), one process (no DDP) and a fused AdamW.
        Other arguments: as ``SupervisedTrainer`` (``loss_function`` is Eq. 8).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler,
        noise_sampler: NoiseSampler,
        lambda_rec: float = 0.0,
        lambda_l2: float = 1e-4,
        micro_batch_size: int | None = None,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        optimizer_in_backward: bool = False,
        patch_sampler: PatchSampler | None = None,
        **kwargs,
    ) -> None:
        self.amp_dtype = autocast_dtype(amp, amp_kwargs)
        if optimizer_in_backward and micro_batch_size is not None:
            check_whole_batch(getattr(train_data_loader, "batch_size", None), micro_batch_size)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=idm_loss,
            **kwargs,
        )
        self.scheduler = scheduler
        self.noise_sampler = noise_sampler
        self.lambda_rec = lambda_rec
        self.lambda_l2 = lambda_l2
        self.micro_batch_size = micro_batch_size
        self.ema = ema
        self.patch_sampler = patch_sampler
        self.update_in_backward = UpdateInBackward(network, optimizer, ema) if optimizer_in_backward else None
        self.stopped_by: NonFiniteLossError | None = None

    def run(self) -> None:
        """Trains; raises the :class:`~bundle.errors.NonFiniteLossError` that stopped the run, if one did."""
        self.stopped_by = None
        super().run()
        if self.stopped_by is not None:
            raise self.stopped_by

    def _iteration(self, engine: IDMTrainer, batchdata: dict) -> dict:  # type: ignore[override]
        images = to_model_range(batchdata["image"].to(engine.state.device))
        condition = given_modalities(batchdata, engine.state.device)
        if self.patch_sampler is not None:
            images, condition = self.patch_sampler.sample(images, condition)
        noise, timesteps = self.noise_sampler.sample(images)
        noisy = self.scheduler.add_noise(images, noise, timesteps)
        target = training_target(self.scheduler, images, noise)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: noise, "timesteps": timesteps}
        if condition is not None:
            engine.state.output["condition"] = condition
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        prediction, loss, terms = idm_loss_backward(
            engine.network,
            noisy,
            timesteps,
            target,
            self.lambda_rec,
            self.lambda_l2,
            self.micro_batch_size,
            self.amp_dtype,
            condition,
            self.update_in_backward,
        )
        engine.state.output.update({Keys.PRED: prediction, Keys.LOSS: loss} | terms)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        try:
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        except NonFiniteLossError as error:
            self.stopped_by = error
            engine.terminate(skip_completed=True)
        else:
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.update_in_backward is None:  # (else the weights and the EMA were updated in backward)
                engine.optimizer.step()
                if self.ema is not None:
                    self.ema.update_parameters(unwrap(engine.network))
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class IDMEvaluator(SupervisedEvaluator):
    """Validation at fixed timesteps with fixed noise: for each t in ``timesteps`` the network predicts from ``x_t``
    (and a conditioned model's ``condition``), and ε̂ and the one-step estimate x̂₀ are formed from its prediction
    (:func:`~bundle.diffusion.objectives.denoise_at`; ε̂ for either objective).

    Output dict: ``eps_pred`` and ``noise`` (ε̂ and ε, stacked over the timesteps along the batch axis),
    ``denoised`` and ``image`` (x̂₀ and x₀ in [0, 1], likewise), for ε-MSE and PSNR/SSIM handlers.

    Args:
        scheduler: the training noise scheduler.
        timesteps: the fixed timesteps.
        seed: seed of the validation noise: batch i's comes from :func:`seeded_generator` of (seed, i), the same
            every validation run.
        Other arguments: as ``SupervisedEvaluator``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: nn.Module,
        scheduler: Scheduler,
        timesteps: Sequence[int],
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, decollate=False, **kwargs)
        bad = [t for t in timesteps if not 0 <= int(t) < scheduler.num_train_timesteps]
        if bad or not timesteps:
            raise ValueError(
                f"Validation timesteps {list(timesteps)} must be non-empty and in "
                f"[0, {scheduler.num_train_timesteps - 1}]."
            )
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in timesteps]
        self.seed = seed

    def _iteration(self, engine: IDMEvaluator, batchdata: dict) -> dict:  # type: ignore[override]
        images = to_model_range(batchdata["image"].to(engine.state.device))
        condition = given_modalities(batchdata, engine.state.device)
        generator = seeded_generator(self.seed, engine.state.iteration)
        outputs: dict[str, list[torch.Tensor]] = {"eps_pred": [], "noise": [], "denoised": [], "image": []}
        engine.network.eval()
        with torch.no_grad():
            for t in self.timesteps:
                step = denoise_at(engine.network, self.scheduler, images, t, generator, condition)
                outputs["eps_pred"].append(step["eps_pred"])
                outputs["noise"].append(step["noise"])
                outputs["denoised"].append(to_image_range(step["denoised"]))
                outputs["image"].append(to_image_range(images))
        engine.state.output = {k: torch.cat(v) for k, v in outputs.items()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
