"""The preprocessing chain: load each modality → channel-first → RAS → the grid → robust per-channel scaling to
[0, 1] (docs/architecture.md, "Data"). NIfTI is read by NiBabel, NRRD/MHA/DICOM by ITK (MONAI's ``LoadImage`` picks
the reader by file type).

Two grids (``docs/native_resolution.md``):

* **resized** (``spacing`` None, the paper's): each case's foreground box is resized to ``spatial_size``, whatever
  its shape, so the voxels are anisotropic and differ between cases;
* **native** (``spacing`` in mm): resampled to ``spacing`` (``Spacingd``, no resize), then a box of
  ``spatial_size`` voxels (:class:`NativeBoxd`): for a case in a registered atlas frame (``"frame": "atlas"``: the
  BraTS and Decathlon layouts and the phantoms, :mod:`~bundle.data.discovery`) the box centred on the frame, one
  box and one affine for every case; for other cases (a datalist) a box centred on the case's own foreground.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCrop,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from ..errors import BadInputError

__all__ = [
    "ATLAS_FRAME",
    "NativeBoxd",
    "SelectChanneld",
    "SplitConditiond",
    "check_spacing",
    "foreground",
    "preprocessing",
]

ATLAS_FRAME = "atlas"
"""A case record's ``"frame"`` when its volumes lie in one registered atlas frame (BraTS2020 and Decathlon Task01:
240×240×155 at 1 mm), which every case of the dataset shares."""


class SelectChanneld(MapTransform):
    """Keeps channel ``data["channels"][key]`` of each key's (C, *S) image (a Decathlon 4D volume);
    keys whose channel is ``None`` (one file per modality) are left as they are."""

    def __init__(self, keys: KeysCollection, channels_key: str = "channels") -> None:
        super().__init__(keys)
        self.channels_key = channels_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        channels = d.get(self.channels_key) or {}
        for key in self.key_iterator(d):
            index = channels.get(key)
            if index is not None:
                d[key] = d[key][index : index + 1]
        return d


def foreground(image: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """Voxels brighter than 5% of the image's 99th percentile: the head, not the noisy background; of the first
    ``channels`` channels of a (C, *S) image only (None: all), the ones a conditioned model is given."""
    image = image if channels is None else image[:channels]
    threshold = 0.05 * torch.quantile(image.float().flatten()[:: max(1, image.numel() // 1_000_000)], 0.99)
    return image > threshold


class SplitConditiond(MapTransform):
    """Splits the (K + C, *S) ``"image"`` of a conditioned model's case into ``"condition"``, its first K channels
    (the given modalities), and ``"image"``, the other C (the generated ones); both keep the image's metadata."""

    def __init__(self, num_condition: int) -> None:
        super().__init__(keys="image")
        self.num_condition = num_condition

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        d["condition"], d["image"] = d["image"][: self.num_condition], d["image"][self.num_condition :]
        return d


class NativeBoxd(MapTransform):
    """The box of ``spatial_size`` voxels of each key's (C, *S) image on its native grid, cropped or zero-padded
    around its centre (``ResizeWithPadOrCrop``; the affine follows): the centre of the volume for a case whose
    ``data[frame_key]`` is :data:`ATLAS_FRAME` (so that every case of a registered dataset gets the same box), else the
    centre of the foreground of ``source_key`` (``select_fn``; the case's own box, the same for every key)."""

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        frame_key: str = "frame",
        source_key: str = "image",
        select_fn: Callable[[torch.Tensor], torch.Tensor] = foreground,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame_key = frame_key
        self.box = ResizeWithPadOrCrop(spatial_size=tuple(spatial_size))
        self.crop_foreground = CropForegroundd(
            keys, source_key, select_fn=select_fn, margin=0, allow_smaller=True, allow_missing_keys=allow_missing_keys
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data) if data.get(self.frame_key) == ATLAS_FRAME else self.crop_foreground(data)
        for key in self.key_iterator(d):
            d[key] = self.box(d[key])
        return d


def check_spacing(spacing: float | Sequence[float] | None) -> None:
    """Raises :class:`BadInputError` unless ``spacing`` is None, one positive number (mm) or three."""
    if spacing is None:
        return
    numbers = [spacing] if isinstance(spacing, (int, float)) else spacing
    if (
        isinstance(spacing, (bool, str, bytes))
        or not isinstance(numbers, Sequence)
        or len(numbers) not in (1, 3)
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in numbers)
    ):
        raise BadInputError(
            f"spacing must be null (each case's box resized to spatial_size), a voxel size in mm such as 1.0, or "
            f"three such as [1.0,1.0,1.5]; got {spacing!r}."
        )


def preprocessing(
    modalities: Sequence[str],
    spatial_size: Sequence[int],
    spacing: float | Sequence[float] | None = None,
    condition_modalities: Sequence[str] = (),
    segmentation: bool = False,
) -> Compose:
    """Case record → ``{"image": (len(modalities), *spatial_size) float32 in [0, 1]}`` with its affine, on the
    resized grid (``spacing`` None) or the native grid of ``spacing`` mm (see the module docstring).

    With ``condition_modalities`` (a conditioned model's given modalities) also ``"condition"``
    (len(condition_modalities), *spatial_size) on the same grid (:class:`SplitConditiond`), and a case's own box is
    that of the given modalities' foreground, so that a case that has only those (inference on a study with a missing
    sequence) gets the box that training gave it. With ``segmentation``, a case whose record has a ``"seg"`` (the
    tumour labels, :mod:`~bundle.data.discovery`) also gets ``"seg"`` (1, *spatial_size) uint8 on the same grid,
    resampled by nearest neighbour.

    Raises:
        BadInputError: for a ``spacing`` that is not None, one positive number or three.
    """
    keys = [*condition_modalities, *modalities]
    on_grid = ["image", "seg"] if segmentation else ["image"]
    optional = {"allow_missing_keys": segmentation}
    load_seg = [LoadImaged("seg", image_only=True, ensure_channel_first=True, allow_missing_keys=True)]
    type_seg = [EnsureTyped("seg", dtype=torch.uint8, allow_missing_keys=True)]
    select_fn = partial(foreground, channels=len(condition_modalities) or None)
    if spacing is None:
        grid = [
            CropForegroundd(on_grid, source_key="image", select_fn=select_fn, margin=2, allow_smaller=True, **optional),
            Resized(
                on_grid,
                spatial_size=tuple(spatial_size),
                mode=("trilinear", "nearest-exact")[: len(on_grid)],
                anti_aliasing=(True, False)[: len(on_grid)],
                **optional,
            ),
        ]
    else:
        check_spacing(spacing)
        grid = [
            Spacingd(
                on_grid, pixdim=spacing, mode=("bilinear", "nearest")[: len(on_grid)], padding_mode="zeros", **optional
            ),
            NativeBoxd(on_grid, spatial_size=spatial_size, select_fn=select_fn, **optional),
        ]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
            *(load_seg if segmentation else []),
            SelectChanneld(keys=keys),
            ConcatItemsd(keys=keys, name="image"),
            DeleteItemsd(keys=[*(k for k in keys if k != "image"), "channels", *([] if segmentation else ["seg"])]),
            Orientationd(on_grid, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), **optional),
            *grid,
            ScaleIntensityRangePercentilesd(
                keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            ),
            EnsureTyped(keys="image", dtype=torch.float32),
            *(type_seg if segmentation else []),
            *([SplitConditiond(len(condition_modalities))] if condition_modalities else []),
        ]
    )
