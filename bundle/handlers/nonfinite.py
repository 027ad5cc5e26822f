"""Stops training on a non-finite loss or gradient, before the optimizer step."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..checkpoint import TrainingCheckpoint
from ..diffusion.loss import LOSS_TERMS
from ..errors import NonFiniteLossError

__all__ = ["NonFiniteLossGuard"]


def _gradients_are_finite(network: nn.Module) -> bool:
    """Whether every parameter gradient of ``network`` is finite (one device synchronisation)."""
    flags = [torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None]
    return not flags or bool(torch.stack(flags).all())


class NonFiniteLossGuard:
    """Raises :class:`~bundle.errors.NonFiniteLossError` when the loss, or a gradient of the engine's
    ``network``, is NaN or infinite (a finite but huge loss can overflow its gradient, and one such step
    would make every weight NaN).

    Attached to ``IterationEvents.LOSS_COMPLETED``, which the IDM trainer fires after the backward pass and
    before the optimizer step: the weights never see the bad step, and checkpoints written at earlier
    epochs stay as they are. With ``optimizer_in_backward`` the update in backward skips every weight's update
    from the first non-finite value on (all of them for a non-finite loss) and the guard reads its flag.
    :class:`~bundle.diffusion.IDMTrainer` stops the run there and raises the error
    from ``run``, so that the entry point reports it once.

    Args:
        ckpt_dir: the :class:`~bundle.handlers.TrainingCheckpoint` directory; the message names its
            ``training_state.pt`` when an earlier epoch wrote it, and says that no checkpoint has been
            written yet otherwise.
    """

    def __init__(self, ckpt_dir: str | os.PathLike) -> None:
        self.state_path = Path(ckpt_dir) / TrainingCheckpoint.STATE

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output[Keys.LOSS]
        finite_loss = bool(torch.isfinite(loss).all())
        update = getattr(engine, "update_in_backward", None)  # the weights were updated in backward
        if finite_loss and (update.all_finite() if update is not None else _gradients_are_finite(engine.network)):
            return
        epoch = engine.state.epoch
        what = (
            f"the loss became {loss.item()}"
            if not finite_loss
            else f"the loss's gradient became non-finite (loss {loss.item()})"
        )
        terms = {k: engine.state.output[k].item() for k in LOSS_TERMS if k in engine.state.output}
        if epoch > 1 and self.state_path.is_file():
            advice = (
                f"the last good checkpoint, {self.state_path} (epoch {epoch - 1}, with {TrainingCheckpoint.MODEL} "
                "beside it), is kept. Check the data for extreme values and resume from it with --resume true, or "
                "lower learning_rate and train afresh with --overwrite true (a resumed run keeps the checkpoint's "
                "learning rate)."
            )
        else:
            advice = (
                "no checkpoint has been written yet (it is written at the end of each epoch), so there is "
                "nothing to resume from. Lower learning_rate or check the data for extreme values, and train again."
            )
        updated = (
            "The weights were not updated with it"
            if update is None or not finite_loss
            else "With optimizer_in_backward no weight was updated from the first non-finite gradient on (the "
            "weights whose gradients were complete before it took this step's finite update in memory; "
            "nothing was checkpointed since)"
        )
        raise NonFiniteLossError(
            f"Training stopped: {what} at epoch {epoch}, iteration {engine.state.iteration} "
            f"(terms: {terms}). {updated}; {advice}"
        )
