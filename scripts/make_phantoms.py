"""Writes synthetic BraTS2020-layout phantoms (the bundle's built-in default data) anywhere.

The cases are named ``IDM_Phantom_XXX``, as the built-in ones: dataset discovery recognises them wherever
they are and never mixes them with real data (they are used only when a dataset_dir holds nothing else).

Usage (from the bundle root):
    python scripts/make_phantoms.py --output_dir data/phantoms --num_cases 16
    python scripts/make_phantoms.py --output_dir /tmp/p --num_cases 4 --shape "[64,64,48]" --spacing 2.0 --seed 7
    python scripts/make_phantoms.py --output_dir data/phantoms --overwrite true   # replace existing case folders
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.data import PHANTOM_PREFIX, write_brats_phantoms
from bundle.flags import as_flag


def main(
    output_dir: str,
    num_cases: int = 16,
    shape: tuple[int, int, int] = (96, 96, 72),
    spacing: float = 1.5,
    seed: int = 0,
    overwrite: bool | str = False,
) -> None:
    """Writes ``num_cases`` cases as ``output_dir/IDM_Phantom_XXX/IDM_Phantom_XXX_{t1,t1ce,t2,flair,seg}.nii.gz``.

    Args:
        output_dir: where the case folders go (created if missing).
        num_cases: number of cases.
        shape: volume size in voxels (three integers ≥ 8).
        spacing: voxel size in mm.
        seed: seed of the first case (case i uses seed + i).
        overwrite: ``true`` replaces case folders that already exist; ``false`` (the default) refuses them
            before anything is written. The command line delivers ``true``/``false`` as strings.
    """
    try:
        cases = write_brats_phantoms(
            output_dir,
            num_cases,
            tuple(int(s) for s in shape),
            float(spacing),
            seed,
            prefix=PHANTOM_PREFIX,
            overwrite=as_flag(overwrite, "--overwrite"),
        )
    except (ValueError, FileExistsError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"wrote {len(cases)} phantom cases to {output_dir}")


if __name__ == "__main__":
    fire.Fire(main)
