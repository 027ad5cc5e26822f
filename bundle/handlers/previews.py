"""Mid-slice previews of validation samples in TensorBoard."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from ..visualize import mid_slices

__all__ = ["PreviewHandler"]


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
    are (x₀, one-step x̂₀) per modality, each as its three mid-slices, to TensorBoard with ``summary_writer``
    (the run's shared writer, which it flushes but never closes: :func:`bundle.handlers.summary_writer`).

    Uses the evaluator output keys ``image`` and ``denoised`` (values in [0, 1]) of its last batch.
    """

    def __init__(
        self, *, summary_writer: SummaryWriter, interval: int = 5, num_samples: int = 2, tag: str = "validation_preview"
    ) -> None:
        if interval < 1 or num_samples < 1:
            raise ValueError(f"interval and num_samples must be ≥ 1, got {interval}, {num_samples}.")
        self.summary_writer = summary_writer
        self.interval = interval
        self.num_samples = num_samples
        self.tag = tag
        self._runs = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._runs += 1
        if (self._runs - 1) % self.interval:
            return
        output = engine.state.output
        rows = []
        for sample in range(min(self.num_samples, output["image"].shape[0])):
            for channel in range(output["image"].shape[1]):
                rows.append(
                    torch.cat([_strip(output[key][sample, channel].detach().cpu()) for key in ("image", "denoised")], 1)
                )
        grid = torch.cat(rows, 0).clamp(0, 1)
        self.summary_writer.add_image(self.tag, grid[None], global_step=engine.state.epoch)
        self.summary_writer.flush()
