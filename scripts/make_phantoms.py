"""Writes the bundle's built-in synthetic brains (anatomical phantoms from the MNI ICBM152 template,
``bundle.data.anatomy``) anywhere, in the BraTS2020 layout.

The cases are named ``IDM_Phantom_XXX``, as the built-in ones: dataset discovery recognises them wherever
they are and never mixes them with real data (they are used only when a dataset_dir holds nothing else).

Usage (from the bundle root):
    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 16           # BraTS's grid, 1 mm
    python scripts/make_phantoms.py --output_dir /tmp/p --num_cases 4 --spacing 2.0 --seed 7
    python scripts/make_phantoms.py --output_dir data/phantoms --overwrite true   # replace existing case folders
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.data import PHANTOM_PREFIX, write_anatomy_cases
from bundle.flags import as_flag


def main(
    output_dir: str,
    num_cases: int = 16,
    spacing: float | Sequence[float] = 1.0,
    seed: int = 0,
    overwrite: bool | str = False,
) -> None:
    """Writes ``num_cases`` cases as ``output_dir/IDM_Phantom_XXX/IDM_Phantom_XXX_{t1,t1ce,t2,flair,seg}.nii.gz``
    on BraTS2020's frame (240×240×155 mm, stored as BraTS stores it), int16 images and uint8 BraTS labels.

    Args:
        output_dir: where the case folders go (created if missing).
        num_cases: number of cases.
        spacing: voxel size in mm, one number or three in [1, 20]: 1 is BraTS's own grid (240×240×155 voxels).
        seed: seed of the first case (case i uses seed + i; the built-in set is seed 0).
        overwrite: ``true`` replaces case folders that already exist; ``false`` (the default) refuses them
            before anything is written. The command line delivers ``true``/``false`` as strings.
    """
    try:
        cases = write_anatomy_cases(
            output_dir,
            num_cases,
            spacing,
            seed,
            prefix=PHANTOM_PREFIX,
            overwrite=as_flag(overwrite, "--overwrite"),
            progress=True,
        )
    except (ValueError, FileExistsError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"wrote {len(cases)} synthetic brains to {output_dir}")


if __name__ == "__main__":
    fire.Fire(main)
