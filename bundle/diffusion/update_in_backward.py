"""The optimizer step inside the backward pass: each parameter is updated, and its gradient freed, as soon as the
gradient is complete, so that no full set of gradients ever exists (16 → 12 bytes per parameter with AdamW)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import BadInputError
from ..utils import unwrap

__all__ = ["UpdateInBackward", "check_whole_batch"]


def check_whole_batch(batch_size: int, micro_batch_size: int | str | None) -> None:
    """The rule of the optimizer step inside backward, for the settings, the trainer and the loss alike: each weight is
    updated as soon as its gradient is complete, so the batch of ``batch_size`` is back-propagated at once.

    Raises:
        BadInputError: for a ``micro_batch_size`` other than None or ``batch_size`` (micro-batches would need the
            whole gradient kept between them).
    """
    if micro_batch_size not in (None, batch_size):
        raise BadInputError(
            f"optimizer_in_backward updates each weight as soon as its gradient is complete, so the batch of "
            f"{batch_size} is back-propagated at once, and micro_batch_size {micro_batch_size!r} would need the whole "
            "gradient kept between micro-batches: pass --micro_batch_size null (or a smaller --batch_size), or "
            "--optimizer_in_backward false to keep micro-batches."
        )


class UpdateInBackward:
    """Runs ``optimizer``'s AdamW update of each parameter of ``network`` from a
    ``register_post_accumulate_grad_hook``, then the EMA update of that parameter, and frees its gradient.

    The update is the configured optimizer's own: one ``torch.optim.AdamW`` per parameter with that optimizer's
    hyperparameters (read again at every step, so a learning-rate schedule applies) and its state (the moments
    live in ``optimizer.state``, so checkpoints and resumes are unchanged). The weight term λ_L2 ‖W‖₂ of Eq. 8 is
    added to each gradient as ``λ_L2 W / ‖W‖₂``, with ‖W‖₂ of the weights before the step, which is what its own
    backward pass gives. The EMA follows each parameter with ``ema.multi_avg_fn`` (a copy at its first update), as
    ``AveragedModel.update_parameters`` does.

    Non-finite values: :meth:`arm` starts a step with a device flag set by a non-finite loss; each gradient found
    non-finite sets it too; while it is set, the updates (fused AdamW's ``found_inf``) and the EMA's are skipped on
    the device, without a synchronisation. So a non-finite loss changes no weight, and a non-finite gradient
    changes none from there on: what the backward pass had updated before it keeps this step's (finite) update.
    :meth:`all_finite` tells the non-finite guard.

    Args:
        network: the trained network (a DDP wrapper is refused: its all-reduce runs after these hooks).
        optimizer: a ``torch.optim.AdamW`` (or ``Adam``) with ``fused=True`` over ``network``'s parameters.
        ema: the ``AveragedModel`` of ``network``, or None.

    Raises:
        BadInputError: for another optimizer, one without ``fused=True`` or without all of the network's parameters,
            an EMA without ``multi_avg_fn``, or a DDP-wrapped network.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
    ) -> None:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            raise BadInputError(
                "optimizer_in_backward cannot run under DistributedDataParallel: each update would run before the "
                "gradients are all-reduced, so the ranks' weights would drift apart. Train on one device with "
                "optimizer_in_backward, or across devices with --optimizer_in_backward false."
            )
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or not all(
            g.get("fused") for g in optimizer.param_groups
        ):
            raise BadInputError(
                f"optimizer_in_backward needs torch.optim.AdamW with fused=True (as configs/train.json builds it); "
                f"got {type(optimizer).__name__} with fused={[g.get('fused') for g in optimizer.param_groups]}."
            )
        if ema is not None and ema.multi_avg_fn is None:
            raise BadInputError(
                "optimizer_in_backward updates the EMA one parameter at a time through its "
                "multi_avg_fn (configs/train.json's ema_with_warmup); this AveragedModel has none."
            )
        self.network, self.optimizer, self.ema = network, optimizer, ema
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        trainable = [p for p in network.parameters() if p.requires_grad]
        missing = [name for name, p in network.named_parameters() if p.requires_grad and id(p) not in groups]
        if missing:
            raise BadInputError(
                f"optimizer_in_backward: the optimizer does not hold these trainable parameters of "
                f"the network: {missing[:5]}{' …' if len(missing) > 5 else ''}."
            )
        ema_params = (
            dict(zip(map(id, network.parameters()), ema.module.parameters(), strict=True)) if ema is not None else {}
        )
        accepted = inspect.signature(type(optimizer).__init__).parameters

        def alone(p: nn.Parameter) -> torch.optim.Optimizer:
            return type(optimizer)([p], **{k: v for k, v in groups[id(p)].items() if k != "params" and k in accepted})

        self._updates = {id(p): (p, groups[id(p)], alone(p), ema_params.get(id(p))) for p in trainable}
        self._pending: set[int] = set()
        self._l2_scale: torch.Tensor | None = None  # λ_L2 / (2‖W‖₂)
        self._n_averaged: torch.Tensor | None = None
        self.bad = torch.zeros((), dtype=torch.float32, device=trainable[0].device)
        for p in trainable:
            p.register_post_accumulate_grad_hook(self._hook)

    def arm(self, loss_is_finite: torch.Tensor, lambda_l2: float = 0.0, norm: torch.Tensor | None = None) -> None:
        """Starts a step: ``loss_is_finite`` (a device bool), the weight term's λ_L2 and ‖W‖₂ (before the step)."""
        self.bad = (~loss_is_finite).float().reshape(())
        self._l2_scale = (
            None if not lambda_l2 > 0 else torch.tensor(lambda_l2, dtype=norm.dtype, device=norm.device) / (2 * norm)
        )
        self._pending = set(self._updates)
        self._n_averaged = None if self.ema is None else self.ema.n_averaged.detach().cpu()
        for _, group, update, _ in self._updates.values():
            update.state = self.optimizer.state  # shared moments (a resume replaces the optimizer's dict)
            update.param_groups[0].update({k: v for k, v in group.items() if k != "params"})

    def _hook(self, p: nn.Parameter) -> None:
        if id(p) in self._pending:
            self._update(p)

    @torch.no_grad()
    def _update(self, p: nn.Parameter) -> None:
        self._pending.discard(id(p))
        _, _, update, ema_p = self._updates[id(p)]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if self._l2_scale is not None:  # λ_L2 ∂‖W‖₂/∂W rounded as autograd rounds it: λ_L2 / (2‖W‖₂) · 2W
            p.grad.add_(self._l2_scale * (2 * p))
        self.bad = torch.maximum(self.bad, (~torch.isfinite(p.grad).all()).float())
        update.found_inf = self.bad
        update.step()
        p.grad = None
        if ema_p is not None:
            self._follow(ema_p, p)

    def _follow(self, ema_p: torch.Tensor, p: torch.Tensor) -> None:
        """The EMA's update of one tensor, none while :attr:`bad` is set."""
        target = torch.where(self.bad > 0, ema_p, p.detach())
        if int(self._n_averaged) == 0:
            ema_p.copy_(target)
        else:
            self.ema.multi_avg_fn([ema_p.detach()], [target], self._n_averaged)

    @torch.no_grad()
    def finish(self) -> None:
        """Ends the step: updates the parameters that no gradient reached (with the weight term only, as the
        ordinary step does), the EMA's buffers and its count."""
        if self._l2_scale is not None:
            for key in list(self._pending):
                self._update(self._updates[key][0])
        self._pending = set()
        self.optimizer._opt_called = True  # it stepped, one parameter at a time: what an LR scheduler checks for
        if self.ema is not None:
            for ema_b, b in zip(self.ema.module.buffers(), unwrap(self.network).buffers(), strict=True):
                if self.ema.use_buffers:
                    self._follow(ema_b, b)
                else:  # AveragedModel keeps such buffers equal to the model's
                    ema_b.copy_(torch.where(self.bad > 0, ema_b, b))
            self.ema.n_averaged += (self.bad == 0).long()

    def all_finite(self) -> bool:
        """Whether the last step's loss and gradients were finite (one synchronisation)."""
        return bool(self.bad == 0)
