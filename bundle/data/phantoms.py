"""Ellipsoid phantoms in the BraTS2020 layout: small, fast test data (the built-in default data set is
:mod:`bundle.data.anatomy`'s, made from a real brain template).

Each case is a head-shaped volume made of ellipsoids with skin/skull, cerebrospinal fluid (CSF), grey and white matter,
ventricles, a tumour core with surrounding oedema, a smooth bias field and Rician-like noise. The
contrasts follow the physics of the two sequences the bundle models:

=============  ==========  ==========
tissue         T1          T2
=============  ==========  ==========
CSF            dark        bright
grey matter    grey        light grey
white matter   bright      dark grey
tumour core    dark        bright
oedema         darkish     bright
skull/scalp    bright fat  mid
=============  ==========  ==========

Shapes, sizes and positions vary with the case seed. Volumes are written as NIfTI with a BraTS-like
affine (LPS-flipped axes, 1.5 mm voxels by default, origin at the volume centre).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import GaussianSmooth

from .layout import write_brats_cases

__all__ = ["TISSUE_CONTRAST", "brats_affine", "make_ellipsoid_phantom", "write_ellipsoid_phantoms"]

# relative intensities per tissue label: background, scalp/skull, CSF, grey, white, oedema, tumour core
TISSUE_CONTRAST = {
    "t1": (0.0, 0.75, 0.15, 0.50, 0.80, 0.38, 0.28),
    "t1ce": (0.0, 0.75, 0.15, 0.50, 0.80, 0.40, 0.95),
    "t2": (0.0, 0.45, 1.00, 0.60, 0.40, 0.85, 0.75),
    "flair": (0.0, 0.40, 0.10, 0.55, 0.45, 0.95, 0.70),
}
BACKGROUND, SCALP, CSF, GREY, WHITE, OEDEMA, TUMOUR = range(7)


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, wobble: float, rng) -> np.ndarray:
    """Normalised radius field of a randomly deformed ellipsoid (≤ 1 inside)."""
    rel = (grid - centre[:, None, None, None]) / radii[:, None, None, None]
    r = np.sqrt((rel**2).sum(0))
    theta = np.arctan2(rel[1], rel[0])
    phi = np.arctan2(rel[2], np.sqrt(rel[0] ** 2 + rel[1] ** 2))
    k = rng.integers(2, 5, size=2)
    a = rng.uniform(-wobble, wobble, size=2)
    return r * (1 + a[0] * np.sin(k[0] * theta + rng.uniform(0, 6.3)) + a[1] * np.cos(k[1] * phi))


def make_ellipsoid_phantom(shape: tuple[int, int, int] = (96, 96, 72), seed: int = 0) -> dict[str, np.ndarray]:
    """One synthetic case: ``{"t1", "t1ce", "t2", "flair": float32 volumes in [0, ~1.2], "seg": uint8}``.

    ``seg`` uses the BraTS labels: 1 necrotic/tumour core, 2 oedema, 0 elsewhere.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    size = np.array(shape, dtype=np.float32)
    centre = size / 2 + rng.uniform(-0.04, 0.04, 3) * size
    head = rng.uniform(0.40, 0.46, 3) * size
    labels = np.zeros(shape, np.uint8)
    r_head = _ellipsoid(grid, centre, head, 0.03, rng)
    labels[r_head <= 1.0] = SCALP
    labels[r_head <= 0.90] = CSF
    brain = _ellipsoid(grid, centre, head * 0.86, 0.04, rng)
    labels[brain <= 1.0] = GREY
    white = brain + 0.08 * np.sin(grid[0] / rng.uniform(3, 6)) * np.cos(grid[1] / rng.uniform(3, 6))
    labels[white <= 0.78] = WHITE
    for side in (-1, 1):  # lateral ventricles
        v_centre = centre + np.array([side * 0.08, 0.02, 0.05]) * size
        ventricle = _ellipsoid(grid, v_centre, np.array([0.05, 0.16, 0.08]) * size * rng.uniform(0.8, 1.2), 0.1, rng)
        labels[ventricle <= 1.0] = CSF
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t_centre = centre + direction * head * 0.86 * rng.uniform(0.2, 0.55)
    t_radius = rng.uniform(0.06, 0.13) * size.min()
    tumour = _ellipsoid(grid, t_centre, np.full(3, t_radius) * rng.uniform(0.8, 1.25, 3), 0.15, rng)
    inside_brain = brain <= 1.0
    labels[(tumour <= rng.uniform(1.6, 2.2)) & inside_brain] = OEDEMA
    labels[(tumour <= 1.0) & inside_brain] = TUMOUR

    bias = 1 + 0.1 * np.sin(grid[0] / size[0] * np.pi + rng.uniform(0, 3)) * np.cos(grid[2] / size[2] * np.pi)
    volumes = {}
    for modality, contrast in TISSUE_CONTRAST.items():
        clean = np.asarray(contrast, np.float32)[labels]
        clean = _smooth(clean)
        noise = rng.normal(0, 0.02, (2, *shape)).astype(np.float32)
        volumes[modality] = (np.sqrt((clean * bias + noise[0]) ** 2 + noise[1] ** 2)).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[labels == OEDEMA] = 2
    seg[labels == TUMOUR] = 1
    volumes["seg"] = seg
    return volumes


def _smooth(volume: np.ndarray) -> np.ndarray:
    """Partial-volume blur at tissue boundaries (Gaussian, σ = 0.7 voxel)."""
    return GaussianSmooth(sigma=0.7)(volume[None])[0].numpy()


def brats_affine(shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """A BraTS-like affine: x and y flipped (LPS storage), origin at the volume centre."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = [spacing * shape[0] / 2, spacing * shape[1] / 2, -spacing * shape[2] / 2]
    return affine


def write_ellipsoid_phantoms(
    output_dir: str | Path,
    num_cases: int = 8,
    shape: tuple[int, int, int] = (96, 96, 72),
    spacing: float = 1.5,
    seed: int = 0,
    prefix: str = "BraTS20_Training",
    overwrite: bool = False,
) -> list[Path]:
    """Writes ``num_cases`` phantoms as ``output_dir/{prefix}_XXX/{prefix}_XXX_{t1,t1ce,t2,flair,seg}.nii.gz``.

    The default ``prefix`` imitates the BraTS2020 download (for tests of the BraTS layout). Returns the case
    directories. Existing case directories are refused unless ``overwrite``.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be ≥ 1, got {num_cases}.")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes ≥ 8, got {tuple(shape)}.")
    return write_brats_cases(
        output_dir,
        prefix,
        num_cases,
        lambda i: make_ellipsoid_phantom(tuple(shape), seed + i),
        brats_affine(tuple(shape), spacing),
        overwrite=overwrite,
        replace_hint="pass overwrite=True",
    )
