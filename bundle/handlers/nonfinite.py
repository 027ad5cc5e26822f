"""Stops training on a non-finite loss, before the optimizer step."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from ..diffusion.loss import LOSS_TERMS
from ..errors import NonFiniteLossError

__all__ = ["NonFiniteLossGuard"]


class NonFiniteLossGuard:
    """Raises :class:`~bundle.errors.NonFiniteLossError` when the loss is NaN or infinite.

    Attached to ``IterationEvents.LOSS_COMPLETED``, which the IDM trainer fires before the optimizer
    step: the weights never see the bad step, and checkpoints written at earlier epochs stay as they are.

    Args:
        ckpt_dir: named in the message as where the last good checkpoint is.
    """

    def __init__(self, ckpt_dir: str = "") -> None:
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = engine.state.output[Keys.LOSS]
        if not torch.isfinite(loss).all():
            terms = {k: engine.state.output[k].item() for k in LOSS_TERMS if k in engine.state.output}
            raise NonFiniteLossError(
                f"Training stopped: the loss became {loss.item()} at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration} (terms: {terms}). The weights were not updated with it; the last good "
                f"checkpoint in {self.ckpt_dir!r} is kept. Lower learning_rate, check the data for extreme "
                "values, or resume from the checkpoint."
            )
