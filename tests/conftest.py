"""Shared test helpers."""

from __future__ import annotations

import torch
from torch import nn


def redraw_zero_init_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Re-draws every parameter that is exactly zero (the identity initialisation) from N(0, std²).

    Zero-initialised output convolutions, attention output projections and orthogonal generators
    make a fresh network the identity; tests must exercise a network away from it.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return ((a - b).norm() / b.norm()).item()
