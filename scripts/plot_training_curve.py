"""Plots validation metrics of a training run from its TensorBoard event files.

Every event file in ``--log_dir`` is read (:func:`bundle.visualize.read_scalars`): a resumed run's curves continue
across its files, and a run with ``--overwrite true`` has removed the earlier run's, so give each run its own
``output_dir`` or overwrite.

The figure goes to ``--output`` (default: ``training_curve.png`` in ``--log_dir``, beside the event files it shows);
an existing file is refused unless ``--overwrite true``.

Usage (from the bundle root):
    python scripts/plot_training_curve.py --log_dir runs                      # writes runs/training_curve.png
    python scripts/plot_training_curve.py --log_dir /tmp/curve/R --output docs/training_curve.png --overwrite true
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.errors import BadInputError
from bundle.flags import as_flag
from bundle.visualize import read_scalars


def main(log_dir: str = "runs", output: str | None = None, title: str = "", overwrite: bool | str = False) -> None:
    """Writes a PNG of validation ε-MSE (and one-step PSNR/SSIM when logged) per epoch.

    Args:
        log_dir: the training run's ``output_dir``, whose TensorBoard event files are read.
        output: the PNG to write; default ``log_dir/training_curve.png``.
        title: a title over the panels.
        overwrite: ``true`` replaces an existing ``output``; ``false`` (the default) refuses it before any work.
    """
    try:
        overwrite = as_flag(overwrite, "--overwrite")
    except BadInputError as error:
        sys.exit(f"ERROR: {error}")
    output_path = Path(log_dir) / "training_curve.png" if output is None else Path(output)
    if output_path.is_dir():
        sys.exit(f"ERROR: --output {str(output_path)!r} is a folder; give the PNG file to write.")
    if output_path.exists() and not overwrite:
        sys.exit(
            f"ERROR: {str(output_path)!r} already exists; pass --overwrite true to replace it, or another --output."
        )
    scalars = read_scalars(log_dir, ["val_eps_mse", "val_psnr", "val_ssim"])
    if "val_eps_mse" not in scalars:
        sys.exit(
            f"ERROR: no val_eps_mse scalars in TensorBoard event files under {log_dir!r}; point --log_dir at a "
            "training run's output_dir."
        )
    panels = [tag for tag in ("val_eps_mse", "val_psnr", "val_ssim") if tag in scalars]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, tag in zip(axes[0], panels, strict=True):
        steps, values = zip(*scalars[tag], strict=True)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(tag)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=120)
    print(f"wrote {output_path}")


if __name__ == "__main__":
    fire.Fire(main)
