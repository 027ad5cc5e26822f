"""The one memory-saving engine that runs every invertible network in this bundle.

A network is an :class:`InvertibleSequence` of :class:`InvertibleStep` s acting on a *state*: a tuple
of tensors (the running feature map first, then the skip tensors an encoder has put aside). With
``memory_efficient=True`` the forward pass stores only its output state; the backward pass walks the
steps in reverse and, for each one, (1) inverts it to rebuild its input, (2) recomputes it under
autograd and (3) back-propagates through that single step, handing the input gradient to the step
before. At any time the activations of one step only are alive, so the memory of a training step
does not grow with depth (Gomez et al. 2017, "The Reversible Residual Network", Alg. 1).

Parameters are passed to the autograd function as inputs and their gradients are returned from its
``backward``, so they reach ``.grad`` through ordinary ``AccumulateGrad`` nodes and the hooks of
``DistributedDataParallel`` fire as with any module. ``memory_efficient=False`` runs the same steps
under plain autograd: it is the reference the gradient tests compare against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["State", "InvertibleModule", "InverseOf", "InvertibleStep", "OnTensor", "InvertibleSequence"]

State = tuple[torch.Tensor, ...]


class InvertibleModule(nn.Module, ABC):
    """A bijection ``y = f(x; cond)`` on one tensor, with ``cond`` an optional non-inverted input."""

    @abstractmethod
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


class InverseOf(InvertibleModule):
    """``f⁻¹`` as a module: forward runs ``layer.inverse`` and inverse runs ``layer.forward``.

    The decoder's upsampling is ``InverseOf(OrthogonalDownsampling(...))`` with its own parameters.
    """

    def __init__(self, layer: InvertibleModule) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer.inverse(x, cond)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(y, cond)


class InvertibleStep(nn.Module, ABC):
    """A bijection on the whole state tuple (see the module docstring)."""

    @abstractmethod
    def forward(self, state: State, cond: torch.Tensor | None = None) -> State: ...

    @abstractmethod
    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State: ...


class OnTensor(InvertibleStep):
    """Applies an :class:`InvertibleModule` to ``state[index]`` and passes the other tensors through."""

    def __init__(self, layer: InvertibleModule, index: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.index = index

    def _replace(self, state: State, tensor: torch.Tensor) -> State:
        return state[: self.index] + (tensor,) + state[self.index + 1 :]

    def forward(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._replace(state, self.layer(state[self.index], cond))

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._replace(state, self.layer.inverse(state[self.index], cond))


def _run(steps: Sequence[InvertibleStep], state: State, cond: torch.Tensor | None, reverse: bool) -> State:
    """Applies ``steps`` in order (``reverse=False``) or their inverses in reverse order."""
    if reverse:
        for step in reversed(steps):
            state = step.inverse(state, cond)
    else:
        for step in steps:
            state = step(state, cond)
    return state


class _ReconstructingFunction(torch.autograd.Function):
    """Runs ``steps`` without storing activations; rebuilds them through the inverse in backward."""

    @staticmethod
    def forward(ctx, steps, reverse, params_per_step, cond, num_state, *tensors):  # type: ignore[override]
        state = tensors[:num_state]
        with torch.no_grad():
            out = _run(steps, state, cond, reverse)
        ctx.steps, ctx.reverse, ctx.params_per_step = steps, reverse, params_per_step
        ctx.num_params = len(tensors) - num_state
        ctx.cond_needs_grad = cond is not None and cond.requires_grad
        ctx.save_for_backward(cond, *out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):  # type: ignore[override]
        cond, *out = ctx.saved_tensors
        state: State = tuple(t.detach() for t in out)
        grads = list(grad_out)
        cond_in = None if cond is None else cond.detach().requires_grad_(ctx.cond_needs_grad)
        cond_grad = torch.zeros_like(cond) if ctx.cond_needs_grad else None
        param_grads: dict[int, torch.Tensor] = {}
        order = range(len(ctx.steps)) if ctx.reverse else reversed(range(len(ctx.steps)))
        for k in order:
            step, params = ctx.steps[k], ctx.params_per_step[k]
            apply, invert = (step.inverse, step.forward) if ctx.reverse else (step.forward, step.inverse)
            with torch.no_grad():
                inputs = invert(state, cond)
            inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
            with torch.enable_grad():
                outputs = apply(inputs, cond_in)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            wrt = list(inputs) + ([cond_in] if ctx.cond_needs_grad else []) + [p for _, p in params]
            step_grads = torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
            )
            grads = list(step_grads[: len(inputs)])
            rest = step_grads[len(inputs) :]
            if ctx.cond_needs_grad:
                if rest[0] is not None:
                    cond_grad += rest[0]
                rest = rest[1:]
            for (index, _), g in zip(params, rest):
                if g is not None:
                    param_grads[index] = g if index not in param_grads else param_grads[index] + g
            state = tuple(t.detach() for t in inputs)
        return (
            None,
            None,
            None,
            cond_grad,
            None,
            *grads,
            *(param_grads.get(i) for i in range(ctx.num_params)),
        )


class InvertibleSequence(nn.Module):
    """Composition of :class:`InvertibleStep` s, with the memory-saving engine.

    Args:
        steps: the steps, applied in order by ``forward`` and inverted in reverse order by ``inverse``.
        memory_efficient: ``True`` stores only the output state and reconstructs activations in
            backward; ``False`` runs plain autograd (same maths, same results up to rounding). Under
            ``torch.no_grad()`` both run the steps directly: nothing is stored or recomputed.
    """

    def __init__(self, steps: Sequence[InvertibleStep], memory_efficient: bool = True) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.memory_efficient = memory_efficient

    def forward(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._apply_steps(state, cond, reverse=False)

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._apply_steps(state, cond, reverse=True)

    def _apply_steps(self, state: State, cond: torch.Tensor | None, reverse: bool) -> State:
        steps = list(self.steps)
        params = [p for p in self.parameters() if p.requires_grad]
        needs_graph = torch.is_grad_enabled() and (
            any(t.requires_grad for t in state) or bool(params) or (cond is not None and cond.requires_grad)
        )
        if not (self.memory_efficient and needs_graph):
            return _run(steps, state, cond, reverse)
        index = {id(p): i for i, p in enumerate(params)}
        params_per_step = [
            [(index[id(p)], p) for p in step.parameters() if p.requires_grad] for step in steps
        ]
        return _ReconstructingFunction.apply(steps, reverse, params_per_step, cond, len(state), *state, *params)
