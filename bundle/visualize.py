"""Mid-slice views of volumes (TensorBoard previews, the PNG written with each generated sample) and the
scalars of TensorBoard event files (training curves)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["mid_slices", "read_scalars", "save_mid_slices_png"]

VIEWS = ("sagittal", "coronal", "axial")


def mid_slices(volume: torch.Tensor) -> list[torch.Tensor]:
    """The three orthogonal mid-slices of a (X, Y, Z) volume (RAS: sagittal, coronal, axial), each
    transposed so the second axis runs left to right on screen."""
    return [volume.select(axis, volume.shape[axis] // 2).T.flip(0) for axis in range(3)]


def save_mid_slices_png(volume: torch.Tensor, names: Sequence[str], path: str | Path) -> None:
    """A figure with one row per channel of ``volume`` (C, X, Y, Z) and its three mid-slices, grey scale [0, 1]."""
    volume = volume.detach().float().cpu()
    fig, axes = plt.subplots(volume.shape[0], 3, figsize=(7.5, 2.6 * volume.shape[0]), squeeze=False)
    for row, name in enumerate(names):
        for col, (view, image) in enumerate(zip(VIEWS, mid_slices(volume[row]), strict=True)):
            axes[row][col].imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_axis_off()
            axes[row][col].set_title(f"{name} {view}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_scalars(log_dir: str | Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), …]}`` over every event file under ``log_dir`` (later files win per step).

    Every file counts: a run resumed with ``--resume true`` continues its curves in new files. The files of another
    run in the same folder would interleave with these, which is why a training run with ``--overwrite true``
    removes the earlier event files of its ``output_dir`` before it starts (a new run without it is warned).
    """
    found: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in tags:
            if tag in accumulator.Tags()["scalars"]:
                found[tag].update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in found.items() if values}
