"""The one memory-saving engine that runs every invertible network in this bundle.

A network is an :class:`InvertibleSequence` of :class:`InvertibleStep` s acting on a *state*: a tuple
of tensors (the running feature map first, then the skip tensors an encoder has put aside). With
``memory_efficient=True`` the forward pass stores only its output state; the backward pass walks the
steps in reverse and asks each one for its *reverse step*: rebuild the step's input from its output,
and turn the output gradient into gradients for the input, the condition and the step's parameters
(a vector-Jacobian product through a local recomputation). At any time the activations of one step
only are alive, so the memory of a training step does not grow with depth (Gomez et al. 2017,
"The Reversible Residual Network", Alg. 1).

The generic reverse step inverts without autograd and then recomputes the step under autograd.
:class:`CouplingLayer` s (``y = combine(x, h(kept(x)))`` with ``kept(y) = kept(x)``: additive
couplings and the invertible attention) override it to evaluate their expensive conditioner ``h``
once, with autograd, and use it both to invert and to differentiate. A training step then costs one
forward, one reconstruction and one backward: about 4/3 of plain autograd.

Each step is its own autograd function whose inputs are the state, the condition and the step's
parameters; only the last step saves its output, and each step's backward hands the state it rebuilt
to the step before it. Parameter gradients are returned step by step, so they reach ``.grad`` through
ordinary ``AccumulateGrad`` nodes as soon as their step is reversed (no more than one step's gradients
are in flight, whatever the depth) and the hooks of ``DistributedDataParallel`` fire as with any module.
Couplings and channel mixings rebuild their input in the memory of their output, and the input gradient
in that of the output gradient, wherever the sequence owns those tensors: for every step but the last,
and for the last too when the caller hands the output over. ``memory_efficient=False`` runs the same
steps under plain autograd: it is the reference the gradient tests compare against.

Memory the device has to spare buys time: with a ``memory_budget`` the steps whose recomputation costs the most
FLOPs per byte (:mod:`~bundle.networks.storage_plan`, measured on FakeTensors) keep their activations instead, and
each run of consecutive kept steps is one plain-autograd link of the same chain (:class:`_StoredSegment`), which
hands the step before it the input it kept.

Mixed precision (``torch.autocast``): the state stays in float32, so that inversion stays exact to
float32 rounding; the conditioners run in the autocast dtype, the orthogonal maps of the state in the
state's dtype (:func:`full_precision`), and each step's backward recomputes under the autocast setting
of its forward. A state in float16 or bfloat16 outside autocast (a network cast to half precision) is
refused by the memory-efficient engine: its inversion would lose a few bits at every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .storage_plan import check_memory_budget, choose_stored, passed_through, step_costs, storage_id

__all__ = [
    "CouplingLayer",
    "InverseOf",
    "InvertibleChain",
    "InvertibleModule",
    "InvertibleSequence",
    "InvertibleStep",
    "OnTensor",
    "ReverseResult",
    "State",
    "full_precision",
    "on_tensor_steps",
]

State = tuple[torch.Tensor, ...]
# (input state, input gradients, condition gradient or None, parameter gradients in .parameters() order)
ReverseResult = tuple[State, State, "torch.Tensor | None", list["torch.Tensor | None"]]


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _autocast_setting(device_type: str) -> tuple[bool, torch.dtype | None]:
    """(whether ``torch.autocast`` is on for ``device_type``, its dtype); off for devices without autocast."""
    if not torch.amp.is_autocast_available(device_type):
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, enabled: bool, dtype: torch.dtype | None) -> AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, dtype, enabled)
    return nullcontext()


def full_precision(t: torch.Tensor) -> AbstractContextManager:
    """Autocast off on ``t``'s device: the orthogonal maps of the state run in the state's dtype, so that
    the state is not rounded to the autocast dtype between steps."""
    return _autocast(t.device.type, False, None)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> State:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True))


def _vector_jacobian(
    outputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cond: torch.Tensor | None,
    params: Sequence[nn.Parameter],
) -> tuple[list[torch.Tensor | None], torch.Tensor | None, list[torch.Tensor | None]]:
    """``(∂out/∂inputs)ᵀ g``, and the same for ``cond`` (when it requires grad) and ``params``."""
    with_cond = cond is not None and cond.requires_grad
    wrt = [*inputs, *([cond] if with_cond else []), *params]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    n = len(inputs)
    return list(grads[:n]), grads[n] if with_cond else None, list(grads[n + with_cond :])


def recompute_reverse(
    apply: Callable[[State, torch.Tensor | None], State],
    invert: Callable[[State, torch.Tensor | None], State],
    params: Sequence[nn.Parameter],
    state: State,
    grad_state: State,
    cond: torch.Tensor | None,
) -> ReverseResult:
    """The generic reverse step: ``x = invert(y)`` without autograd, then ``apply(x)`` recomputed under
    autograd and differentiated against ``grad_state``."""
    with torch.no_grad():
        inputs = tuple(_leaf(t) for t in invert(state, cond))
    with torch.enable_grad():
        outputs = apply(inputs, cond)
    grad_in, grad_cond, grad_params = _vector_jacobian(outputs, grad_state, inputs, cond, params)
    return tuple(t.detach() for t in inputs), _zeros_for_none(grad_in, inputs), grad_cond, grad_params


class InvertibleModule(nn.Module, ABC):
    """A bijection ``y = f(x; cond)`` on one tensor, with ``cond`` an optional non-inverted input."""

    @abstractmethod
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    def reverse(
        self, y: torch.Tensor, grad_y: torch.Tensor, cond: torch.Tensor | None, overwrite: bool = False
    ) -> ReverseResult:
        """Rebuilds the input from ``y`` and back-propagates ``grad_y`` through this layer (see the
        module docstring); results are one-tensor states. With ``overwrite`` the layer may write its
        results into ``y`` and ``grad_y`` (the engine passes it for tensors that nothing else holds)."""
        return recompute_reverse(
            lambda s, c: (self(s[0], c),),
            lambda s, c: (self.inverse(s[0], c),),
            _trainable(self),
            (y,),
            (grad_y,),
            cond,
        )


class InvertibleChain(InvertibleModule):
    """Composition ``f_n ∘ … ∘ f_1`` of invertible modules. A sequence runs each link as a step of its own
    (:func:`on_tensor_steps`), with the link's reverse; the chain's own is the generic one."""

    def __init__(self, *layers: InvertibleModule) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond)
        return x

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y, cond)
        return y


class CouplingLayer(InvertibleModule):
    """``y = combine(x, h)`` with ``h = conditioner(kept(x), cond)`` and ``kept(y) = kept(x)``;
    ``x = uncombine(y, h)``. ``combine`` must be cheap and elementwise-invertible given ``h``, and the
    conditioner must treat the samples of a batch independently (GroupNorm, not BatchNorm).

    Its reverse step evaluates ``h`` once from ``kept(y)`` under autograd and uses it both to rebuild
    ``x`` and to differentiate. ``combine`` itself is differentiated by hand (:meth:`combine_grad_h`,
    :meth:`combine_grad_x_`), and ``x`` and its gradient are written into ``y`` and ``grad_y`` (into
    copies of them unless the engine says they may be overwritten), so the reverse step allocates
    nothing at the state's size. Without autograd (the engine's forward pass, inversion) and in the
    reverse step, the batch goes through the conditioner in chunks of at most :attr:`chunk_elements`
    state elements (one sample at a time when a sample is larger): the conditioner's activations, the
    largest working set of a training step, are then those of one chunk. Results do not depend on it.
    """

    chunk_elements: int = 2**22  # 16 MiB of float32 state per chunk; a sample is never split

    @abstractmethod
    def kept(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def conditioner(self, kept: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def combine(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def uncombine_(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Turns ``y`` into ``x = uncombine(y, h)`` in place and returns it."""

    @abstractmethod
    def combine_grad_h(self, y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """``(∂combine(x, h)/∂h)ᵀ grad_y`` at ``y = combine(x, h)``, shaped like ``h``."""

    @abstractmethod
    def combine_grad_x_(self, h: torch.Tensor, grad_y: torch.Tensor, grad_kept: torch.Tensor | None) -> torch.Tensor:
        """Turns ``grad_y`` into the input gradient ``(∂combine(x, h)/∂x)ᵀ grad_y + (∂kept(x)/∂x)ᵀ grad_kept``
        in place (``h`` held fixed; ``grad_kept`` is the gradient that reached ``kept(x)`` through ``h``,
        or None) and returns it."""

    def uncombine(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.uncombine_(y.clone(), h)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._apply_in_chunks(x, cond, self.combine)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._apply_in_chunks(y, cond, self.uncombine)

    def _row_chunks(self, x: torch.Tensor, cond: torch.Tensor | None) -> list[tuple[slice, slice]]:
        """``(rows of x, rows of cond)`` per chunk of at most :attr:`chunk_elements` (at least one sample);
        a condition with one row is broadcast to every chunk."""
        batch = x.shape[0]
        rows_per_chunk = max(1, self.chunk_elements // max(1, x[0].numel()))
        per_sample = cond is not None and cond.shape[0] == batch
        return [
            (rows, rows if per_sample else slice(None))
            for rows in (slice(start, start + rows_per_chunk) for start in range(0, batch, rows_per_chunk))
        ]

    def _apply_in_chunks(self, x: torch.Tensor, cond: torch.Tensor | None, combine: Callable) -> torch.Tensor:
        """``combine(x, conditioner(kept(x), cond))``; without autograd, chunk by chunk into one output."""
        chunks = self._row_chunks(x, cond)
        if torch.is_grad_enabled() or len(chunks) == 1:
            return combine(x, self.conditioner(self.kept(x), cond))
        out = torch.empty_like(x)
        for rows, cond_rows in chunks:
            part = x[rows]
            out[rows] = combine(part, self.conditioner(self.kept(part), None if cond is None else cond[cond_rows]))
        return out

    def reverse(
        self, y: torch.Tensor, grad_y: torch.Tensor, cond: torch.Tensor | None, overwrite: bool = False
    ) -> ReverseResult:
        params = _trainable(self)
        chunks = self._row_chunks(y, cond)
        if not overwrite:
            y, grad_y = y.clone(), grad_y.clone()
        grad_cond = torch.zeros_like(cond) if cond is not None and cond.requires_grad else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for rows, cond_rows in chunks:
            chunk_cond = None if cond is None else _leaf(cond[cond_rows]).requires_grad_(cond.requires_grad)
            g_cond, g_params = self._reverse_chunk_(y[rows], grad_y[rows], chunk_cond, params)
            if g_cond is not None:
                grad_cond[cond_rows] += g_cond
            grad_params = [
                g if total is None else total if g is None else total.add_(g)
                for total, g in zip(grad_params, g_params, strict=True)
            ]
        return (y,), (grad_y,), grad_cond, grad_params

    def _reverse_chunk_(
        self, y: torch.Tensor, grad_y: torch.Tensor, cond: torch.Tensor | None, params: Sequence[nn.Parameter]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Turns ``y`` into ``x`` and ``grad_y`` into ``∂L/∂x`` in place (views of the chunk's samples) and
        returns ``(∂L/∂cond, ∂L/∂params)``; ``h`` is evaluated once, and everything is differentiated
        before anything is overwritten."""
        kept = _leaf(self.kept(y))
        with torch.enable_grad():
            h = self.conditioner(kept, cond)
        with torch.no_grad():
            grad_h = self.combine_grad_h(y, h, grad_y)
        (grad_kept,), grad_cond, grad_params = _vector_jacobian([h], [grad_h], [kept], cond, params)
        with torch.no_grad():
            self.uncombine_(y, h)
            self.combine_grad_x_(h, grad_y, grad_kept)
        return grad_cond, grad_params


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

    @abstractmethod
    def reverse(
        self, state: State, grad_state: State, cond: torch.Tensor | None, writable: Sequence[bool] = ()
    ) -> ReverseResult:
        """Input state, input gradients, condition gradient and parameter gradients (in ``.parameters()``
        order) from the output state and its gradients. ``writable[i]``: the step may overwrite ``state[i]``
        and ``grad_state[i]`` (nothing else holds them). ``recompute_reverse(self.forward, self.inverse,
        trainable parameters, state, grad_state, cond)`` is the generic invert-and-recompute step."""


class OnTensor(InvertibleStep):
    """Applies an :class:`InvertibleModule` to ``state[index]`` and passes the other tensors through."""

    def __init__(self, layer: InvertibleModule, index: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.index = index

    def _replace(self, state: State, tensor: torch.Tensor) -> State:
        return (*state[: self.index], tensor, *state[self.index + 1 :])

    def forward(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._replace(state, self.layer(state[self.index], cond))

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._replace(state, self.layer.inverse(state[self.index], cond))

    def reverse(
        self, state: State, grad_state: State, cond: torch.Tensor | None, writable: Sequence[bool] = ()
    ) -> ReverseResult:
        overwrite = self.index < len(writable) and writable[self.index]
        (x,), (grad_x,), grad_cond, grad_params = self.layer.reverse(
            state[self.index], grad_state[self.index], cond, overwrite
        )
        return self._replace(state, x), self._replace(grad_state, grad_x), grad_cond, grad_params


def on_tensor_steps(layer: InvertibleModule, index: int = 0) -> list[InvertibleStep]:
    """``layer`` applied to ``state[index]``, as steps of an :class:`InvertibleSequence`: one step per link
    of an :class:`InvertibleChain` (the engine keeps a step's output and output gradient alive until the
    step's reverse returns, so a chain reversed as one step would hold two links' tensors at once)."""
    links = layer.layers if isinstance(layer, InvertibleChain) else [layer]
    return [OnTensor(link, index) for link in links]


def _run(steps: Sequence[InvertibleStep], state: State, cond: torch.Tensor | None, reverse: bool) -> State:
    """Applies ``steps`` in order (``reverse=False``) or their inverses in reverse order."""
    if reverse:
        for step in reversed(steps):
            state = step.inverse(state, cond)
    else:
        for step in steps:
            state = step(state, cond)
    return state


class _Relay:
    """Carries the state rebuilt by one step's backward to the backward of the step before it, so that
    no step but the last stores its output. ``external`` holds the storages of the tensors that the
    sequence does not own in backward: its output state (the caller may hold it) and the gradients
    it was given, unless the caller handed them over (``InvertibleSequence.forward(...,
    hand_over_output=True)``). Every other state or gradient tensor a step receives was made by the step
    after it, and the step may overwrite it."""

    def __init__(self, output_handed_over: bool) -> None:
        self.state: State | None = None
        self.output_handed_over = output_handed_over
        self.external: frozenset[int] = frozenset()

    def writable(self, state: State, grads: State) -> tuple[bool, ...]:
        return tuple(
            storage_id(t) not in self.external and storage_id(g) not in self.external
            for t, g in zip(state, grads, strict=True)
        )


def _output_state(ctx, grad_out: State) -> tuple[torch.Tensor | None, State]:
    """(the condition, the output state) of a step's backward: the saved output for the last step (which also
    tells the relay which storages the caller may hold), else the state that the step after it rebuilt."""
    relay = ctx.relay
    try:
        cond, *out = ctx.saved_tensors
    except RuntimeError as error:  # the version check of a saved output that a first backward overwrote
        if relay.output_handed_over:
            raise RuntimeError(
                "This memory-efficient InvertibleSequence was called with hand_over_output=True, so its first "
                "backward pass overwrote its output; it cannot be back-propagated twice (retain_graph). "
                "Call it with hand_over_output=False to back-propagate more than once."
            ) from error
        raise
    if ctx.is_last:
        # a gradient that is not a plain dense tensor (the stride-0 expansion that .sum() hands down)
        # cannot be overwritten in place, handed over or not
        kept_intact = (
            (*out, *grad_out) if not relay.output_handed_over else [g for g in grad_out if not g.is_contiguous()]
        )
        relay.external = frozenset(storage_id(t) for t in kept_intact)
    state, relay.state = (tuple(t.detach() for t in out) if ctx.is_last else relay.state), None
    if state is None:
        raise RuntimeError(
            "A memory-efficient InvertibleSequence was back-propagated from an intermediate step; "
            "gradients must flow from the sequence's output."
        )
    return cond, state


class _ReconstructingStep(torch.autograd.Function):
    """One step of a memory-efficient sequence: runs it without storing activations and, in backward,
    rebuilds its input from its output (handed over by the next step through the relay; the last step
    saves its output) and returns the gradients of its input state, the condition and its parameters.

    One function per step means each step's parameter gradients are handed to ``AccumulateGrad`` as soon
    as that step is reversed: the backward pass never holds more than one step's parameter gradients.
    The output state and gradients a step receives are overwritten with its input state and gradients
    where the relay says that the sequence owns them (every step but the last, as a rule).
    """

    @staticmethod
    def forward(ctx, step, reverse, relay, is_first, is_last, cond, num_state, *tensors):  # type: ignore[override]
        with torch.no_grad():
            state = tensors[:num_state]
            out = step.inverse(state, cond) if reverse else step(state, cond)
        ctx.step, ctx.reverse, ctx.relay, ctx.is_first, ctx.is_last = step, reverse, relay, is_first, is_last
        ctx.device_type = tensors[0].device.type
        ctx.autocast = _autocast_setting(ctx.device_type)  # the backward recomputes under the same setting
        ctx.cond_needs_grad = cond is not None and cond.requires_grad
        ctx.save_for_backward(cond, *(out if is_last else ()))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):  # type: ignore[override]
        relay = ctx.relay
        cond, state = _output_state(ctx, grad_out)
        cond_in = None if cond is None else cond.detach().requires_grad_(ctx.cond_needs_grad)
        step = ctx.step
        with _autocast(ctx.device_type, *ctx.autocast):
            if ctx.reverse:  # the step ran as its inverse: rebuild by applying it forward
                state, grads, grad_cond, grad_params = recompute_reverse(
                    step.inverse, step.forward, _trainable(step), state, tuple(grad_out), cond_in
                )
            else:
                writable = relay.writable(state, grad_out)
                state, grads, grad_cond, grad_params = step.reverse(state, tuple(grad_out), cond_in, writable)
        relay.state = None if ctx.is_first else state  # the sequence's input: nothing before it needs it
        return (None, None, None, None, None, grad_cond, None, *grads, *grad_params)


class _StoredSegment(torch.autograd.Function):
    """Consecutive steps that the memory budget stores, as one link of the relay chain: forward runs them under
    autograd and keeps their graph (their activations), backward differentiates that graph, as plain autograd
    does, and hands the step before it the input state it kept. Inputs that the steps return untouched and
    nothing else reads (the skips carried past a level's blocks) are not kept: they come back with the state that
    the step after the segment hands over, as for a reconstructing step."""

    @staticmethod
    def forward(ctx, steps, relay, is_first, is_last, cond, num_state, *tensors):  # type: ignore[override]
        inputs = tuple(_leaf(t) for t in tensors[:num_state])
        cond_in = None if cond is None else cond.detach().requires_grad_(cond.requires_grad)
        with torch.enable_grad():
            out = _run(steps, inputs, cond_in, reverse=False)
        identical, ctx.passed = passed_through(inputs, out)
        ctx.identical = identical
        ctx.kept = [None if i in ctx.passed.values() else t for i, t in enumerate(inputs)]
        ctx.edges = [
            (j, torch.autograd.graph.get_gradient_edge(o))
            for j, o in enumerate(out)
            if j not in identical and o.requires_grad
        ]
        ctx.cond_in, ctx.params = cond_in, tensors[num_state:]
        ctx.relay, ctx.is_first, ctx.is_last = relay, is_first, is_last
        returned = tuple(o.detach() for o in out)
        ctx.save_for_backward(cond, *(returned if is_last else ()))
        return returned

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):  # type: ignore[override]
        if ctx.edges is None:
            raise RuntimeError(
                "A memory-efficient InvertibleSequence with steps stored by its memory_budget frees "
                "their activations in its first backward pass; it cannot be back-propagated twice "
                "(retain_graph). Set memory_budget=0 to back-propagate more than once."
            )
        relay = ctx.relay
        _, state = _output_state(ctx, grad_out)
        kept = [t for t in ctx.kept if t is not None]
        with_cond = ctx.cond_in is not None and ctx.cond_in.requires_grad
        wrt = [*kept, *([ctx.cond_in] if with_cond else []), *ctx.params]
        if ctx.edges:
            grads = torch.autograd.grad(
                [e for _, e in ctx.edges], wrt, [grad_out[j] for j, _ in ctx.edges], allow_unused=True
            )
        else:
            grads = (None,) * len(wrt)
        grad_kept = iter(grads[: len(kept)])
        inputs, grad_in = list(ctx.kept), [None if t is None else next(grad_kept) for t in ctx.kept]
        for j, i in ctx.passed.items():
            inputs[i] = state[j]
        for j, i in ctx.identical.items():
            grad_in[i] = grad_out[j] if grad_in[i] is None else grad_in[i] + grad_out[j]
        inputs = [t.detach() for t in inputs]
        grad_cond = grads[len(kept)] if with_cond else None
        ctx.kept = ctx.edges = ctx.cond_in = None  # the graph is spent: let its tensors go
        relay.state = None if ctx.is_first else tuple(inputs)
        return (
            None,
            None,
            None,
            None,
            grad_cond,
            None,
            *_zeros_for_none(grad_in, inputs),
            *grads[len(kept) + with_cond :],
        )


class InvertibleSequence(nn.Module):
    """Composition of :class:`InvertibleStep` s, with the memory-saving engine.

    Args:
        steps: the steps, applied in order by ``forward`` and inverted in reverse order by ``inverse``.
        memory_efficient: ``True`` stores only the output state and reconstructs activations in
            backward; ``False`` runs plain autograd (same maths, same results up to rounding). Under
            ``torch.no_grad()`` both run the steps directly: nothing is stored or recomputed.
        memory_budget: bytes of activations the memory-efficient forward pass may keep (0: none, every step is
            rebuilt; ``float("inf")``: every step keeps its activations, as plain autograd). The steps kept are
            those whose recomputation costs the most FLOPs per byte kept, measured once per input shape on
            FakeTensors (:mod:`~bundle.networks.storage_plan`); consecutive kept steps run as one plain-autograd
            segment of the chain. Gradients are the same at every budget; only ``forward`` keeps steps (the
            ``inverse`` under autograd rebuilds them all). Settable on a built model.

    ``forward(state, cond, hand_over_output=True)`` tells the engine that nothing will read the output
    state after the backward pass and that its gradient is not needed elsewhere: the backward pass then
    rebuilds the input in the output's memory instead of copying it first (two state-sized tensors
    fewer at the peak), and the graph cannot be back-propagated twice.
    """

    def __init__(
        self, steps: Sequence[InvertibleStep], memory_efficient: bool = True, memory_budget: float = 0
    ) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.memory_efficient = memory_efficient
        self.memory_budget = memory_budget
        self._costs: dict[tuple, list] = {}  # the steps' costs per input signature (storage_plan.step_costs)

    @property
    def memory_budget(self) -> float:
        """Bytes of activations the memory-efficient forward pass may keep (see the class docstring)."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float) -> None:
        self._memory_budget = check_memory_budget(value)

    def forward(self, state: State, cond: torch.Tensor | None = None, hand_over_output: bool = False) -> State:
        return self._apply_steps(state, cond, reverse=False, hand_over_output=hand_over_output)

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self._apply_steps(state, cond, reverse=True, hand_over_output=False)

    def stored_steps(self, state: State, cond: torch.Tensor | None = None) -> tuple[bool, ...]:
        """Which steps a memory-efficient ``forward(state, cond)`` under autograd keeps, at the current
        :attr:`memory_budget` (the costs are measured at the first call of each input signature)."""
        if self.memory_budget == 0:
            return (False,) * len(self.steps)
        signature = (
            tuple((tuple(t.shape), t.dtype, t.device.type) for t in state),
            None if cond is None else (tuple(cond.shape), cond.dtype, cond.requires_grad),
            _autocast_setting(state[0].device.type),
        )
        if signature not in self._costs:
            self._costs[signature] = step_costs(list(self.steps), state, cond)
        return choose_stored(self._costs[signature], self.memory_budget)

    def _apply_steps(self, state: State, cond: torch.Tensor | None, reverse: bool, hand_over_output: bool) -> State:
        steps = list(self.steps)
        params = _trainable(self)
        autocast_on, _ = _autocast_setting(state[0].device.type)
        if autocast_on:  # e.g. a stem convolution's bfloat16 output: the state itself stays in float32
            state = tuple(t.float() if t.dtype in LOW_PRECISION else t for t in state)
        needs_graph = torch.is_grad_enabled() and (
            any(t.requires_grad for t in state) or bool(params) or (cond is not None and cond.requires_grad)
        )
        if not (self.memory_efficient and needs_graph):
            return _run(steps, state, cond, reverse)
        low = sorted({str(t.dtype) for t in state if t.dtype in LOW_PRECISION})
        if low:
            raise TypeError(
                f"The memory-efficient engine rebuilds activations by inversion, exact only in float32 or float64; "
                f"got a {', '.join(low)} state. Keep the network in float32 and use torch.autocast for mixed "
                "precision (IDMTrainer's amp=True), or set memory_efficient=False."
            )
        stored = (False,) * len(steps) if reverse else self.stored_steps(state, cond)
        if all(stored):  # the whole sequence kept: plain autograd itself
            return _run(steps, state, cond, reverse)
        links: list[tuple[bool, list[InvertibleStep]]] = []  # a reconstructing step, or a segment of stored ones
        for step, keep in zip(reversed(steps) if reverse else steps, stored, strict=True):
            if keep and links and links[-1][0]:
                links[-1][1].append(step)
            else:
                links.append((keep, [step]))
        relay, last = _Relay(hand_over_output), len(links) - 1
        for position, (keep, group) in enumerate(links):
            first, final = position == 0, position == last
            if keep:
                group_params = list({id(p): p for step in group for p in _trainable(step)}.values())
                state = _StoredSegment.apply(group, relay, first, final, cond, len(state), *state, *group_params)
            else:
                state = _ReconstructingStep.apply(
                    group[0], reverse, relay, first, final, cond, len(state), *state, *_trainable(group[0])
                )
        return state
