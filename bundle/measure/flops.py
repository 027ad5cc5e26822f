"""Floating-point operations of one training step, counted with ``torch.utils.flop_counter``."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from .workload import Workload, build_network, make_training_step

__all__ = ["training_step_flops"]


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: per-module attribution installs backward hooks
    that PyTorch forbids during the ``autograd.grad`` calls the memory-efficient engine makes inside its
    backward; the total count does not need them."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> bool:
        return False


def training_step_flops(workload: Workload) -> int:
    """FLOPs of forward + backward (+ the AdamW update, whose element-wise work the counter ignores) of
    one training step; the memory-efficient IDM's reconstruction in backward is included."""
    model = build_network(workload)
    step, _ = make_training_step(workload, model)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        step()
    return counter.get_total_flops()
