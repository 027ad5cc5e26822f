"""The invertible U-Net trunk: coupling blocks, learned orthogonal resampling, attention on skips."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..flags import as_flag, as_flags
from .attention import InvertibleAttention
from .coupling import AdditiveCoupling
from .engine import InverseOf, InvertibleSequence, InvertibleStep, OnTensor, ReverseResult, State, on_tensor_steps
from .orthogonal import OrthogonalChannelMixing, OrthogonalDownsampling

__all__ = ["SkipSplit", "skip_channels", "InvertibleUNet"]


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


class InvertibleUNet(nn.Module):
    """Fully invertible U-Net (iUNet, Etmann et al. 2020) with invertible attention on its skips.

    Level i works at resolution S / 2^i with ``channels[i]`` channels. Encoder level i: ``num_blocks``
    × (orthogonal channel mixing, additive coupling); split off ``s_i = channels[i] − channels[i+1]/2^d``
    skip channels; invertible attention on the skip where ``attention_levels[i]``; learned orthogonal
    downsampling of the rest to ``channels[i+1]``. The bottom level (L−1) has ``num_blocks`` blocks, then
    attention on the whole tensor if ``attention_levels[L−1]``. Decoder level i: upsampling (the
    inverse of its own learned downsampling), concatenation with the skip, ``num_blocks`` blocks.
    The output has the input's shape, and ``inverse`` is exact up to rounding.

    Args:
        spatial_dims: d (2 or 3).
        channels: widths per level; see :func:`skip_channels` for what is valid.
        num_blocks: blocks per level in the encoder and in the decoder.
        attention_levels: one flag per level (default: none).
        cond_dim: width E of the conditioning vector ``cond`` (B, E) fed to every coupling, or None.
        memory_efficient: reconstruct activations in backward instead of storing them (see
            :class:`~bundle.networks.engine.InvertibleSequence`); settable on a built model.
        channel_mixing: put an orthogonal 1×1 convolution before each coupling.
        num_heads: attention heads.
        recompute_norms: the coupling functions store only their convolutions' inputs and outputs under
            autograd (in the memory-efficient reverse step: a smaller working set for a little more time;
            see :class:`~bundle.networks.coupling.CouplingFunction`).

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
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be ≥ 1, got {num_blocks}.")
        skips = skip_channels(spatial_dims, channels)
        levels = len(channels)
        attention_levels = as_flags(attention_levels, "attention_levels") if attention_levels is not None else (False,) * levels
        memory_efficient = as_flag(memory_efficient, "memory_efficient")
        channel_mixing = as_flag(channel_mixing, "channel_mixing")
        recompute_norms = as_flag(recompute_norms, "recompute_norms")
        if len(attention_levels) != levels:
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but channels has {levels} levels; "
                f"give one flag per level, e.g. {(False,) * (levels - 2) + (True, True)}."
            )
        self.spatial_dims = spatial_dims
        self.channels = tuple(int(c) for c in channels)
        self.attention_levels = attention_levels
        bottom_attention = 2 if self.attention_levels[-1] else 1
        self.size_divisor = 2 ** (levels - 1) * bottom_attention

        def blocks(width: int) -> list[InvertibleStep]:
            steps: list[InvertibleStep] = []
            for _ in range(num_blocks):
                if channel_mixing:
                    steps.append(OnTensor(OrthogonalChannelMixing(spatial_dims, width)))
                steps += on_tensor_steps(AdditiveCoupling(spatial_dims, width, cond_dim, recompute_norms))
            return steps

        def attention(width: int, index: int) -> list[InvertibleStep]:
            return [OnTensor(InvertibleAttention(spatial_dims, width, p, num_heads), index) for p in (0, 1)]

        patch = 2**spatial_dims
        steps: list[InvertibleStep] = []
        for i, width in enumerate(self.channels):
            steps += blocks(width)
            if i == levels - 1:
                if self.attention_levels[i]:
                    steps += attention(width, 0)
                break
            steps.append(SkipSplit(skips[i]))
            if self.attention_levels[i]:
                steps += attention(skips[i], 1)
            steps.append(OnTensor(OrthogonalDownsampling(spatial_dims, self.channels[i + 1] // patch)))
        for i in reversed(range(levels - 1)):
            steps.append(OnTensor(InverseOf(OrthogonalDownsampling(spatial_dims, self.channels[i + 1] // patch))))
            steps.append(_SkipMerge(skips[i]))
            steps += blocks(self.channels[i])
        self.sequence = InvertibleSequence(steps, memory_efficient)

    @property
    def memory_efficient(self) -> bool:
        """Whether backward reconstructs activations (True) or uses plain autograd (False)."""
        return self.sequence.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self.sequence.memory_efficient = as_flag(value, "memory_efficient")

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
