"""The invertible U-Net trunk: coupling blocks, learned orthogonal resampling, attention on skips."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .attention import InvertibleAttention
from .coupling import AdditiveCoupling
from .engine import (
    InverseOf,
    InvertibleModule,
    InvertibleSequence,
    InvertibleStep,
    OnTensor,
    ReverseResult,
    State,
    on_tensor_steps,
)
from .orthogonal import OrthogonalChannelMixing, OrthogonalDownsampling

__all__ = ["AttentionPair", "CouplingBlock", "InvertibleUNet", "LayerFactory", "SkipSplit", "skip_channels"]

_FROM_CONFIG = (
    ' The bundle\'s configs convert command-line strings such as "false" to bools before they build the network;'
    " in Python, pass True or False."
)


def _check_bool(value: Any, name: str) -> None:
    """Raises ``TypeError`` naming ``name`` and ``value`` unless ``value`` is a bool (a string is not parsed)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{name} must be a bool (True or False), got {value!r} (a {type(value).__name__})."
            + (_FROM_CONFIG if isinstance(value, str) else "")
        )


def _check_bools(values: Any, name: str, example: tuple[bool, ...]) -> tuple[bool, ...]:
    """``values`` as a tuple, after ``TypeError`` naming ``name`` unless it is a sequence of bools."""
    if (
        isinstance(values, (str, bool))
        or not isinstance(values, Sequence)
        or not all(isinstance(v, bool) for v in values)
    ):
        strings = isinstance(values, str) or (isinstance(values, Sequence) and any(isinstance(v, str) for v in values))
        raise TypeError(
            f"{name} must be a sequence of bools, one per level (e.g. {example}), got {values!r}."
            + (_FROM_CONFIG if strings else "")
        )
    return tuple(values)


class LayerFactory(Protocol):
    """How :class:`InvertibleUNet` builds a block or an attention: ``factory(spatial_dims, channels, cond_dim)``
    returns the invertible layers (:class:`~bundle.networks.engine.InvertibleModule`) that the trunk applies in
    order to one tensor (B, channels, *S) of d = ``spatial_dims`` spatial axes. Each layer must map it to a
    tensor of the same shape and take the condition ``cond`` (B, cond_dim), or None when ``cond_dim`` is None
    (a layer may ignore it). The engine runs each layer as one step (each link of an
    :class:`~bundle.networks.engine.InvertibleChain` as its own step: :func:`~bundle.networks.engine.on_tensor_steps`),
    with the layer's ``reverse`` (the generic invert-and-recompute one unless the layer overrides it).
    Functions and the dataclasses below (:class:`CouplingBlock`, :class:`AttentionPair`) are factories; a
    config can build the latter with ``_target_``."""

    def __call__(self, spatial_dims: int, channels: int, cond_dim: int | None) -> Sequence[InvertibleModule]: ...


@dataclass(frozen=True)
class CouplingBlock:
    """The default block of :class:`InvertibleUNet`, a :class:`LayerFactory`: an orthogonal 1×1 convolution
    (:class:`~bundle.networks.orthogonal.OrthogonalChannelMixing`, when ``channel_mixing``), then an
    :class:`~bundle.networks.coupling.AdditiveCoupling` conditioned on ``cond`` (two engine steps, F and G).

    Args:
        channel_mixing: put the orthogonal 1×1 convolution before the coupling.
        recompute_norms: the coupling functions store only their convolutions' inputs and outputs under
            autograd (see :class:`~bundle.networks.coupling.CouplingFunction`).

    Raises:
        TypeError: when a flag is not a bool.
    """

    channel_mixing: bool = True
    recompute_norms: bool = False

    def __post_init__(self) -> None:
        _check_bool(self.channel_mixing, "channel_mixing")
        _check_bool(self.recompute_norms, "recompute_norms")

    def __call__(self, spatial_dims: int, channels: int, cond_dim: int | None) -> list[InvertibleModule]:
        mixing = [OrthogonalChannelMixing(spatial_dims, channels)] if self.channel_mixing else []
        return [*mixing, AdditiveCoupling(spatial_dims, channels, cond_dim, self.recompute_norms)]


@dataclass(frozen=True)
class AttentionPair:
    """The default attention of :class:`InvertibleUNet`, a :class:`LayerFactory`: two
    :class:`~bundle.networks.attention.InvertibleAttention` layers of checkerboard parities 0 and 1, so that
    each half of the voxels is updated once (``cond`` is not used).

    Args:
        num_heads: attention heads; ``channels`` must be divisible by it.
    """

    num_heads: int = 1

    def __call__(self, spatial_dims: int, channels: int, cond_dim: int | None) -> list[InvertibleModule]:
        return [InvertibleAttention(spatial_dims, channels, parity, self.num_heads) for parity in (0, 1)]


def _factory_steps(
    factory: LayerFactory, name: str, spatial_dims: int, channels: int, cond_dim: int | None, index: int
) -> list[InvertibleStep]:
    """The engine steps of the layers that ``factory`` builds, applied to ``state[index]``.

    Raises:
        TypeError: naming ``name`` when the factory returns anything but invertible modules.
    """
    layers = factory(spatial_dims, channels, cond_dim)
    if not isinstance(layers, Sequence) or not all(isinstance(layer, InvertibleModule) for layer in layers):
        got = [type(layer).__name__ for layer in layers] if isinstance(layers, Sequence) else type(layers).__name__
        raise TypeError(
            f"{name}={factory!r} must return a sequence of InvertibleModule layers (see LayerFactory), got "
            f"{got} for channels={channels}."
        )
    return [step for layer in layers for step in on_tensor_steps(layer, index)]


class SkipSplit(InvertibleStep):
    """Puts the first ``skip`` channels of ``state[0]`` aside: ``(x, *rest) → (x[:, skip:], x[:, :skip], *rest)``.

    Its inverse concatenates them back: the decoder's merge is ``InverseOf`` this step's twin.
    """

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, state: State, cond: torch.Tensor | None = None) -> State:
        x = state[0]
        return (x[:, self.skip :], x[:, : self.skip], *state[1:])

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return (torch.cat([state[1], state[0]], dim=1), *state[2:])

    def reverse(
        self, state: State, grad_state: State, cond: torch.Tensor | None, writable: Sequence[bool] = ()
    ) -> ReverseResult:
        """Data movement only: the input and its gradient are the concatenations (nothing to recompute)."""
        return self.inverse(state), self.inverse(grad_state), None, []


class _SkipMerge(InvertibleStep):
    """Decoder merge, the inverse of :class:`SkipSplit`: ``(x, skip, *rest) → (cat(skip, x), *rest)``."""

    def __init__(self, skip: int) -> None:
        super().__init__()
        self.split = SkipSplit(skip)

    def forward(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self.split.inverse(state, cond)

    def inverse(self, state: State, cond: torch.Tensor | None = None) -> State:
        return self.split(state, cond)

    def reverse(
        self, state: State, grad_state: State, cond: torch.Tensor | None, writable: Sequence[bool] = ()
    ) -> ReverseResult:
        """Data movement only: the input and its gradient are channel slices of the output's. The skip
        part is copied out, so that the merged tensor is freed once its other part has been upsampled
        back (the skip waits in the state for the whole of the deeper levels' backward pass)."""

        def unmerge(tensors: State) -> State:
            x, skip, *rest = self.split(tensors)
            return (x, skip.clone(), *rest)

        return unmerge(state), unmerge(grad_state), None, []


def _suggest_channels(spatial_dims: int, levels: int, first: int) -> tuple[int, ...]:
    """A valid schedule near ``first``: doubling widths, the first a multiple of max(2, 2^(d-1))."""
    step = max(2, 2 ** (spatial_dims - 1))
    base = max(step, -(-first // step) * step)
    return tuple(base * 2**i for i in range(levels))


def skip_channels(spatial_dims: int, channels: Sequence[int]) -> tuple[int, ...]:
    """Skip widths ``s_i = channels[i] − channels[i+1] / 2^d`` of a schedule, validated.

    Raises:
        ValueError: naming a valid schedule, when a width is odd (couplings split channels in half),
            ``channels[i+1]`` is not divisible by 2^d, or a skip would be empty or negative.
    """
    channels = tuple(int(c) for c in channels)
    patch = 2**spatial_dims
    problems = []
    if len(channels) < 1:
        problems.append("it is empty")
    problems += [f"channels[{i}]={c} is odd" for i, c in enumerate(channels) if c % 2 or c < 2]
    skips = []
    for i in range(len(channels) - 1):
        nxt = channels[i + 1]
        if nxt % patch:
            problems.append(f"channels[{i + 1}]={nxt} is not divisible by 2^{spatial_dims}={patch}")
        skip = channels[i] - nxt // patch
        if skip < 1:
            problems.append(f"channels[{i}]={channels[i]} leaves no skip channels (needs > {nxt // patch})")
        skips.append(skip)
    if problems:
        valid = _suggest_channels(spatial_dims, max(len(channels), 1), channels[0] if channels else 16)
        raise ValueError(
            f"Invalid channel schedule channels={channels} for spatial_dims={spatial_dims}: "
            + "; ".join(problems)
            + f". Each width must be even, each next width divisible by {patch}, and channels[i] > "
            f"channels[i+1] / {patch} (the rest is the skip). A valid schedule: channels={valid}."
        )
    return tuple(skips)


def _layer_factories(
    block: LayerFactory | None,
    attention: LayerFactory | None,
    channel_mixing: bool,
    recompute_norms: bool,
    num_heads: int,
) -> tuple[LayerFactory, LayerFactory]:
    """The trunk's block and attention factories: the given ones, or the defaults configured by ``channel_mixing``,
    ``recompute_norms`` and ``num_heads``.

    Raises:
        ValueError: for options of a default given with a factory of one's own.
        TypeError: for a factory that is not callable.
    """
    if block is None:
        block = CouplingBlock(channel_mixing, recompute_norms)
    elif not channel_mixing or recompute_norms:
        raise ValueError(
            f"channel_mixing={channel_mixing} and recompute_norms={recompute_norms} configure the default block, "
            f"but block={block!r} is given: set them in the block instead, e.g. "
            f"block=CouplingBlock(channel_mixing={channel_mixing}, recompute_norms={recompute_norms})."
        )
    if attention is None:
        attention = AttentionPair(num_heads)
    elif num_heads != 1:
        raise ValueError(
            f"num_heads={num_heads} configures the default attention, but attention={attention!r} is given: "
            f"set it in the attention instead, e.g. attention=AttentionPair(num_heads={num_heads})."
        )
    for factory, name in ((block, "block"), (attention, "attention")):
        if not callable(factory):
            raise TypeError(f"{name} must be a LayerFactory (a callable) or None, got {factory!r}.")
    return block, attention


class InvertibleUNet(nn.Module):
    """Fully invertible U-Net (iUNet, Etmann et al. 2020) with invertible attention on its skips.

    Level i works at resolution S / 2^i with ``channels[i]`` channels. Encoder level i: ``num_blocks``
    blocks (by default orthogonal channel mixing, additive coupling: :class:`CouplingBlock`); split off
    ``s_i = channels[i] − channels[i+1]/2^d`` skip channels; attention on the skip where
    ``attention_levels[i]`` (by default invertible checkerboard attention: :class:`AttentionPair`); learned
    orthogonal downsampling of the rest to ``channels[i+1]``. The bottom level (L−1) has ``num_blocks``
    blocks, then attention on the whole tensor if ``attention_levels[L−1]``. Decoder level i: upsampling (the
    exact inverse of a learned orthogonal downsampling with parameters of its own), concatenation with the skip,
    ``num_blocks`` blocks.
    The output has the input's shape, and ``inverse`` is exact up to rounding.

    Args:
        spatial_dims: d (2 or 3).
        channels: widths per level; see :func:`skip_channels` for what is valid.
        num_blocks: blocks per level in the encoder and in the decoder.
        attention_levels: one bool per level (default: none).
        cond_dim: width E of the conditioning vector ``cond`` (B, E) fed to every block and attention, or None.
        memory_efficient: reconstruct activations in backward instead of storing them (see
            :class:`~bundle.networks.engine.InvertibleSequence`); settable on a built model.
        memory_budget: bytes of activations the memory-efficient forward pass may keep instead of rebuilding them
            (0: rebuild all; ``float("inf")``: keep all; see :class:`~bundle.networks.engine.InvertibleSequence`);
            settable on a built model.
        channel_mixing: the default block puts an orthogonal 1×1 convolution before each coupling.
        num_heads: attention heads of the default attention.
        recompute_norms: the default block's coupling functions store only their convolutions' inputs and
            outputs under autograd (in the memory-efficient reverse step: a smaller working set for a little
            more time; see :class:`~bundle.networks.coupling.CouplingFunction`).
        block: a :class:`LayerFactory` called as ``block(spatial_dims, channels[i], cond_dim)`` for each of the
            ``num_blocks`` blocks of each encoder and decoder level: its layers map (B, channels[i], *S_i) to
            the same shape, conditioned on ``cond`` (B, E). Default: ``CouplingBlock(channel_mixing,
            recompute_norms)``; a block of its own takes no ``channel_mixing``/``recompute_norms``.
        attention: a :class:`LayerFactory` called as ``attention(spatial_dims, s_i, cond_dim)`` on the skip
            (B, s_i, *S_i) of each level i < L−1 where ``attention_levels[i]``, and as
            ``attention(spatial_dims, channels[L−1], cond_dim)`` at the bottom. Default:
            ``AttentionPair(num_heads)``; an attention of its own takes no ``num_heads``. Attention at the bottom
            doubles :attr:`size_divisor` (the checkerboard pairs neighbours along the last axis), whichever
            attention it is.

    Raises:
        TypeError: when a flag is not a bool (a string such as ``"false"`` included) or a factory returns
            anything but invertible modules.
        ValueError: naming a valid alternative, for an invalid ``spatial_dims``, ``num_blocks``, channel
            schedule or number of ``attention_levels``, or options of the default block or attention given
            with a factory of one's own.

    Shapes: ``forward(x (B, channels[0], *S), cond (B, E)) → (B, channels[0], *S)``, each of S
    divisible by :attr:`size_divisor`.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        num_blocks: int = 2,
        attention_levels: Sequence[bool] | None = None,
        cond_dim: int | None = None,
        memory_efficient: bool = True,
        channel_mixing: bool = True,
        num_heads: int = 1,
        recompute_norms: bool = False,
        block: LayerFactory | None = None,
        attention: LayerFactory | None = None,
        memory_budget: float = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be ≥ 1, got {num_blocks}.")
        skips = skip_channels(spatial_dims, channels)
        levels = len(channels)
        example = (False,) * max(levels - 2, 0) + (True,) * min(levels, 2)
        attention_levels = (
            (False,) * levels
            if attention_levels is None
            else _check_bools(attention_levels, "attention_levels", example)
        )
        for value, name in (
            (memory_efficient, "memory_efficient"),
            (channel_mixing, "channel_mixing"),
            (recompute_norms, "recompute_norms"),
        ):
            _check_bool(value, name)
        if len(attention_levels) != levels:
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but channels has {levels} levels; "
                f"give one flag per level, e.g. {example}."
            )
        block, attention = _layer_factories(block, attention, channel_mixing, recompute_norms, num_heads)
        self.spatial_dims = spatial_dims
        self.channels = tuple(int(c) for c in channels)
        self.attention_levels = attention_levels
        bottom_attention = 2 if self.attention_levels[-1] else 1
        self.size_divisor = 2 ** (levels - 1) * bottom_attention

        def blocks(width: int) -> list[InvertibleStep]:
            return [
                step
                for _ in range(num_blocks)
                for step in _factory_steps(block, "block", spatial_dims, width, cond_dim, 0)
            ]

        def attend(width: int, index: int) -> list[InvertibleStep]:
            return _factory_steps(attention, "attention", spatial_dims, width, cond_dim, index)

        patch = 2**spatial_dims
        steps: list[InvertibleStep] = []
        for i, width in enumerate(self.channels):
            steps += blocks(width)
            if i == levels - 1:
                if self.attention_levels[i]:
                    steps += attend(width, 0)
                break
            steps.append(SkipSplit(skips[i]))
            if self.attention_levels[i]:
                steps += attend(skips[i], 1)
            steps.append(OnTensor(OrthogonalDownsampling(spatial_dims, self.channels[i + 1] // patch)))
        for i in reversed(range(levels - 1)):
            steps.append(OnTensor(InverseOf(OrthogonalDownsampling(spatial_dims, self.channels[i + 1] // patch))))
            steps.append(_SkipMerge(skips[i]))
            steps += blocks(self.channels[i])
        self.sequence = InvertibleSequence(steps, memory_efficient, memory_budget)

    @property
    def memory_efficient(self) -> bool:
        """Whether backward reconstructs activations (True) or uses plain autograd (False)."""
        return self.sequence.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        _check_bool(value, "memory_efficient")
        self.sequence.memory_efficient = value

    @property
    def memory_budget(self) -> float:
        """Bytes of activations the memory-efficient forward pass may keep (see :class:`InvertibleSequence`)."""
        return self.sequence.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float) -> None:
        self.sequence.memory_budget = value

    def check_input(self, x: torch.Tensor) -> None:
        """Raises ``ValueError`` naming sizes that work if ``x`` does not fit the trunk."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.channels[0]:
            raise ValueError(
                f"InvertibleUNet expects input of shape (B, {self.channels[0]}, "
                f"{', '.join(['S'] * self.spatial_dims)}), got {tuple(x.shape)}."
            )
        spatial = tuple(x.shape[2:])
        if any(s % self.size_divisor for s in spatial):
            ok = tuple(max(self.size_divisor, round(s / self.size_divisor) * self.size_divisor) for s in spatial)
            raise ValueError(
                f"InvertibleUNet: spatial size {spatial} is not divisible by {self.size_divisor} "
                f"(2^(levels-1) for {len(self.channels)} levels"
                + (", ×2 for attention at the bottom level" if self.attention_levels[-1] else "")
                + f"); sizes that work are multiples of {self.size_divisor}, e.g. {ok}."
            )

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, hand_over_output: bool = False
    ) -> torch.Tensor:
        """``hand_over_output``: the output is read by nothing after backward and its gradient is needed
        nowhere else, so backward may overwrite both (see :class:`~bundle.networks.engine.InvertibleSequence`)."""
        self.check_input(x)
        return self.sequence((x,), cond, hand_over_output)[0]

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(y)
        return self.sequence.inverse((y,), cond)[0]
