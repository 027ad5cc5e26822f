"""The IDM training objective, paper Eq. 8."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from ..utils import unwrap
from .maths import with_condition
from .update_in_backward import UpdateInBackward, check_whole_batch

__all__ = ["LOSS_TERMS", "idm_loss", "idm_loss_backward", "micro_batches", "weight_norm"]

# names of the Eq. 8 terms that idm_loss reports (the λ-weighted ones only when their λ > 0); prediction_mse is the
# network's error on its target: ε, or the velocity of a rectified flow (bundle.diffusion.objectives)
LOSS_TERMS = ("prediction_mse", "reconstruction", "weight_norm")


def weight_norm(network: nn.Module) -> torch.Tensor:
    """‖W‖₂: the Euclidean norm of all trainable weights taken together."""
    return torch.sqrt(sum(p.square().sum() for p in network.parameters() if p.requires_grad))


def idm_loss(
    network: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    lambda_rec: float = 0.0,
    lambda_l2: float = 1e-4,
    condition: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``‖ε − U(x_t, t)‖² + λ_R ‖x_t − U⁻¹(U(x_t, t))‖² + λ_L2 ‖W‖₂`` (paper Eq. 8; squared norms as means), with the
    objective's ``target`` in place of ε (:func:`~bundle.diffusion.objectives.training_target`: ε, or a rectified
    flow's velocity).

    Args:
        network: the predictor U (an ``InvertibleDiffusionUNet``, possibly DDP-wrapped; the λ_R term calls its
            approximate inverse).
        noisy: x_t (B, C, *S); timesteps: t (B,); target: what U should predict (B, C, *S).
        condition: a conditioned model's given modalities (B, K, *S), which U reads beside x_t
            (:func:`~bundle.diffusion.maths.with_condition`; the λ_R term then rebuilds both, and the coordinates
            of a network that reads them: ``stem_input``), or None.

    Returns:
        ``(prediction U(x_t, t), total loss, {term name: value})``.
    """
    inputs = with_condition(noisy, condition)
    prediction = network(inputs, timesteps)
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # half precision predictions: a float32 loss
    prediction_mse = F.mse_loss(prediction.to(dtype), target.to(dtype))
    terms = {"prediction_mse": prediction_mse}
    total = prediction_mse
    if lambda_rec > 0:
        model = unwrap(network)
        terms["reconstruction"] = F.mse_loss(model.inverse(prediction, timesteps), model.stem_input(inputs))
        total = total + lambda_rec * terms["reconstruction"]
    if lambda_l2 > 0:
        terms["weight_norm"] = weight_norm(network)
        total = total + lambda_l2 * terms["weight_norm"]
    return prediction, total, terms


def micro_batches(batch_size: int, micro_batch_size: int | None) -> list[slice]:
    """The consecutive slices of at most ``micro_batch_size`` samples (None: one slice) that cover a batch.

    Raises a :class:`~bundle.errors.BadInputError` (a ``ValueError``) naming ``batch_size`` unless it is a
    positive integer, and ``micro_batch_size`` unless it is None or a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive integer (samples per training step); got {batch_size!r}.")
    if micro_batch_size is None:
        return [slice(0, batch_size)]
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise BadInputError(
            f"micro_batch_size must be a positive integer (samples back-propagated at once) or null for the whole "
            f"batch at once; got {micro_batch_size!r}."
        )
    return [slice(start, min(start + micro_batch_size, batch_size)) for start in range(0, batch_size, micro_batch_size)]


def idm_loss_backward(
    network: nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    lambda_rec: float = 0.0,
    lambda_l2: float = 1e-4,
    micro_batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    condition: torch.Tensor | None = None,
    update: UpdateInBackward | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Back-propagates the Eq. 8 loss of a batch (:func:`idm_loss`) into ``.grad``, ``micro_batch_size``
    samples at a time (None: the whole batch at once). Gradient accumulation: a step's activation memory
    is that of one micro-batch. With ``amp_dtype`` the forward passes run under ``torch.autocast`` in that
    dtype (mixed precision; the backward passes follow the forward's dtypes). ``condition``: as :func:`idm_loss`.

    Micro-batch k of b_k samples contributes ``(b_k / B) (‖target − U‖² + λ_R ‖x_t − U⁻¹(U)‖²)``; the network treats
    samples independently (GroupNorm and attention act within a sample), so the gradient is the whole batch's up to
    float rounding. The weight term ``λ_L2 ‖W‖₂`` is back-propagated on its own, before the micro-batches: inside
    the network's backward its gradient for each weight would wait for the network's gradient of that weight (a
    copy of every weight, alive through the whole backward pass). Under ``DistributedDataParallel`` every backward
    but the last micro-batch's runs in ``no_sync()``: gradients are all-reduced once per batch.

    With ``update`` (:class:`~bundle.diffusion.update_in_backward.UpdateInBackward`) the optimizer steps inside the
    backward pass instead: the batch goes at once, the weight term is added to each gradient by the update (with
    ‖W‖₂ of the weights before the step) instead of back-propagated, and no gradient is left in ``.grad``.

    Returns:
        ``(prediction U(x_t, t) (B, C, *S), total loss, {term name: value})``, all detached; the loss and
        the terms are those of the whole batch.
    """
    batch = noisy.shape[0]
    parts = micro_batches(batch, micro_batch_size)
    if update is not None:
        check_whole_batch(batch, micro_batch_size)
    no_sync = network.no_sync if hasattr(network, "no_sync") else nullcontext
    predictions, losses, terms = [], [], {}
    norm = None
    if lambda_l2 > 0 and update is not None:
        with torch.no_grad():
            norm = weight_norm(network)
    elif lambda_l2 > 0:
        with no_sync():
            norm = weight_norm(network)
            (lambda_l2 * norm).backward()
        norm = norm.detach()
    for part in parts:
        fraction = (part.stop - part.start) / batch
        with nullcontext() if part is parts[-1] else no_sync():
            with nullcontext() if amp_dtype is None else torch.autocast(noisy.device.type, dtype=amp_dtype):
                prediction, part_loss, part_terms = idm_loss(
                    network,
                    noisy[part],
                    timesteps[part],
                    target[part],
                    lambda_rec,
                    lambda_l2=0.0,
                    condition=None if condition is None else condition[part],
                )
            if update is not None:
                update.arm(torch.isfinite(part_loss), lambda_l2, norm)
            (fraction * part_loss).backward()
            if update is not None:
                update.finish()
        predictions.append(prediction.detach())
        losses.append(fraction * part_loss.detach())
        for name, value in part_terms.items():
            terms.setdefault(name, []).append(fraction * value.detach())
    if norm is not None:
        losses.append(lambda_l2 * norm)
        terms["weight_norm"] = [norm]
    return torch.cat(predictions), torch.stack(losses).sum(), {k: torch.stack(v).sum() for k, v in terms.items()}
