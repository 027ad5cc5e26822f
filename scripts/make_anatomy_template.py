"""Rebuilds the brain template the built-in anatomy is made from, ``bundle/data/mni152_tissue.npz``, from the copy of
the MNI ICBM152 2009 nonlinear symmetric template (release a) that the ``nilearn`` wheel holds.

``nilearn`` is needed by this script only (``pip install nilearn``); the bundle and its tests read the file it writes.
The template's copyright and licence are in ``docs/data_license.txt``, which must ship with the file.

What it writes (1 mm, the template's own grid cropped to the brain's box plus a 2-voxel margin, RAS):

- ``gm``, ``wm``: the grey- and white-matter probability maps as uint8 (p × 255), zero outside the brain mask;
- ``mask``: nilearn's brain mask of the template (``load_mni152_brain_mask``), bit-packed (``np.packbits``), with
  ``shape``; the CSF map is the mask less grey and white matter (:func:`bundle.data.anatomy.load_template`);
- ``affine``: voxel → mm, translated so that the brain box's centre is at the origin (the case frame's centre);
- ``ventricle_centre``: the mm position (same frame) of the lateral ventricles, the centre of the per-case
  ventricle-size warp: the centroid of the voxels that are mostly CSF within the central fifth of the brain's box.

Usage (from the bundle root):
    pip install nilearn && python scripts/make_anatomy_template.py
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np

# bundle.data.anatomy.TEMPLATE_FILE, named here so that the script needs nilearn and numpy only, not the bundle's stack
TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "mni152_tissue.npz"


def main(output: str = str(TEMPLATE_FILE)) -> None:
    """Writes the template file (``bundle/data/mni152_tissue.npz`` by default) and prints its size.

    Args:
        output: where the ``.npz`` goes.
    """
    from nilearn import datasets  # the build-time dependency, only here

    mask_image = datasets.load_mni152_brain_mask(resolution=1)
    mask = mask_image.get_fdata() > 0
    grey = datasets.load_mni152_gm_template(resolution=1).get_fdata() * mask
    white = datasets.load_mni152_wm_template(resolution=1).get_fdata() * mask
    inside = np.argwhere(mask)
    low = np.maximum(inside.min(0) - 2, 0)
    high = np.minimum(inside.max(0) + 3, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    mask, grey, white = mask[box], grey[box], white[box]

    affine = mask_image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]  # the cropped grid's first voxel
    centre = affine[:3, :3] @ ((np.array(mask.shape) - 1) / 2) + affine[:3, 3]
    affine[:3, 3] -= centre  # the brain box's centre at the origin

    csf = np.clip(mask - grey - white, 0, 1)
    shape = np.array(mask.shape)
    central = tuple(slice(int(s * 0.4), int(s * 0.6) + 1) for s in shape)
    ventricles = np.zeros_like(mask)
    ventricles[central] = csf[central] > 0.5
    ventricle_centre = affine[:3, :3] @ np.argwhere(ventricles).mean(0) + affine[:3, 3]

    out = Path(output)
    np.savez_compressed(
        out,
        gm=np.round(grey * 255).astype(np.uint8),
        wm=np.round(white * 255).astype(np.uint8),
        mask=np.packbits(mask),
        shape=shape,
        affine=affine,
        ventricle_centre=ventricle_centre,
    )
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {'×'.join(map(str, shape))} voxels of 1 mm, ventricles at "
        f"{np.round(ventricle_centre, 1).tolist()} mm"
    )


if __name__ == "__main__":
    fire.Fire(main)
