"""Invertible attention (iTrans) with a d-dimensional checkerboard mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .engine import CouplingLayer

__all__ = ["InvertibleAttention", "checkerboard_indices"]


def checkerboard_indices(
    spatial_shape: tuple[int, ...], parity: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat voxel indices of the kept and the modified halves of a checkerboard partition.

    Kept voxels have ``(Σ spatial indices) mod 2 == parity`` (the mask M of iTrans, paper Eq. 1, in d
    dimensions). Each kept voxel is paired with the voxel next to it along the last axis (index
    ``w xor 1``), which has the other parity; the pairing is a bijection when the last axis is even.

    Returns:
        ``(kept, modified)``, two LongTensors of length ``prod(spatial_shape) / 2``; ``modified[n]`` is
        the partner of ``kept[n]``.
    """
    if spatial_shape[-1] % 2:
        raise ValueError(
            f"Invertible attention needs an even last spatial axis to pair the checkerboard halves, got "
            f"spatial shape {tuple(spatial_shape)}; use sizes whose last axis is even."
        )
    grids = torch.meshgrid(*(torch.arange(s, device=device) for s in spatial_shape), indexing="ij")
    parity_map = torch.stack(grids).sum(0).flatten() % 2
    # of each pair (w even, w + 1) along the last axis exactly one voxel has the parity: no data-dependent shape,
    # so the indices can be built under FakeTensorMode too
    kept = torch.arange(0, parity_map.numel(), 2, device=device) + (parity_map[0::2] != parity).long()
    last = kept % spatial_shape[-1]
    return kept, kept - last + (last ^ 1)


class InvertibleAttention(CouplingLayer):
    """iTrans invertible attention (paper Eq. 1–4), extended to d dimensions.

    The input y (B, C, *S) is split by a checkerboard mask into y₁ (kept as is) and y₂. A weight
    ``f(y₁) = exp(α · tanh(W_o · softmax(Q Kᵀ / √d_k) V))`` is computed from y₁ only, with
    ``Q = W_q y₁``, ``K = W_k y₁`` (1×1 projections) and ``V = y₁`` over the N/2 kept voxels as
    tokens; each modified voxel takes the weight of its kept partner. Forward ``a = y₂ ⊙ f(y₁)``,
    inverse ``y₂ = a ⊘ f(y₁)``. Since ``f ∈ [e^{-α}, e^{α}]`` (``[1/2, 2]`` for α = ln 2) the
    division amplifies rounding by at most ``e^{α}``; no floor is needed. ``W_o`` starts at zero
    (f ≡ 1, the identity). Two instances with parities 0 and 1 update both halves.

    Args:
        spatial_dims: d.
        channels: C.
        parity: which checkerboard half is kept (0 or 1).
        num_heads: attention heads; C must be divisible by it (values are y₁ split into heads).
        key_channels: width of queries and keys per head (default C // num_heads).
        alpha: bound α of the log-weights.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        parity: int = 0,
        num_heads: int = 1,
        key_channels: int | None = None,
        alpha: float = math.log(2.0),
    ) -> None:
        super().__init__()
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}.")
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}; use num_heads=1.")
        self.spatial_dims = spatial_dims
        self.parity = parity
        self.num_heads = num_heads
        self.alpha = alpha
        key_channels = key_channels or channels // num_heads
        self.query = nn.Linear(channels, num_heads * key_channels, bias=False)
        self.key = nn.Linear(channels, num_heads * key_channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(x.shape[2:]), x.device)
        if key in self._index_cache:
            return self._index_cache[key]
        # built on the CPU (once per shape and device) so that shape-only meta tensors work too
        kept, modified = checkerboard_indices(tuple(x.shape[2:]), self.parity, torch.device("cpu"))
        indices = (kept.to(x.device), modified.to(x.device))
        if not isinstance(kept, FakeTensor):  # a memory plan's fake indices would serve the real run
            self._index_cache[key] = indices
        return indices

    def weights(self, kept: torch.Tensor) -> torch.Tensor:
        """``f(y₁)`` for kept tokens (B, C, N) → (B, C, N), values in ``[e^{-α}, e^{α}]``."""
        b, c, n = kept.shape
        # contiguous tokens make V a plain strided view: SDPA's fused kernels take it, where a non-contiguous V
        # sends it down the math path, which forms the N² score matrix
        tokens = kept.transpose(1, 2).contiguous()
        q = self.query(tokens).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k = self.key(tokens).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        v = tokens.reshape(b, n, self.num_heads, -1).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return torch.exp(self.alpha * torch.tanh(self.out(attended))).transpose(1, 2)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) as (B, C, N), a view (in-place updates reach x; raises where no view exists)."""
        return x.view(*x.shape[:2], -1)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """y₁: the kept voxels as tokens, (B, C, N/2)."""
        return x.flatten(2).index_select(2, self._indices(x)[0])

    def conditioner(self, kept: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.weights(kept)

    def combine(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``a = y₂ ⊙ f(y₁)`` (Eq. 2) on the modified voxels; the kept ones are copied."""
        modified_idx = self._indices(x)[1]
        tokens = x.flatten(2)
        return tokens.index_copy(2, modified_idx, tokens.index_select(2, modified_idx) * h).view_as(x)

    def uncombine_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``y₂ = a ⊘ f(y₁)`` in place."""
        modified_idx = self._indices(y)[1]
        tokens = self._tokens(y)
        tokens.index_copy_(2, modified_idx, tokens.index_select(2, modified_idx) / h)
        return y

    def combine_grad_h(self, y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """``∂L/∂f = ∂L/∂a ⊙ y₂ = ∂L/∂a ⊙ a ⊘ f`` on the modified voxels, (B, C, N/2)."""
        modified_idx = self._indices(y)[1]
        modified_grad = grad_y.flatten(2).index_select(2, modified_idx)
        return modified_grad * y.flatten(2).index_select(2, modified_idx) / h

    def combine_grad_x_(self, h: torch.Tensor, grad_y: torch.Tensor, grad_kept: torch.Tensor | None) -> torch.Tensor:
        """``∂L/∂y₂ = ∂L/∂a ⊙ f(y₁)``; ``∂L/∂y₁`` passes through and gains ``grad_kept`` (through f)."""
        kept_idx, modified_idx = self._indices(grad_y)
        tokens = self._tokens(grad_y)
        tokens.index_copy_(2, modified_idx, tokens.index_select(2, modified_idx) * h)
        if grad_kept is not None:
            tokens.index_add_(2, kept_idx, grad_kept)
        return grad_y
