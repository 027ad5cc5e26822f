"""The IDM noise predictor: stem, time embedding, invertible U-Net trunk, head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from .convolution import same_conv
from .invertible_unet import InvertibleUNet, LayerFactory

__all__ = ["InvertibleDiffusionUNet", "voxel_coordinates"]


def voxel_coordinates(spatial: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Each voxel's position in a volume of size ``spatial`` (d sides), one channel per axis, from −1 at the first
    voxel to 1 at the last: (d, *spatial). A patch's coordinates are this grid of the whole volume cropped as the
    patch is."""
    axes = [torch.linspace(-1.0, 1.0, s, device=device) if s > 1 else torch.zeros(1, device=device) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


class InvertibleDiffusionUNet(nn.Module):
    """ε-prediction network of the Invertible Diffusion Model (Jain & Teli), MONAI-diffusion compatible.

    ``x (B, in_channels, *S)`` → stem (3×3 conv to ``channels[0]``, stored activations: not invertible,
    as in the paper) → :class:`InvertibleUNet` conditioned on the time embedding
    ``emb = MLP(sinusoid(t))`` (B, 4·channels[0]) → head (zero-initialised 3×3 conv) →
    ``(B, out_channels, *S)``. Stem and head are single convolutions, so the only full-resolution
    tensors stored for backward are the input and the trunk output (which the head and the engine
    share). Spatial sizes that the trunk cannot take are zero-padded at the far
    end and cropped back.

    With ``coordinates`` the stem also reads d channels of each voxel's position in the whole volume
    (:func:`voxel_coordinates`), so that a network trained on patches (:class:`~bundle.diffusion.PatchSampler`) knows
    where each patch lies: an input of ``in_channels`` channels is a whole volume, whose coordinates the network adds;
    one of ``in_channels + d`` carries its own (a patch's) as its last d channels.

    Args:
        spatial_dims: d (2 or 3).
        in_channels: image channels (2: T1 and T2).
        out_channels: predicted noise channels.
        channels: trunk widths per level (default: the paper's 64…2048).
        num_blocks: coupling blocks per level in the encoder and the decoder.
        attention_levels: invertible attention per level, one bool each (default: the last two, as in the paper).
        memory_efficient: reconstruct trunk activations in backward; settable on a built model.
        channel_mixing: orthogonal 1×1 convolution before each coupling (of the default block).
        num_heads: attention heads (of the default attention).
        time_embed_dim: width of the time embedding (default 4·channels[0]).
        recompute_norms: the trunk's coupling functions (of the default block) recompute their GroupNorm–SiLU
            stages in backward instead of storing them: a coupling's reverse step holds 3 fewer half-width
            tensors (the paper configuration's step peak drops by 0.1 GB in micro-batches of 1), for about 5%
            more time per training step (``docs/benchmarks.md``, memory options).
        block: the trunk's block, a :class:`~bundle.networks.invertible_unet.LayerFactory` of layers conditioned
            on the time embedding (B, time_embed_dim); default: couplings after channel mixing
            (:class:`~bundle.networks.invertible_unet.CouplingBlock`). See :class:`InvertibleUNet`.
        attention: the trunk's attention, a ``LayerFactory``; default: invertible checkerboard attention
            (:class:`~bundle.networks.invertible_unet.AttentionPair`).
        memory_budget: bytes of trunk activations the memory-efficient forward pass may keep instead of
            rebuilding them: 0 rebuilds all (the least memory), ``float("inf")`` keeps all (plain autograd's
            speed); in between, the steps whose recomputation costs the most FLOPs per byte are kept (see
            :class:`~bundle.networks.engine.InvertibleSequence`). Gradients are the same at every budget.
            Settable on a built model; ``configs/train.json`` also takes ``"auto"`` (what the device has to
            spare, by the memory plan).
        coordinates: the stem reads d coordinate channels beside the input (patch training, above).

    Attributes:
        config: the constructor arguments that fix the weights' shapes and meaning (all but the run-time options
            ``memory_efficient``, ``recompute_norms`` and ``memory_budget``), as JSON values: what a training run
            records beside its checkpoint (``run.json``) and :class:`~bundle.run_record.TrainedModel` builds the
            network again from. None for a network built with custom ``block`` or ``attention`` factories.

    Raises:
        TypeError: when a flag is not a bool (the configs convert command-line strings), see
            :class:`InvertibleUNet`.
        ValueError: for channel counts below 1 and the trunk's invalid settings.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        out_channels: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
        num_blocks: int = 2,
        attention_levels: Sequence[bool] | None = (False, False, False, False, True, True),
        memory_efficient: bool = True,
        channel_mixing: bool = True,
        num_heads: int = 1,
        time_embed_dim: int | None = None,
        recompute_norms: bool = False,
        block: LayerFactory | None = None,
        attention: LayerFactory | None = None,
        memory_budget: float = 0,
        coordinates: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be ≥ 1, got {in_channels}, {out_channels}.")
        width = int(channels[0])
        embed = time_embed_dim or 4 * width
        self.config = (
            None
            if block is not None or attention is not None
            else {
                "spatial_dims": spatial_dims,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "channels": [int(c) for c in channels],
                "num_blocks": num_blocks,
                "attention_levels": None if attention_levels is None else [bool(a) for a in attention_levels],
                "channel_mixing": channel_mixing,
                "num_heads": num_heads,
                "time_embed_dim": time_embed_dim,
                "coordinates": coordinates,
            }
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.coordinates = coordinates
        self.time_mlp = nn.Sequential(nn.Linear(width, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.stem = same_conv(spatial_dims, in_channels + (spatial_dims if coordinates else 0), width)
        self.trunk = InvertibleUNet(
            spatial_dims,
            channels,
            num_blocks,
            attention_levels,
            cond_dim=embed,
            memory_efficient=memory_efficient,
            channel_mixing=channel_mixing,
            num_heads=num_heads,
            recompute_norms=recompute_norms,
            block=block,
            attention=attention,
            memory_budget=memory_budget,
        )
        self.head = same_conv(spatial_dims, width, out_channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def memory_efficient(self) -> bool:
        """Whether the trunk reconstructs its activations in backward (see :class:`InvertibleUNet`)."""
        return self.trunk.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self.trunk.memory_efficient = value

    @property
    def memory_budget(self) -> float:
        """Bytes of trunk activations the memory-efficient forward pass may keep (see :class:`InvertibleUNet`)."""
        return self.trunk.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float) -> None:
        self.trunk.memory_budget = value

    def time_embedding(self, timesteps: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``MLP(sinusoid(t))`` (B, E) for timesteps of shape (B,) or a scalar."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        if timesteps.numel() != batch:
            raise ValueError(f"timesteps must have one entry per sample ({batch}), got {timesteps.numel()}.")
        return self.time_mlp(get_timestep_embedding(timesteps, self.stem.out_channels).to(dtype))

    @property
    def size_divisor(self) -> int:
        """What each side of the trunk's input must be a multiple of (its levels and checkerboards)."""
        return self.trunk.size_divisor

    def padded_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The spatial size the trunk runs at for inputs of size ``spatial``: each side rounded up to a multiple of
        :attr:`size_divisor` (the input is zero-padded at the far end, the output cropped back)."""
        div = self.size_divisor
        return tuple(-(-int(s) // div) * div for s in spatial)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        spatial = tuple(x.shape[2:])
        pad = [p - s for p, s in zip(self.padded_size(spatial), spatial, strict=True)]
        if any(pad):
            x = F.pad(x, [p for extra in reversed(pad) for p in (0, extra)])
        return x, spatial

    @staticmethod
    def _crop(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        return x[(slice(None), slice(None), *(slice(0, s) for s in spatial))]

    def _check(self, x: torch.Tensor, channels: int, name: str) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != channels:
            raise ValueError(
                f"InvertibleDiffusionUNet.{name} expects shape (B, {channels}, "
                f"{', '.join(['S'] * self.spatial_dims)}), got {tuple(x.shape)}."
            )

    def stem_input(self, x: torch.Tensor, name: str = "forward") -> torch.Tensor:
        """What the stem reads: x (B, in_channels, *S), and with ``coordinates`` the whole volume's coordinates after
        it, or x as given when it carries its own (B, in_channels + d, *S)."""
        if self.coordinates and x.ndim == self.spatial_dims + 2 and x.shape[1] == self.stem.in_channels:
            return x
        self._check(x, self.in_channels, name)
        if not self.coordinates:
            return x
        grid = voxel_coordinates(x.shape[2:], x.device).to(x.dtype)
        return torch.cat([x, grid.expand(x.shape[0], *grid.shape)], dim=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise (B, out_channels, *S) for noisy images x (B, in_channels, *S) at ``timesteps`` (B,) (with
        ``coordinates``, x may carry its own as d more channels).

        ``context`` exists for MONAI's ``DiffusionInferer`` call signature; IDM is unconditional.
        """
        if context is not None:
            raise ValueError("InvertibleDiffusionUNet is unconditional: call it with context=None.")
        x = self.stem_input(x)
        emb = self.time_embedding(timesteps, x.shape[0], x.dtype)
        x, spatial = self._pad(x)
        h = self.trunk(self.stem(x), emb, hand_over_output=True)  # only the head reads h and gives its gradient
        return self._crop(self.head(h), spatial)

    @torch.no_grad()
    def trunk_round_trip_error(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``‖T⁻¹(T(h)) − h‖ / ‖h‖`` per sample, (B,), for the trunk T on ``h = stem(x)`` (x (B, in_channels,
        *S) at ``timesteps``): how far the reconstructions of the memory-efficient backward drift from the
        activations they stand for (float rounding amplified by the trunk's conditioning, about 1e-7–1e-6 in
        float32 for well-conditioned weights; its gradients are exact to about that much)."""
        x = self.stem_input(x, "trunk_round_trip_error")
        emb = self.time_embedding(timesteps, x.shape[0], x.dtype)
        h = self.stem(self._pad(x)[0])
        error = self.trunk.inverse(self.trunk(h, emb), emb) - h
        return error.flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)

    def inverse(self, y: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Approximate inverse ``U⁻¹`` (B, out_channels, *S) → (B, stem's input channels, *S), for the λ_R term of
        Eq. 8 (with ``coordinates``, in_channels + d: the input as the stem read it).

        The trunk is inverted exactly; the stem and the head are not invertible, so their convolutions
        are replaced by their adjoints (transposed convolutions with the same weights, the stem's bias
        subtracted first). It is exact only where the stem and head weights form tight frames;
        training with λ_R > 0 pulls them towards that.
        """
        self._check(y, self.out_channels, "inverse")
        emb = self.time_embedding(timesteps, y.shape[0], y.dtype)
        y, spatial = self._pad(y)
        conv_t = (F.conv_transpose2d, F.conv_transpose3d)[self.spatial_dims - 2]
        bias_shape = (1, -1) + (1,) * self.spatial_dims
        h = conv_t(y - self.head.bias.reshape(bias_shape), self.head.weight, padding=1)
        h = self.trunk.inverse(h, emb) - self.stem.bias.reshape(bias_shape)
        return self._crop(conv_t(h, self.stem.weight, padding=1), spatial)
