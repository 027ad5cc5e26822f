"""Bytes that autograd stores for backward, counted with ``saved_tensors_hooks``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(forward: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes of the activations that ``forward()`` leaves stored for the backward pass.

    Every tensor autograd saves while ``forward`` runs is recorded by a pack hook; tensors sharing a
    storage are counted once (by storage size), and the model's parameters and buffers, which exist
    regardless of training, are not counted. Deterministic and device-free (docs/architecture.md, "Measuring").

    Args:
        forward: computes the loss (or output) under autograd; it is called once.
        model: the module whose parameters and buffers are excluded.
    """
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        # detached: a saved output returned with its grad_fn would form a reference cycle with its own
        # node that is never freed (the graph, and every tensor it saved, would leak)
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(storages.values())
