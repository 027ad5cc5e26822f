"""Writing cases in the BraTS2020 layout, for the built-in synthetic brains (:mod:`~bundle.data.anatomy`) and the
ellipsoid test phantoms (:mod:`~bundle.data.phantoms`) alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

__all__ = ["write_brats_cases"]


def write_brats_cases(
    output_dir: str | Path,
    prefix: str,
    num_cases: int,
    volumes: Callable[[int], Mapping[str, np.ndarray]],
    affine: np.ndarray,
    *,
    overwrite: bool,
    replace_hint: str,
    progress: bool = False,
) -> list[Path]:
    """Writes case i (0-based) of ``num_cases`` as ``output_dir/{prefix}_XXX/{prefix}_XXX_{name}.nii.gz`` (XXX =
    i + 1) for each ``name: volume`` of ``volumes(i)``, with ``affine`` and millimetre units; returns the case
    folders. Existing ones are refused before anything is written unless ``overwrite``, the message ending in
    ``replace_hint`` (how to replace them, e.g. ``"pass overwrite=True"``); ``progress`` shows a bar.

    Raises:
        FileExistsError: for existing case folders without ``overwrite``.
    """
    output_dir = Path(output_dir)
    cases = [output_dir / f"{prefix}_{i + 1:03d}" for i in range(num_cases)]
    existing = [str(c) for c in cases if c.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"Refusing to overwrite existing cases: {', '.join(existing[:3])}"
            + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            + f"; choose another output directory, or {replace_hint}."
        )
    for i, case in enumerate(tqdm(cases, desc="writing cases", unit="case", disable=not progress)):
        case.mkdir(parents=True, exist_ok=True)
        for name, volume in volumes(i).items():
            image = nib.Nifti1Image(volume, affine)
            image.header.set_xyzt_units("mm", "sec")
            nib.save(image, case / f"{case.name}_{name}.nii.gz")
    return cases
