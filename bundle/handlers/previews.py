"""Mid-slice previews of validation samples in TensorBoard."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from torch.utils.tensorboard import SummaryWriter

from ..visualize import mid_slices

__all__ = ["DIFFUSION_OUTPUT", "PreviewHandler"]

DIFFUSION_OUTPUT = from_engine(["image", "denoised"])  # the diffusion evaluator's x₀ and one-step x̂₀, in [0, 1]


def _strip(volume: torch.Tensor) -> torch.Tensor:
    """The three mid-slices of (X, Y, Z) side by side, each resized to a common height."""
    if volume.ndim == 2:
        return volume
    slices = mid_slices(volume)
    height = max(s.shape[0] for s in slices)
    resized = [
        torch.nn.functional.interpolate(
            s[None, None].float(), size=(height, max(1, s.shape[1] * height // s.shape[0]))
        )[0, 0]
        for s in slices
    ]
    return torch.cat(resized, dim=1)


class PreviewHandler:
    """Every ``interval`` validation runs, writes for ``num_samples`` validation samples a grid whose rows
    are (real, estimate) per modality, each as its three mid-slices, to TensorBoard with ``summary_writer``
    (the run's shared writer, which it flushes but never closes: :func:`bundle.handlers.summary_writer`).

    ``output_transform`` gives (real, estimate) of the evaluator's last batch in [0, 1], each a (B, C, *S) tensor or a
    list of (C, *S) ones (a decollated output): by default its ``image`` and ``denoised`` (x₀ and the one-step x̂₀ of
    the diffusion evaluator); ``configs/regression.json`` gives its target and prediction.
    """

    def __init__(
        self,
        *,
        summary_writer: SummaryWriter,
        interval: int = 5,
        num_samples: int = 2,
        tag: str = "validation_preview",
        output_transform: Callable = DIFFUSION_OUTPUT,
    ) -> None:
        if interval < 1 or num_samples < 1:
            raise ValueError(f"interval and num_samples must be ≥ 1, got {interval}, {num_samples}.")
        self.summary_writer = summary_writer
        self.interval = interval
        self.num_samples = num_samples
        self.tag = tag
        self.output_transform = output_transform
        self._runs = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._runs += 1
        if (self._runs - 1) % self.interval:
            return
        real, estimate = (
            torch.stack(list(v)) if isinstance(v, (list, tuple)) else v
            for v in self.output_transform(engine.state.output)
        )
        rows = []
        for sample in range(min(self.num_samples, real.shape[0])):
            for channel in range(real.shape[1]):
                pair = (real[sample, channel], estimate[sample, channel])
                rows.append(torch.cat([_strip(v.detach().cpu()) for v in pair], 1))
        grid = torch.cat(rows, 0).clamp(0, 1)
        self.summary_writer.add_image(self.tag, grid[None], global_step=engine.state.epoch)
        self.summary_writer.flush()
