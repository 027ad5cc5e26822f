"""Which steps of a memory-efficient sequence keep their activations under a memory budget.

A stored step runs under plain autograd: its backward costs what plain autograd's does, and the engine saves the
recomputation that rebuilding it would cost, about one forward pass of the step (a coupling's conditioner
evaluated again). So the steps worth storing are those whose forward costs the most per byte they keep: deep,
wide levels (a convolution's FLOPs per activation grow with its width) and attention (FLOPs quadratic in the
voxels, activations linear). :func:`step_costs` measures both for every step at the shapes of a call, on
FakeTensors (no memory, no compute: ``FlopCounterMode`` counts FLOPs, ``saved_tensors_hooks`` the bytes autograd
keeps); :func:`choose_stored` takes the steps in order of FLOPs per byte while their bytes fit the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StepCost", "check_memory_budget", "choose_stored", "passed_through", "step_costs", "storage_id"]


@dataclass(frozen=True)
class StepCost:
    """One step at one input shape: ``stored_bytes`` that autograd keeps from its forward to its backward (its
    inputs and the tensors its operations save, parameters excluded) and the ``flops`` of its forward, which a
    reconstruction pays again."""

    stored_bytes: int
    flops: int


def check_memory_budget(value: float, name: str = "memory_budget") -> float:
    """``value`` as a float after ``TypeError``/``ValueError`` naming ``name`` unless it is a number ≥ 0 (bytes;
    ``float("inf")``: no limit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of bytes ≥ 0 (0: rebuild every activation; float('inf'): keep "
            f"whatever helps), got {value!r} (a {type(value).__name__})."
        )
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be a number of bytes ≥ 0 (0: rebuild every activation; float('inf'): keep "
            f"whatever helps), got {value!r}."
        )
    return float(value)


def storage_id(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (its ``StorageImpl``; unlike the data pointer, defined for FakeTensors too)."""
    return t.untyped_storage()._cdata


def _leaves_reached(outputs: Sequence[torch.Tensor]) -> set[int]:
    """``id`` of every leaf tensor that requires grad and that back-propagation from ``outputs`` would reach."""
    reached: set[int] = set()
    seen: list = []  # keeps the nodes alive, so that their ids stay theirs
    seen_ids: set[int] = set()
    frontier = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while frontier:
        node = frontier.pop()
        if id(node) in seen_ids:
            continue
        seen.append(node)
        seen_ids.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            reached.add(id(variable))
        frontier.extend(n for n, _ in node.next_functions if n is not None)
    return reached


def passed_through(
    inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]
) -> tuple[dict[int, int], dict[int, int]]:
    """``({output position: input position} of the inputs that a step returned as they were, the same for those of
    them that none of its other outputs depends on either)``: the second are the skips that a step on the running
    feature map carries along, which a stored step need not keep (the state handed back in backward has them)."""
    identical = {j: i for j, o in enumerate(outputs) for i, t in enumerate(inputs) if o is t}
    computed = [o for j, o in enumerate(outputs) if j not in identical]
    reached = _leaves_reached(computed)
    return identical, {j: i for j, i in identical.items() if id(inputs[i]) not in reached}


def _fake_context(tensors: Sequence[torch.Tensor]):
    """(the FakeTensorMode to run in, a function making an input fake in it): none for FakeTensors (a memory plan's:
    their operations dispatch to their own mode, which is not entered again) and meta tensors."""
    if any(isinstance(t, FakeTensor) for t in tensors) or tensors[0].device.type == "meta":
        return nullcontext(), lambda t: t
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode, mode.from_tensor


def step_costs(steps: Sequence[nn.Module], state: Sequence[torch.Tensor], cond: torch.Tensor | None) -> list[StepCost]:
    """The :class:`StepCost` of each of ``steps`` (InvertibleSteps, in order) for the input ``state`` and ``cond``,
    on FakeTensors, outside any other dispatch mode (a memory plan's or a FLOP count's does not see it)."""
    costs = []
    with _disable_current_modes():
        mode, to_fake = _fake_context([*state, *([] if cond is None else [cond])])
        with mode:
            state = tuple(to_fake(t).detach() for t in state)
            cond = None if cond is None else to_fake(cond).detach().requires_grad_(cond.requires_grad)
            for step in steps:
                cost, state = _step_cost(step, state, cond)
                costs.append(cost)
    torch.clear_autocast_cache()  # autocast keeps the casts of real weights it made: fake ones, here
    return costs


def _step_cost(
    step: nn.Module, state: tuple[torch.Tensor, ...], cond: torch.Tensor | None
) -> tuple[StepCost, tuple[torch.Tensor, ...]]:
    """(the cost of ``step`` on ``state``, its output state), under autograd on FakeTensors."""
    leaves = tuple(s.detach().requires_grad_(True) for s in state)
    inputs = {storage_id(t) for t in leaves}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and storage_id(t) not in inputs):  # parameters and the condition excluded
            saved[storage_id(t)] = t.untyped_storage().nbytes()
        return t

    with (
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        FlopCounterMode(display=False) as counter,
    ):
        out = step(leaves, cond)
    kept = set(passed_through(leaves, out)[1].values())
    for i, leaf in enumerate(leaves):  # a stored step keeps the inputs it does not pass through
        if i not in kept:
            saved[storage_id(leaf)] = leaf.untyped_storage().nbytes()
    return StepCost(sum(saved.values()), counter.get_total_flops()), tuple(o.detach() for o in out)


def choose_stored(costs: Sequence[StepCost], budget: float) -> tuple[bool, ...]:
    """Which steps to store: in order of FLOPs per stored byte (a step that keeps nothing first), each whose bytes
    still fit in ``budget``."""
    order = sorted(
        range(len(costs)),
        key=lambda i: -(costs[i].flops / costs[i].stored_bytes if costs[i].stored_bytes else math.inf),
    )
    stored, used = [False] * len(costs), 0
    for i in order:
        if used + costs[i].stored_bytes <= budget:
            stored[i], used = True, used + costs[i].stored_bytes
    return tuple(stored)
