"""Built-in BraTS-like anatomy: brain MRI cases made from a real brain template, the bundle's default data set.

The anatomy is the MNI ICBM152 2009 nonlinear symmetric template's tissue maps (grey and white matter, and CSF as the
brain mask less both; :data:`TEMPLATE_FILE`, rebuilt by ``scripts/make_anatomy_template.py``; copyright and licence
in ``docs/data_license.txt``), skull-stripped as BraTS is. Each case, all of it from its seed:

1. the template moved by a smooth random deformation: the lateral ventricles widened or narrowed by a radial warp
   about their centre, a smooth elastic field and a random rotation, scaling and translation (MONAI's
   ``RandAffineGrid``), in one resampling onto the case's grid (:func:`case_grid`: BraTS2020's frame, 240×240×155 mm
   stored LPS as BraTS is, at the case's voxel size), the template smoothed first against aliasing on coarse grids;
2. in most cases a tumour in BraTS's labels: necrotic core (1), enhancing rim (4) and oedema (2) that spreads
   through the tissue it reaches, of random size and place in the brain, with a wobbly outline (steps 1 and 2:
   :func:`case_anatomy`);
3. four sequences (:func:`make_case`) from the tissue fractions with the contrasts of each
   (:data:`SEQUENCE_CONTRAST`: T1 white > grey > CSF; T2 CSF > grey > white; FLAIR CSF dark, oedema bright; T1ce the
   enhancing rim bright), each tissue's intensity varied per case, a fine anatomical texture shared by the
   sequences, a smooth bias field and Rician noise (MONAI's ``RandBiasField`` and ``RandRicianNoise``), zero outside
   the brain, scaled to int16 as BraTS is.

:func:`write_anatomy_cases` writes them in the BraTS2020 layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.transforms import GaussianSmooth, RandAffineGrid, RandBiasField, RandRicianNoise, Resample
from monai.transforms.utils import create_grid

from .layout import write_brats_cases

__all__ = [
    "BRATS_FRAME_MM",
    "BRATS_MODALITIES",
    "PHANTOM_FOLDER",
    "PHANTOM_PREFIX",
    "SEQUENCE_CONTRAST",
    "TEMPLATE_FILE",
    "anatomy_spacing",
    "case_anatomy",
    "case_grid",
    "load_template",
    "make_case",
    "write_anatomy_cases",
]

TEMPLATE_FILE = Path(__file__).with_name("mni152_tissue.npz")
PHANTOM_FOLDER = "IDM_phantoms"  # the built-in default data set, below dataset_dir
PHANTOM_PREFIX = "IDM_Phantom"  # its case ids: IDM_Phantom_001, … (never a real dataset's)
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_FRAME_MM = (240.0, 240.0, 155.0)  # BraTS2020's field of view: 240×240×155 voxels of 1 mm
BRAIN_SPAN_MARGIN = 1.05

TISSUES = ("csf", "grey", "white", "necrosis", "enhancing", "oedema")
# each tissue's mean intensity per sequence (of the sequence's range), varied per case by ±CONTRAST_JITTER
SEQUENCE_CONTRAST = {  # in BRATS_MODALITIES order
    "t1": (0.15, 0.55, 0.80, 0.20, 0.45, 0.45),
    "t1ce": (0.15, 0.55, 0.80, 0.20, 1.00, 0.45),
    "t2": (1.00, 0.60, 0.40, 0.90, 0.70, 0.85),
    "flair": (0.08, 0.55, 0.42, 0.35, 0.70, 0.95),
}
CONTRAST_JITTER = 0.08
OEDEMA_WEIGHT = 0.7  # oedema's share of an infiltrated voxel's intensity; the tissue below shows through the rest
TEXTURE = 0.05  # amplitude of the anatomical texture (relative, shared by the sequences)
TUMOUR_PROBABILITY = 0.85
DEFORMATION_MM = 3.0  # the elastic field's control-point displacement (standard deviation) …
CONTROL_SPACING_MM = 30.0  # … on a grid of this spacing
VENTRICLE_WARP = (-0.15, 0.45)  # the radial warp's strength: > 0 widens the ventricles
VENTRICLE_WARP_SIGMA_MM = 22.0


def case_grid(spacing: float | Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of BraTS2020's frame at ``spacing`` mm (one number or three): the 240×240×155 mm field of view
    in voxels of that size, stored with x and y flipped (LPS) as BraTS's files are, the frame's centre at the origin."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    shape = tuple(math.ceil(extent / s - 1e-6) for extent, s in zip(BRATS_FRAME_MM, spacing, strict=True))
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, affine


def anatomy_spacing(spatial_size: Sequence[int]) -> float:
    """The voxel size (mm) of the built-in cases for a training run that resizes each case's box to ``spatial_size``:
    the coarsest of 1, 1.5, 2, 3, 4 and 6 mm at which the brain (at least 140 mm along each axis) still spans
    ``BRAIN_SPAN_MARGIN`` times the largest side of ``spatial_size``, so that resizing only shrinks. Coarser cases are
    smaller on disk and faster to write: 2 mm for the default 64³, 6 mm for a 16³ test."""
    needed = 140.0 / (BRAIN_SPAN_MARGIN * max(spatial_size))
    return max([s for s in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0) if s <= needed], default=1.0)


@lru_cache(maxsize=1)
def load_template() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The template's tissue fractions (3, X, Y, Z) float32 (CSF, grey, white; summing to the brain mask), their
    affine (1 mm, the brain box's centre at the origin) and the lateral ventricles' centre (mm), from
    :data:`TEMPLATE_FILE`."""
    with np.load(TEMPLATE_FILE) as stored:
        shape = tuple(int(s) for s in stored["shape"])
        mask = np.unpackbits(stored["mask"], count=int(np.prod(shape))).reshape(shape).astype(np.float32)
        grey = stored["gm"].astype(np.float32) / 255
        white = stored["wm"].astype(np.float32) / 255
        affine, ventricles = stored["affine"], stored["ventricle_centre"]
    csf = np.clip(mask - grey - white, 0, 1)
    return torch.from_numpy(np.stack([csf, grey, white])), affine, ventricles


@lru_cache(maxsize=4)
def _smoothed_template(spacing: tuple[float, float, float]) -> torch.Tensor:
    """The template's fractions smoothed against aliasing for a grid of ``spacing`` mm: a Gaussian of σ = 0.42
    √(s² − 1) mm per axis (a 1 mm voxel's blur topped up to an s mm voxel's), unsmoothed at 1 mm."""
    fractions = load_template()[0]
    sigma = [0.42 * math.sqrt(max(s * s - 1.0, 0.0)) for s in spacing]
    return GaussianSmooth(sigma=sigma)(fractions) if max(sigma) > 0 else fractions


def _grid_points(shape: Sequence[int], affine: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """World positions (3, *shape), in mm, that each voxel of the case grid samples the template at: the grid's own
    positions moved by a smooth elastic field (normal displacements of :data:`DEFORMATION_MM` on control points every
    :data:`CONTROL_SPACING_MM`, upsampled trilinearly) and a random rotation, scaling and translation (MONAI's
    ``RandAffineGrid``)."""
    spacing = np.abs(np.diag(affine)[:3])
    control = [max(2, math.ceil((n - 1) * s / CONTROL_SPACING_MM) + 1) for n, s in zip(shape, spacing, strict=True)]
    displacement = rng.normal(0.0, DEFORMATION_MM, (3, *control)) / spacing[:, None, None, None]
    voxels = create_grid(spatial_size=shape, backend="torch", dtype=torch.float32)  # (4, *S): centred, homogeneous
    voxels[:3] += torch.nn.functional.interpolate(
        torch.as_tensor(displacement, dtype=torch.float32)[None],
        size=tuple(shape),
        mode="trilinear",
        align_corners=True,
    )[0]
    move = RandAffineGrid(
        rotate_range=[math.radians(6)] * 3, scale_range=[0.08] * 3, translate_range=[4.0 / s for s in spacing]
    )
    move.set_random_state(int(rng.integers(2**31)))
    voxels = move(grid=voxels)[:3]
    index = voxels + ((torch.tensor(shape, dtype=torch.float32) - 1) / 2)[:, None, None, None]
    rotation = torch.as_tensor(affine[:3, :3], dtype=torch.float32)
    origin = torch.as_tensor(affine[:3, 3], dtype=torch.float32)[:, None, None, None]
    return torch.einsum("ij,j...->i...", rotation, index) + origin


def _widen_ventricles(points: torch.Tensor, centre: np.ndarray, strength: float) -> torch.Tensor:
    """``points`` (3, *S) pulled towards the ventricles' ``centre`` by ``strength`` × a Gaussian of the distance (σ
    :data:`VENTRICLE_WARP_SIGMA_MM`): sampling nearer the centre shows what is there larger (strength > 0)."""
    offset = points - torch.as_tensor(centre, dtype=torch.float32)[:, None, None, None]
    weight = torch.exp(-(offset**2).sum(0) / (2 * VENTRICLE_WARP_SIGMA_MM**2))
    return points - strength * weight * offset


def _sample_template(points: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """The (smoothed) template's fractions (3, *S) at world ``points`` (3, *S) mm; zero outside it."""
    template = _smoothed_template(spacing)
    _, affine, _ = load_template()
    inverse = torch.as_tensor(np.linalg.inv(affine), dtype=torch.float32)
    index = torch.einsum("ij,j...->i...", inverse[:3, :3], points) + inverse[:3, 3, None, None, None]
    centre = (torch.tensor(template.shape[1:], dtype=torch.float32) - 1) / 2
    grid = torch.cat([index - centre[:, None, None, None], torch.ones_like(index[:1])])
    return Resample(mode="bilinear", padding_mode="zeros")(template, grid).as_tensor().clamp(0, 1)


def _smooth_noise(shape: Sequence[int], sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """A smooth random field (*shape) of unit standard deviation: white noise blurred by σ voxels."""
    noise = GaussianSmooth(sigma=sigma)(torch.from_numpy(rng.standard_normal((1, *shape)).astype(np.float32)))[0]
    return noise / noise.std().clamp_min(1e-6)


def _tumour(
    fractions: torch.Tensor, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A tumour in the brain of ``fractions`` (3, *S): (soft maps (3, *S) of necrosis, enhancing rim and oedema,
    BraTS labels (*S) uint8: 1 necrotic core, 4 enhancing, 2 oedema). Its centre is a voxel mostly of white matter,
    its radius 8–25 mm, its outline wobbled by a smooth random field; oedema reaches 1.4–2.2 radii into the brain."""
    shape = fractions.shape[1:]
    brain = fractions.sum(0)
    candidates = torch.nonzero((fractions[2] > 0.6) & (brain > 0.99))
    centre = candidates[int(rng.integers(len(candidates)))].float()
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    position = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    millimetres = (position - centre[:, None, None, None]) * torch.as_tensor(spacing, dtype=torch.float32)[
        :, None, None, None
    ]
    radius = float(rng.uniform(8.0, 25.0))
    stretch = torch.as_tensor(rng.uniform(0.75, 1.3, 3), dtype=torch.float32)[:, None, None, None]
    wobble = _smooth_noise(shape, sigma=max(1.0, 6.0 / float(spacing.mean())), rng=rng)
    distance = ((millimetres / stretch) ** 2).sum(0).sqrt() / radius * (1 + 0.18 * wobble)
    inside = brain > 0.5
    core = float(rng.uniform(0.3, 0.7))
    reach = float(rng.uniform(1.4, 2.2))
    labels = torch.zeros(shape, dtype=torch.uint8)
    labels[(distance < reach) & inside] = 2
    labels[(distance < 1.0) & inside] = 4
    labels[(distance < core) & inside] = 1
    soft = torch.stack([(labels == value).float() for value in (1, 4, 2)])
    return GaussianSmooth(sigma=0.6)(soft).clamp(0, 1), labels


def case_anatomy(spacing: float | Sequence[float], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The anatomy of case ``seed`` on BraTS2020's frame at ``spacing`` mm (:func:`case_grid`): (tissue fractions
    (3, *S): CSF, grey, white matter; the tumour's soft maps (3, *S): necrosis, enhancing rim, oedema; its BraTS
    labels (*S) uint8, all zero in the cases drawn without a tumour, 1 − :data:`TUMOUR_PROBABILITY` of them)."""
    rng = np.random.default_rng([seed, 0])
    shape, affine = case_grid(spacing)
    voxel = tuple(float(s) for s in np.abs(np.diag(affine)[:3]))
    _, _, ventricles = load_template()
    points = _widen_ventricles(_grid_points(shape, affine, rng), ventricles, float(rng.uniform(*VENTRICLE_WARP)))
    fractions = _sample_template(points, voxel)
    if rng.random() < TUMOUR_PROBABILITY:
        lesion, labels = _tumour(fractions, np.asarray(voxel), rng)
    else:
        lesion, labels = torch.zeros((3, *shape)), torch.zeros(shape, dtype=torch.uint8)
    return fractions, lesion, labels


def make_case(
    spacing: float | Sequence[float], seed: int, modalities: Sequence[str] = BRATS_MODALITIES
) -> dict[str, np.ndarray]:
    """Case ``seed`` (:func:`case_anatomy`) as BraTS writes it: ``{modality: int16 volume}`` for each of
    ``modalities`` (each from its own random stream: the same whichever others are asked for; zero outside the
    brain) and ``"seg"``, the tumour's BraTS labels (uint8)."""
    fractions, (necrosis, enhancing, oedema), labels = case_anatomy(spacing, seed)
    brain = ((fractions.sum(0) > 0.5) | (labels > 0)).float()
    texture = 1 + TEXTURE * _smooth_noise(labels.shape, sigma=0.8, rng=np.random.default_rng([seed, 1]))
    healthy = (1 - necrosis - enhancing).clamp(0, 1)
    case = {}
    for modality in modalities:
        rng = np.random.default_rng([seed, 2 + BRATS_MODALITIES.index(modality)])
        means = np.asarray(SEQUENCE_CONTRAST[modality]) * rng.uniform(1 - CONTRAST_JITTER, 1 + CONTRAST_JITTER, 6)
        tissue = torch.einsum("k,k...->...", torch.as_tensor(means[:3], dtype=torch.float32), fractions) * texture
        tissue = (1 - OEDEMA_WEIGHT * oedema) * tissue + OEDEMA_WEIGHT * oedema * float(means[5])
        image = (healthy * tissue + necrosis * float(means[3]) + enhancing * float(means[4]))[None]
        bias = RandBiasField(degree=3, coeff_range=(0.0, 0.12), prob=1.0)
        bias.set_random_state(int(rng.integers(2**31)))
        noise = RandRicianNoise(prob=1.0, std=0.015, sample_std=False)
        noise.set_random_state(int(rng.integers(2**31)))
        image = torch.as_tensor(noise(bias(image)))[0] * brain
        scale = float(rng.uniform(500.0, 1500.0))
        case[modality] = np.round(image.numpy() * scale).clip(0, np.iinfo(np.int16).max).astype(np.int16)
    case["seg"] = labels.numpy()
    return case


def write_anatomy_cases(
    output_dir: str | Path,
    num_cases: int,
    spacing: float | Sequence[float],
    seed: int = 0,
    prefix: str = PHANTOM_PREFIX,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Writes ``num_cases`` cases (:func:`make_case`, case i of seed ``seed + i``) in the BraTS2020 layout:
    ``output_dir/{prefix}_XXX/{prefix}_XXX_{t1,t1ce,t2,flair,seg}.nii.gz`` on BraTS's frame at ``spacing`` mm.
    Returns the case folders; existing ones are refused unless ``overwrite``.

    Raises:
        ValueError: for ``num_cases`` < 1 or a ``spacing`` that is not one or three sizes in [1, 20] mm.
        FileExistsError: for existing case folders without ``overwrite`` (before anything is written).
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be ≥ 1, got {num_cases}.")
    sizes = np.atleast_1d(np.asarray(spacing, dtype=float))
    if sizes.size not in (1, 3) or not ((sizes >= 1) & (sizes <= 20)).all():
        raise ValueError(f"spacing must be one or three voxel sizes in [1, 20] mm, got {spacing!r}.")
    return write_brats_cases(
        output_dir,
        prefix,
        num_cases,
        lambda i: make_case(spacing, seed + i),
        case_grid(spacing)[1],
        overwrite=overwrite,
        replace_hint="replace them with --overwrite true",
        progress=progress,
    )
