"""The IDM training objective, paper Eq. 8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSS_TERMS", "unwrap", "weight_norm", "idm_loss"]

# names of the Eq. 8 terms that idm_loss reports (the λ-weighted ones only when their λ > 0)
LOSS_TERMS = ("eps_mse", "reconstruction", "weight_norm")


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the module itself)."""
    return getattr(network, "module", network)


def weight_norm(network: nn.Module) -> torch.Tensor:
    """‖W‖₂: the Euclidean norm of all trainable weights taken together."""
    return torch.sqrt(sum(p.square().sum() for p in network.parameters() if p.requires_grad))


def idm_loss(
    network: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    lambda_rec: float = 0.0,
    lambda_l2: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``‖ε − U(x_t, t)‖² + λ_R ‖x_t − U⁻¹(U(x_t, t))‖² + λ_L2 ‖W‖₂`` (paper Eq. 8; squared norms as means).

    Args:
        network: the noise predictor U (an ``InvertibleDiffusionUNet``, possibly DDP-wrapped; the λ_R
            term calls its approximate inverse).
        noisy: x_t (B, C, *S); timesteps: t (B,); noise: ε (B, C, *S).

    Returns:
        ``(prediction U(x_t, t), total loss, {term name: value})``.
    """
    prediction = network(noisy, timesteps)
    eps_mse = F.mse_loss(prediction.float(), noise.float())
    terms = {"eps_mse": eps_mse}
    total = eps_mse
    if lambda_rec > 0:
        terms["reconstruction"] = F.mse_loss(unwrap(network).inverse(prediction, timesteps), noisy)
        total = total + lambda_rec * terms["reconstruction"]
    if lambda_l2 > 0:
        terms["weight_norm"] = weight_norm(network)
        total = total + lambda_l2 * terms["weight_norm"]
    return prediction, total, terms
