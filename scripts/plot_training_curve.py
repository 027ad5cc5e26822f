"""Plots validation metrics of a training run from its TensorBoard event files.

Every event file in ``--log_dir`` is read (:func:`bundle.visualize.read_scalars`): a resumed run's curves continue
across its files, and a run with ``--overwrite true`` has removed the earlier run's, so give each run its own
``output_dir`` or overwrite.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.visualize import read_scalars  # noqa: E402


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
