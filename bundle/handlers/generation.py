"""Generation quality over training: samples of the validated network compared with the validation volumes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.networks.schedulers import Scheduler
from torch.utils.tensorboard import SummaryWriter

from ..diffusion.sampling import DiffusionSampler
from ..errors import BadInputError
from ..sample_quality import compare_to_real, quality_summary
from ..utils import unwrap

__all__ = ["GenerationMonitor"]

logger = logging.getLogger(__name__)


class GenerationMonitor:
    """At the validations of every ``interval``-th training epoch, generates ``num_samples`` volumes with the
    validator's network (the EMA weights when EMA is on) and compares them with the validation volumes
    (:func:`~bundle.sample_quality.compare_to_real`): each measure's generated-vs-real distance goes to TensorBoard
    as ``generation/<measure>`` and its largest real-vs-real distance as ``generation/<measure>_real_spread``, the
    fraction of the measures within that spread as ``generation/within_spread``, the distances summed up as
    ``generation/distance_ratio`` (:func:`~bundle.sample_quality.distance_ratio`), and the axial mid-slices of the
    first samples as the image ``generation_samples``; a log line names the measures outside the spread.

    The samples of every check start from the same noise (``seed``), so the curves follow the network, not the draw.
    Validation volumes are read from the validator's data loader; with fewer than 4 of them (two halves of two)
    there is no spread to compare with, and the monitor says so once and does nothing.

    Args:
        summary_writer: the run's shared writer (:func:`bundle.handlers.summary_writer`), flushed, never closed.
        scheduler: the sampling scheduler (e.g. :class:`~bundle.diffusion.GridDDIMScheduler` of the training's
            noise schedule).
        num_inference_steps: steps of the sampling chain.
        interval: training epochs between checks (a check runs at a validation whose epoch is a multiple of it).
        num_samples: volumes generated per check.
        modalities: the names of the channels.
        batch_size: volumes sampled at once.
        seed: seed of the samples' noise and of the real-vs-real splits.
    """

    def __init__(
        self,
        *,
        summary_writer: SummaryWriter,
        scheduler: Scheduler,
        num_inference_steps: int = 50,
        interval: int = 10,
        num_samples: int = 8,
        modalities: Sequence[str],
        batch_size: int = 4,
        seed: int = 0,
    ) -> None:
        for name, value, least in (
            ("generation_interval", interval, 1),
            ("generation_samples", num_samples, 2),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadInputError(
                    f"--{name} must be an integer ≥ {least} (0 turns the generation monitor off "
                    f"where it is --generation_interval), got {value!r}."
                )
        self.summary_writer = summary_writer
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.interval = interval
        self.num_samples = num_samples
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.seed = seed
        self.latest: dict | None = None  # the last comparison, as compare_to_real returns it
        self._warned = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # the validator runs at the trainer's epoch
        if epoch % self.interval:
            return
        real = torch.cat([batch["image"] for batch in engine.data_loader]).float()
        if len(real) < 4:
            if not self._warned:
                logger.warning(
                    "Generation monitor: %d validation volume(s), fewer than the 4 that two halves of the "
                    "real-vs-real spread need; it does nothing (raise --val_fraction or --num_phantoms).",
                    len(real),
                )
                self._warned = True
            return
        network = unwrap(engine.network)
        device = next(network.parameters()).device
        sampler = DiffusionSampler(self.scheduler, self.num_inference_steps, seed=self.seed, progress=False)
        generated = sampler.draw(network, self.num_samples, tuple(real.shape[1:]), self.batch_size, device)
        if not torch.isfinite(generated).all():
            logger.warning(
                "Epoch %d generation: the samples hold non-finite values (the sampling chain diverged); "
                "no measures this time.",
                epoch,
            )
            self.summary_writer.add_scalar("generation/within_spread", 0.0, epoch)
            return
        self.latest = compare_to_real(generated, real, self.modalities, seed=self.seed)
        for name, measure in self.latest["measures"].items():
            self.summary_writer.add_scalar(f"generation/{name}", measure["generated_vs_real"], epoch)
            self.summary_writer.add_scalar(f"generation/{name}_real_spread", measure["real_vs_real_max"], epoch)
        self.summary_writer.add_scalar("generation/within_spread", self.latest["within_spread"], epoch)
        self.summary_writer.add_scalar("generation/distance_ratio", self.latest["distance_ratio"], epoch)
        slices = generated[:4, :, :, :, generated.shape[-1] // 2]  # (B, C, X, Y): rows modalities, columns samples
        grid = torch.cat([torch.cat(list(slices[:, c].transpose(-1, -2).flip(-2)), 1) for c in range(slices.shape[1])])
        self.summary_writer.add_image("generation_samples", grid[None].clamp(0, 1), global_step=epoch)
        self.summary_writer.flush()
        logger.info("Epoch %d generation: %s", epoch, quality_summary(self.latest))
