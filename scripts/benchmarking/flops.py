"""Floating-point operations of one training step, counted with ``torch.utils.flop_counter``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from .workload import Workload, build_network, make_training_step

__all__ = ["forward_flops", "training_step_flops"]


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: per-module attribution installs backward hooks
    that PyTorch forbids during the ``autograd.grad`` calls the memory-efficient engine makes inside its
    backward; the total count does not need them."""

    parents: ClassVar[set[str]] = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> bool:
        return False


def _count(workload: Workload, forward_only: bool) -> int:
    with torch.device("meta"):
        model = build_network(workload)
    step, loss, _ = make_training_step(workload, model, "meta")
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        loss() if forward_only else step()
    return counter.get_total_flops()


def training_step_flops(workload: Workload) -> int:
    """FLOPs of forward + backward (+ the AdamW update, whose element-wise work the counter ignores) of
    one training step; the memory-efficient IDM's reconstruction in backward is included. Counted on
    the meta device (shapes only), so even the paper configuration costs seconds and no memory."""
    return _count(workload, forward_only=False)


def forward_flops(workload: Workload) -> int:
    """FLOPs of the forward pass alone (network and loss) for the workload's batch, on the meta device."""
    return _count(workload, forward_only=True)
