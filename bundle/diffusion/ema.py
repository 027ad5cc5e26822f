"""The exponential moving average of the weights used for validation and sampling (the paper has none)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["ema_with_warmup"]

EmaUpdate = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor], None]


def ema_with_warmup(decay: float) -> EmaUpdate:
    """The ``multi_avg_fn`` of a ``torch.optim.swa_utils.AveragedModel`` that keeps an EMA whose decay warms
    up: at the n-th update after the first (which copies the weights) ``W_ema ← d W_ema + (1 − d) W`` with
    ``d = min(decay, (1 + n) / (10 + n))`` (the ``num_updates`` rule of TensorFlow's
    ``ExponentialMovingAverage``). With the fixed decay 0.999 the average of a 100-step run is still 90%
    its first weights; with the warm-up it follows the early weights and reaches ``decay`` after
    ``(10 decay − 1) / (1 − decay)`` updates (8990 for 0.999)."""
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}.")

    @torch.no_grad()
    def update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(list(ema_params), list(params), weight)
        else:  # integer buffers: follow the model
            for ema_param, param in zip(ema_params, params, strict=True):
                ema_param.copy_(param)

    return update
