"""Learned orthogonal matrices and the layers built on them: channel mixing and down/upsampling."""

from __future__ import annotations

import math

import torch
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn

from .engine import LOW_PRECISION, InvertibleModule, ReverseResult, full_precision

__all__ = ["OrthogonalChannelMixing", "OrthogonalDownsampling", "cayley", "haar_matrix"]


def cayley(generator: torch.Tensor) -> torch.Tensor:
    """The Cayley transform ``Q = (I − S)⁻¹(I + S)`` of ``S = A − Aᵀ``, for a batch of square generators
    ``A`` (..., n, n). ``Q`` is orthogonal (S is skew-symmetric, so ``I − S`` is always invertible) and
    ``A = 0`` gives ``Q = I``.

    One ``torch.linalg.solve`` that autograd differentiates (no hand-written gradient). Chosen over
    ``exp(A − Aᵀ)``: the backward of ``torch.linalg.matrix_exp`` exponentiates a 2n × 2n block matrix,
    which for the paper configuration's 2048-channel mixing was a 0.5 GB working set
    (``scripts/benchmark.py profile``) and took about 20 times as long as the solve on the CPU.
    Half-precision generators are solved in float32 (the solvers have no half-precision kernels) and ``Q``
    is returned in their dtype.
    """
    work = generator.float() if generator.dtype in LOW_PRECISION else generator
    skew = work - work.transpose(-1, -2)
    identity = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
    with full_precision(work):
        return torch.linalg.solve(identity - skew, identity + skew).to(generator.dtype)


def haar_matrix(spatial_dims: int) -> torch.Tensor:
    """The orthonormal Haar transform of a 2^d-voxel patch, (2^d, 2^d), rows = basis functions.

    Kronecker power of ``[[1, 1], [1, -1]] / √2``; its column order matches the patch flattening of
    :func:`monai.networks.utils.pixelunshuffle` (row-major over the 2×…×2 patch).
    """
    h1 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    h = h1
    for _ in range(spatial_dims - 1):
        h = torch.kron(h, h1)
    return h


class OrthogonalChannelMixing(InvertibleModule):
    """Invertible 1×1 convolution with an orthogonal matrix: ``y[b, :, s] = Q x[b, :, s]``.

    ``Q = cayley(A)`` (C, C, :func:`cayley`), ``A`` initialised to zero (``Q = I``). Inverse: ``x = Qᵀ y``.

    Args:
        spatial_dims: number of spatial dimensions d (shapes are (B, C, *spatial) with d spatial axes).
        channels: C.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.generator = nn.Parameter(torch.zeros(channels, channels))

    def matrix(self) -> torch.Tensor:
        return cayley(self.generator)

    @staticmethod
    def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``matrix @ x`` over the channels of x (B, C, *S): one batched matrix product, no copy of x (and
        the same kernel with or without autograd, so both give the same bits)."""
        return torch.bmm(matrix.expand(x.shape[0], -1, -1), x.flatten(2)).view_as(x)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with full_precision(x):
            return self._mix(self.matrix().to(x.dtype), x)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        with full_precision(y):
            return self._mix(self.matrix().to(y.dtype).T, y)

    def reverse(
        self, y: torch.Tensor, grad_y: torch.Tensor, cond: torch.Tensor | None, overwrite: bool = False
    ) -> ReverseResult:
        """``x = Qᵀy``, ``∂L/∂x = Qᵀ ∂L/∂y`` and ``∂L/∂Q = Σ_b,s ∂L/∂y xᵀ`` by hand, one sample at a time
        (no recomputation of ``Qx`` under autograd), then ``∂L/∂A`` through the Cayley transform by
        autograd. With ``overwrite`` the results replace ``y`` and ``grad_y``."""
        with torch.enable_grad():
            matrix = self.matrix()
        with torch.no_grad(), full_precision(y):
            q_t = matrix.detach().to(y.dtype).T
            x, grad_x = (y, grad_y) if overwrite else (torch.empty_like(y), torch.empty_like(grad_y))
            grad_matrix = torch.zeros_like(q_t)
            for sample in range(y.shape[0]):
                x_sample = q_t @ y[sample].flatten(1)
                grad_matrix += grad_y[sample].flatten(1) @ x_sample.T
                x[sample] = x_sample.view_as(y[sample])
                grad_x[sample] = (q_t @ grad_y[sample].flatten(1)).view_as(y[sample])
        if not self.generator.requires_grad:
            return (x,), (grad_x,), None, []
        return (x,), (grad_x,), None, list(torch.autograd.grad(matrix, [self.generator], grad_matrix.to(matrix.dtype)))


class OrthogonalDownsampling(InvertibleModule):
    """Learned invertible downsampling: 2^d-voxel patches to channels, then an orthogonal map per channel.

    Shapes: (B, C, *S) → (B, C·2^d, *S/2). Each input channel c owns ``Q_c = cayley(A_c) H``
    (2^d × 2^d), with H the Haar transform (:func:`haar_matrix`, kept in float64 and cast to the
    generator's dtype on use, so it is orthogonal to the working precision) and ``A_c`` initialised to zero, so
    the layer starts as the Haar wavelet transform (iUNet, Etmann et al. 2020, §3.2). The inverse
    (upsampling) is the exact transpose: ``Q_cᵀ`` then pixel shuffle.

    Args:
        spatial_dims: d.
        channels: C, the input channels.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        patch = 2**spatial_dims
        self.generator = nn.Parameter(torch.zeros(channels, patch, patch))

    def matrices(self) -> torch.Tensor:
        """The per-channel orthogonal matrices ``Q`` (C, 2^d, 2^d)."""
        haar = haar_matrix(self.spatial_dims).to(self.generator.device, self.generator.dtype)
        return cayley(self.generator) @ haar

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[:2]
        patches = pixelunshuffle(x, self.spatial_dims, 2)
        patches = patches.reshape(b, c, 2**self.spatial_dims, *patches.shape[2:])
        with full_precision(x):
            y = torch.einsum("ckj,bcj...->bck...", self.matrices().to(x.dtype), patches)
        return y.reshape(b, -1, *y.shape[3:])

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = y.shape[0]
        patch = 2**self.spatial_dims
        coeffs = y.reshape(b, -1, patch, *y.shape[2:])
        with full_precision(y):
            patches = torch.einsum("cjk,bcj...->bck...", self.matrices().to(y.dtype), coeffs)
        return pixelshuffle(patches.reshape(b, -1, *y.shape[2:]), self.spatial_dims, 2)
