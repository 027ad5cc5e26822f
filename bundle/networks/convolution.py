"""Convolutions with an odd kernel and "same" padding that keep batch-1 CPU inputs on oneDNN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SameConv2d", "SameConv3d", "same_conv"]

# PyTorch's CPU build sends a float32 convolution of batch 1 and a kernel of at most 3 per side to its im2col
# kernel (slow_conv2d / slow_conv3d) instead of oneDNN when N·C·S₀·S₁ ≤ 20480 (ConvParams::use_mkldnn).
_IM2COL_LIMIT = 20480
# The split pays only where the voxels outnumber the output channels: measured on 2 cores, a 3×3×3
# convolution's forward + backward took 0.25× (16 channels, 32³) to 0.81× (256 channels, 8³, 2 voxels per
# channel) of the im2col time, but 1.3–1.8× at 4³ with 64–512 channels, where oneDNN's reordered copy of the
# weight, C_out·C_in·k³, also outgrows im2col's buffer, C_in·k³·voxels, and raises the peak.
_VOXELS_PER_OUT_CHANNEL = 2


def _takes_im2col(x: torch.Tensor) -> bool:
    """Whether PyTorch would convolve this input (B, C, *S) by im2col on the CPU. False while tracing: a
    traced graph must hold for other batch sizes and devices than the example's."""
    return (
        x.shape[0] == 1
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and math.prod(x.shape[:4]) <= _IM2COL_LIMIT
    )


class _SameConv:
    """``forward`` of a stride-1 convolution with an odd kernel k and zero padding k // 2.

    With a 3-kernel, an input that PyTorch would convolve by im2col (batch 1, float32, CPU, few channels ×
    voxels) and that has at least twice as many voxels as output channels is cut in two along its first
    spatial axis, each half keeping the slice that the kernel reads across the cut, and the halves are
    convolved without padding as a batch of 2, which oneDNN takes; the two outputs, joined along that axis,
    are the same convolution (up to float rounding). On the 2-core CPU of ``docs/README.md`` a
    (1, 16, 32³) convolution's forward and backward take 24 ms that way instead of 105 ms.
    Shapes: (B, C_in, *S) → (B, C_out, *S).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halo, length = self.padding[0], x.shape[2]
        if (
            self.kernel_size[0] != 3
            or not _takes_im2col(x)
            or length % 2
            or math.prod(x.shape[2:]) < _VOXELS_PER_OUT_CHANNEL * self.out_channels
        ):
            return super().forward(x)
        half = length // 2
        padded = F.pad(x, [halo] * (2 * (x.ndim - 2)))
        halves = torch.cat([padded[:, :, : half + 2 * halo], padded[:, :, half:]], dim=0)
        convolve = F.conv3d if x.ndim == 5 else F.conv2d
        out = convolve(halves, self.weight, self.bias)
        return torch.cat([out[:1], out[1:]], dim=2)


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"A same-padded convolution needs an odd kernel_size ≥ 1, got {kernel_size}.")


class SameConv2d(_SameConv, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)``; see
    :class:`_SameConv` for its batch-1 CPU path."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        _check_kernel(kernel_size)
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class SameConv3d(_SameConv, nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)``; see
    :class:`_SameConv` for its batch-1 CPU path."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        _check_kernel(kernel_size)
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def same_conv(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
) -> SameConv2d | SameConv3d:
    """The :class:`SameConv2d` or :class:`SameConv3d` of ``spatial_dims`` (2 or 3)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    return (SameConv2d if spatial_dims == 2 else SameConv3d)(in_channels, out_channels, kernel_size, bias)
