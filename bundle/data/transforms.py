"""The preprocessing chain: load each modality → channel-first → RAS → foreground crop → resize →
robust per-channel scaling to [0, 1] (docs/architecture.md, "Data"). NIfTI is read by NiBabel, NRRD/MHA/DICOM by ITK
(MONAI's ``LoadImage`` picks the reader by file type)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

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
    ScaleIntensityRangePercentilesd,
)

__all__ = ["SelectChanneld", "foreground", "preprocessing"]


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


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than 5% of the image's 99th percentile: the head, not the noisy background."""
    threshold = 0.05 * torch.quantile(image.float().flatten()[:: max(1, image.numel() // 1_000_000)], 0.99)
    return image > threshold


def preprocessing(modalities: Sequence[str], spatial_size: Sequence[int]) -> Compose:
    """Case record → ``{"image": (len(modalities), *spatial_size) float32 in [0, 1]}`` with its affine."""
    keys = list(modalities)
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
            SelectChanneld(keys=keys),
            ConcatItemsd(keys=keys, name="image"),
            DeleteItemsd(keys=[*keys, "channels"]),
            Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            CropForegroundd(keys="image", source_key="image", select_fn=foreground, margin=2, allow_smaller=True),
            Resized(keys="image", spatial_size=tuple(spatial_size), mode="trilinear", anti_aliasing=True),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            ),
            EnsureTyped(keys="image", dtype=torch.float32),
        ]
    )
