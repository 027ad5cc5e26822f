"""Plots validation metrics of a training run from its TensorBoard event files.

Usage (from the bundle root):
    python scripts/plot_training_curve.py --log_dir runs --output docs/training_curve.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(log_dir: str | Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), …]}`` over every event file under ``log_dir`` (later files win per step)."""
    found: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in tags:
            if tag in accumulator.Tags()["scalars"]:
                found[tag].update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in found.items() if values}


def main(log_dir: str = "runs", output: str = "docs/training_curve.png", title: str = "") -> None:
    """Writes a PNG of validation ε-MSE (and one-step PSNR/SSIM when logged) per epoch."""
    scalars = read_scalars(log_dir, ["val_eps_mse", "val_psnr", "val_ssim"])
    if "val_eps_mse" not in scalars:
        sys.exit(f"ERROR: no val_eps_mse scalars in TensorBoard event files under {log_dir!r}; point --log_dir at a "
                 "training run's output_dir.")
    panels = [tag for tag in ("val_eps_mse", "val_psnr", "val_ssim") if tag in scalars]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, tag in zip(axes[0], panels):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(tag)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    fire.Fire(main)
