"""Additive coupling block conditioned on the time embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .convolution import same_conv
from .engine import CouplingLayer, InvertibleChain

__all__ = ["AdditiveCoupling", "CouplingFunction", "HalfCoupling", "group_count"]


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of GroupNorm groups ≤ ``max_groups`` that divides ``channels``."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class CouplingFunction(nn.Module):
    """The residual function F (or G) of a coupling block; it need not be invertible.

    ``h = conv₁(SiLU(GN(x)));  h = GN(h)·(1 + s) + t  with (s, t) = Linear(SiLU(emb));
    out = conv₂(SiLU(h))`` with conv₂ zero-initialised, so the block starts as the identity.
    Shapes: x (B, C, *S), emb (B, E) → (B, C, *S).

    Args:
        spatial_dims: d.
        channels: C.
        cond_dim: E, or ``None`` for an unconditioned function.
        max_groups: upper bound on the GroupNorm groups (no BatchNorm: recomputation would update
            running statistics twice).
        recompute_norms: under autograd, store only the convolutions' inputs and outputs and recompute the
            two GroupNorm–SiLU stages in backward (``torch.utils.checkpoint``, non-reentrant): 4 instead of
            7 stored (B, C, *S) tensors, for one more evaluation of those stages. Same values and gradients
            either way.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        cond_dim: int | None,
        max_groups: int = 32,
        recompute_norms: bool = False,
    ) -> None:
        super().__init__()
        self.recompute_norms = recompute_norms
        groups = group_count(channels, max_groups)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = same_conv(spatial_dims, channels, channels, bias=False)  # GroupNorm follows
        self.norm2 = nn.GroupNorm(groups, channels)
        self.cond_proj = nn.Linear(cond_dim, 2 * channels) if cond_dim else None
        self.conv2 = same_conv(spatial_dims, channels, channels)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm1(x))

    def _stage2(self, h: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        h = self.norm2(h)
        if scale is not None:
            view = (*scale.shape, *([1] * (h.ndim - 2)))
            h = h * (1 + scale.reshape(view)) + shift.reshape(view)
        return F.silu(h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        scale = shift = None
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("CouplingFunction was built with cond_dim but called with cond=None.")
            scale, shift = self.cond_proj(F.silu(cond)).chunk(2, dim=1)
        if self.recompute_norms and torch.is_grad_enabled():
            h = self.conv1(checkpoint(self._stage1, x, use_reentrant=False))
            return self.conv2(checkpoint(self._stage2, h, scale, shift, use_reentrant=False))
        return self.conv2(self._stage2(self.conv1(self._stage1(x)), scale, shift))


class HalfCoupling(CouplingLayer):
    """One half of an additive coupling: the updated half gains a function of the kept half.

    With x = (x₁, x₂) split along channels, ``update="first"`` gives ``y = (x₁ + F(x₂, emb), x₂)`` and
    ``update="second"`` gives ``y = (x₁, x₂ + F(x₁, emb))``; the inverse subtracts. Shapes:
    (B, C, *S) → (B, C, *S). ``recompute_norms``: see :class:`CouplingFunction`.
    """

    def __init__(
        self, spatial_dims: int, channels: int, cond_dim: int | None, update: str, recompute_norms: bool = False
    ) -> None:
        super().__init__()
        if update not in ("first", "second"):
            raise ValueError(f"update must be 'first' or 'second', got {update!r}.")
        self.update = update
        self.function = CouplingFunction(spatial_dims, channels // 2, cond_dim, recompute_norms=recompute_norms)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(updated half, kept half)."""
        half = x.shape[1] // 2
        first, second = x.narrow(1, 0, half), x.narrow(1, half, half)  # views that may be updated in place
        return (first, second) if self.update == "first" else (second, first)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        return self._halves(x)[1]

    def conditioner(self, kept: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.function(kept, cond)

    def combine(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        self._halves(y)[0].add_(h)
        return y

    def uncombine_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self._halves(y)[0].sub_(h)
        return y

    def combine_grad_h(self, y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """``∂L/∂h = ∂L/∂y_updated``."""
        return self._halves(grad_y)[0]

    def combine_grad_x_(self, h: torch.Tensor, grad_y: torch.Tensor, grad_kept: torch.Tensor | None) -> torch.Tensor:
        """``∂L/∂x_updated = ∂L/∂y_updated``, ``∂L/∂x_kept = ∂L/∂y_kept + ∂L/∂kept`` (through F)."""
        if grad_kept is not None:
            self._halves(grad_y)[1].add_(grad_kept)
        return grad_y


class AdditiveCoupling(InvertibleChain):
    """Additive coupling (NICE; RevNet, Gomez et al. 2017, Eq. 1–2), exactly invertible for any F, G.

    With x = (x₁, x₂) split along channels: ``y₁ = x₁ + F(x₂, emb);  y₂ = x₂ + G(y₁, emb)``;
    inverse ``x₂ = y₂ − G(y₁, emb);  x₁ = y₁ − F(x₂, emb)``. Shapes: (B, C, *S) → (B, C, *S), C even.
    Built from two :class:`HalfCoupling` s, so the engine evaluates F and G once each when it
    reconstructs the block.

    Args:
        spatial_dims: d.
        channels: C (even).
        cond_dim: E, the width of the conditioning vector, or ``None``.
        recompute_norms: F and G store less under autograd (see :class:`CouplingFunction`).
    """

    def __init__(
        self, spatial_dims: int, channels: int, cond_dim: int | None = None, recompute_norms: bool = False
    ) -> None:
        if channels % 2:
            raise ValueError(f"AdditiveCoupling needs an even number of channels, got channels={channels}.")
        super().__init__(
            HalfCoupling(spatial_dims, channels, cond_dim, "first", recompute_norms),
            HalfCoupling(spatial_dims, channels, cond_dim, "second", recompute_norms),
        )
