"""The run's one TensorBoard writer, shared by every handler that writes to ``output_dir``."""

from __future__ import annotations

import atexit

from torch.utils.tensorboard import SummaryWriter

__all__ = ["summary_writer"]


def summary_writer(log_dir: str) -> SummaryWriter:
    """A :class:`~torch.utils.tensorboard.SummaryWriter` on ``log_dir`` that is flushed and closed when the
    process ends (``atexit``), however it ends: after training, or stopped by a non-finite loss or an exception.

    The configuration instantiates it once (``{"_target_": "bundle.handlers.summary_writer", "log_dir":
    "@output_dir"}``) and gives it to every handler that writes to TensorBoard, so that one run writes one event
    file; the handlers never close it. The writer queues events and writes them every two minutes, so without
    the close the last scalars before the end of a run would be lost.
    """
    writer = SummaryWriter(log_dir=log_dir)
    atexit.register(writer.close)  # closing twice is harmless: a closed writer's close does nothing
    return writer
