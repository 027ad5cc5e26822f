"""One training step of a network under test: the unit every benchmark measures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from bundle.diffusion import ema_with_warmup, idm_loss, idm_loss_backward
from bundle.diffusion.update_in_backward import UpdateInBackward
from bundle.networks import InvertibleDiffusionUNet

from .baselines import count_parameters, enable_activation_checkpointing, matched_monai_unet

__all__ = ["NETWORKS", "TrainingStep", "Workload", "build_network", "make_training_step", "monai_arguments"]

NETWORKS = ("idm", "idm_plain", "monai", "monai_checkpointed")


@dataclass(frozen=True)
class Workload:
    """A network and a training-step shape.

    ``network``: ``"idm"`` (memory-efficient), ``"idm_plain"`` (same network, plain autograd),
    ``"monai"`` (MONAI ``DiffusionModelUNet`` matched to the IDM's parameter count, see
    :func:`~scripts.benchmarking.baselines.matched_monai_unet`) or ``"monai_checkpointed"`` (the same with
    activation checkpointing on its blocks). The IDM fields describe the IDM that the baselines are
    matched to. ``baseline_widths_at``: ``None`` matches each baseline to this IDM; ``k`` fixes the
    baseline's widths by matching it (``num_res_blocks = k``) to the IDM with ``k`` blocks per level and
    then gives it ``num_res_blocks = num_blocks``, so that a depth sweep adds blocks to the baseline
    instead of changing its widths. ``micro_batch_size``: samples back-propagated at once (gradient
    accumulation, as the trainer's ``micro_batch_size``); ``None`` is the whole batch. ``recompute_norms``
    and ``memory_budget``: the IDM's options of those names. ``optimizer_in_backward``: the AdamW (and EMA) update
    inside backward (:class:`~bundle.diffusion.update_in_backward.UpdateInBackward`). ``ema``: an EMA of the weights
    (decay 0.999, updated every step, as the trainer's).
    """

    network: str
    size: int
    batch_size: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    spatial_dims: int = 3
    in_channels: int = 2
    seed: int = 0
    baseline_widths_at: int | None = None
    micro_batch_size: int | None = None
    recompute_norms: bool = False
    memory_budget: float = 0.0
    optimizer_in_backward: bool = False
    ema: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _idm(workload: Workload, memory_efficient: bool) -> InvertibleDiffusionUNet:
    return InvertibleDiffusionUNet(
        workload.spatial_dims,
        workload.in_channels,
        workload.in_channels,
        workload.channels,
        workload.num_blocks,
        workload.attention_levels,
        memory_efficient=memory_efficient,
        recompute_norms=workload.recompute_norms,
        memory_budget=workload.memory_budget,
    )


def monai_arguments(workload: Workload) -> dict:
    """Constructor arguments of the MONAI ``DiffusionModelUNet`` of ``workload`` (a ``"monai…"`` network):
    matched (:func:`~scripts.benchmarking.baselines.matched_monai_unet`, ±10%) to the parameter count of the
    IDM that ``workload`` describes, or to the one with ``baseline_widths_at`` blocks (see :class:`Workload`)."""
    reference = workload.num_blocks if workload.baseline_widths_at is None else workload.baseline_widths_at
    with torch.device("meta"):
        target = count_parameters(_idm(replace(workload, num_blocks=reference), True))
        blocks = (2, 1, 3) if workload.baseline_widths_at is None else (reference,)
        kwargs = matched_monai_unet(
            target,
            workload.spatial_dims,
            workload.in_channels,
            workload.in_channels,
            workload.attention_levels,
            num_res_blocks=blocks,
        )[1]
    if workload.baseline_widths_at is not None:
        kwargs["num_res_blocks"] = workload.num_blocks
    return kwargs


def build_network(workload: Workload) -> nn.Module:
    """The network of ``workload``, seeded by ``workload.seed``."""
    if workload.network not in NETWORKS:
        raise ValueError(f"Unknown network {workload.network!r}; choose one of {NETWORKS}.")
    if workload.network.startswith("monai"):
        kwargs = monai_arguments(workload)
        torch.manual_seed(workload.seed)
        baseline = DiffusionModelUNet(**kwargs)
        return enable_activation_checkpointing(baseline) if workload.network == "monai_checkpointed" else baseline
    torch.manual_seed(workload.seed)
    return _idm(workload, workload.network == "idm")


class TrainingStep(NamedTuple):
    """``step()`` runs forward, backward (``micro_batch_size`` samples at a time) and an AdamW update on a
    fixed ε-prediction batch; ``loss(part)`` is the forward alone of the samples ``part`` (by default the
    whole batch; for counting stored bytes and profiling); ``optimizer`` is the AdamW that ``step`` updates."""

    step: Callable[[], None]
    loss: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer


def make_training_step(workload: Workload, model: nn.Module, device: torch.device | str = "cpu") -> TrainingStep:
    """The training step of ``workload`` for ``model`` (already on ``device``)."""
    generator = torch.Generator().manual_seed(workload.seed)
    shape = (workload.batch_size, workload.in_channels) + (workload.size,) * workload.spatial_dims
    x = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (workload.batch_size,), generator=generator).to(device)
    # fused, as the trainer's: one in-place kernel, where the default on CUDA (foreach) allocates a copy of
    # every second moment at the update; the meta device (FLOP counting) has no fused kernel
    fused = torch.device(device).type != "meta"
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, fused=fused)
    ema = (
        torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
        if workload.ema
        else None
    )
    update = UpdateInBackward(model, optimizer, ema) if workload.optimizer_in_backward else None

    def loss(part: slice = slice(None)) -> torch.Tensor:
        return idm_loss(model, x[part], timesteps[part], noise[part], lambda_rec=0.0, lambda_l2=0.0)[1]

    def step() -> None:
        optimizer.zero_grad(set_to_none=update is not None)
        idm_loss_backward(model, x, timesteps, noise, 0.0, 0.0, workload.micro_batch_size, update=update)
        if update is None:
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)

    return TrainingStep(step, loss, optimizer)
