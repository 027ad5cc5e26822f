"""Baseline networks at matched parameter count."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedBlock", "count_parameters", "enable_activation_checkpointing", "matched_monai_unet"]


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under ``torch.utils.checkpoint`` (non-reentrant): its activations are recomputed in
    backward instead of stored. Same parameters, same results as ``block``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: DiffusionModelUNet) -> DiffusionModelUNet:
    """Wraps every residual and spatial-attention block of a MONAI ``DiffusionModelUNet`` in
    :class:`CheckpointedBlock`, in place (the standard activation-checkpointing baseline)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (DiffusionUNetResnetBlock, SpatialAttentionBlock)):
                setattr(parent, name, CheckpointedBlock(child))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_monai_unet(
    target_parameters: int,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    attention_levels: Sequence[bool],
    tolerance: float = 0.1,
    max_width: int = 512,
    num_res_blocks: Sequence[int] = (2, 1, 3),
) -> tuple[DiffusionModelUNet, dict]:
    """The leanest MONAI ``DiffusionModelUNet`` with ``target_parameters`` ± ``tolerance`` parameters.

    Candidates have first width w (a multiple of 8, GroupNorm with 8 groups), each next width 1×, 2×
    or 4× the previous, ``num_res_blocks`` from ``num_res_blocks`` and attention where ``attention_levels`` says.
    The one with the smallest w that fits is returned (the fewest full-resolution channels: the
    hardest baseline for an activation-memory comparison), with its constructor arguments. Candidates
    are sized on the meta device, so the search allocates nothing; its result is kept for the process,
    since every benchmark row builds its baseline several times (FLOPs, parameters, stored bytes).

    Raises:
        ValueError: when no candidate up to ``max_width`` is within the tolerance.
    """
    kwargs = _leanest_arguments(
        target_parameters,
        spatial_dims,
        in_channels,
        out_channels,
        tuple(bool(a) for a in attention_levels),
        tolerance,
        max_width,
        tuple(num_res_blocks),
    )
    return DiffusionModelUNet(**kwargs), dict(kwargs)


@functools.cache
def _leanest_arguments(
    target_parameters: int,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    attention_levels: tuple[bool, ...],
    tolerance: float,
    max_width: int,
    num_res_blocks: tuple[int, ...],
) -> dict:
    """The constructor arguments of :func:`matched_monai_unet` (the caller copies them)."""
    levels = len(attention_levels)
    for width in range(8, max_width + 1, 8):
        for blocks in num_res_blocks:
            for ratios in itertools.product((1, 2, 4), repeat=levels - 1):
                widths = [width]
                for r in ratios:
                    widths.append(widths[-1] * r)
                kwargs = {
                    "spatial_dims": spatial_dims,
                    "in_channels": in_channels,
                    "out_channels": out_channels,
                    "channels": tuple(widths),
                    "num_res_blocks": blocks,
                    "attention_levels": attention_levels,
                    "norm_num_groups": 8,
                    "num_head_channels": 8,
                }
                with torch.device("meta"):
                    size = count_parameters(DiffusionModelUNet(**kwargs))
                if abs(size / target_parameters - 1.0) <= tolerance:
                    return kwargs
    raise ValueError(
        f"No DiffusionModelUNet with first width ≤ {max_width} within ±{tolerance:.0%} of {target_parameters} "
        "parameters."
    )
