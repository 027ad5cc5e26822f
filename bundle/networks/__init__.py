"""Invertible layers, invertible attention, the invertible U-Net trunk and the IDM network."""

from .attention import InvertibleAttention, checkerboard_indices
from .coupling import AdditiveCoupling, CouplingFunction, HalfCoupling
from .engine import (
    CouplingLayer,
    InverseOf,
    InvertibleChain,
    InvertibleModule,
    InvertibleSequence,
    InvertibleStep,
    OnTensor,
    on_tensor_steps,
)
from .idm import InvertibleDiffusionUNet, voxel_coordinates
from .invertible_unet import AttentionPair, CouplingBlock, InvertibleUNet, LayerFactory, SkipSplit, skip_channels
from .orthogonal import OrthogonalChannelMixing, OrthogonalDownsampling, cayley, haar_matrix

__all__ = [
    "AdditiveCoupling",
    "AttentionPair",
    "CouplingBlock",
    "CouplingFunction",
    "CouplingLayer",
    "HalfCoupling",
    "InverseOf",
    "InvertibleAttention",
    "InvertibleChain",
    "InvertibleDiffusionUNet",
    "InvertibleModule",
    "InvertibleSequence",
    "InvertibleStep",
    "InvertibleUNet",
    "LayerFactory",
    "OnTensor",
    "OrthogonalChannelMixing",
    "OrthogonalDownsampling",
    "SkipSplit",
    "cayley",
    "checkerboard_indices",
    "haar_matrix",
    "on_tensor_steps",
    "skip_channels",
    "voxel_coordinates",
]
