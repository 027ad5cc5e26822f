"""optimizer_in_backward: the AdamW and EMA updates inside the backward pass against the ordinary step, the gradients
it never keeps, non-finite steps, what it refuses, and its memory plan."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion import IDMTrainer, NoiseSampler, ema_with_warmup
from bundle.diffusion.update_in_backward import UpdateInBackward
from bundle.errors import BadInputError, NonFiniteLossError
from bundle.handlers import NonFiniteLossGuard
from bundle.memory_plan import plan_config
from bundle.networks import InvertibleDiffusionUNet
from tests.conftest import SMALL_TRAINING, run_bundle
from tests.test_memory_plan import TINY, TRAIN


def _trainer(
    in_backward: bool,
    lr: float = 1e-3,
    lambda_l2: float = 1e-2,
    epochs: int = 2,
    handlers: list | None = None,
    data_scale: float = 1.0,
) -> IDMTrainer:
    """A small 3D IDM with EMA, λ_L2, weight decay and a learning rate that the epochs change."""
    torch.manual_seed(0)
    network = InvertibleDiffusionUNet(3, 2, 2, (8, 16, 32), 2, (False, True, True))
    ema = torch.optim.swa_utils.AveragedModel(network, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.01, fused=True)
    data = [
        {"image": data_scale * torch.rand(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(i))}
        for i in range(3)
    ]
    trainer = IDMTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        scheduler=DDPMScheduler(num_train_timesteps=100),
        noise_sampler=NoiseSampler(100),
        lambda_l2=lambda_l2,
        ema=ema,
        optimizer_in_backward=in_backward,
        train_handlers=handlers or [],
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: schedule.step())
    return trainer


def _state(trainer: IDMTrainer) -> dict[str, torch.Tensor]:
    moments = {f"opt.{i}.{k}": v for i, s in trainer.optimizer.state_dict()["state"].items() for k, v in s.items()}
    return {
        **{f"net.{k}": v for k, v in trainer.network.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
        **moments,
    }


def test_six_steps_in_backward_equal_six_ordinary_steps(one_torch_thread):
    """Weights, EMA weights and count, and AdamW's moments and step counts after 6 steps over 2 epochs (a learning
    rate halved between them), with λ_L2 and weight decay: equal to the ordinary step's within 1e-6 (relative, each
    tensor), and far from the start."""
    ordinary, in_backward, start = _trainer(False), _trainer(True), _trainer(False)
    ordinary.run()
    in_backward.run()
    a, b, s = _state(ordinary), _state(in_backward), _state(start)
    assert a.keys() == b.keys()
    for key in a:
        scale = a[key].float().abs().max().clamp_min(1e-30)
        assert float((a[key].float() - b[key].float()).abs().max() / scale) <= 1e-6, key
    assert a["ema.n_averaged"] == 6 and in_backward.optimizer.param_groups[0]["lr"] == 2.5e-4
    moved = max(float((a[k] - s[k]).abs().max()) for k in s if k.startswith("net."))
    assert moved > 1e-3
    assert all(p.grad is None for p in in_backward.network.parameters())


def test_no_full_set_of_gradients_exists_during_backward(one_torch_thread):
    """The most gradients alive at once during a backward pass in backward is a small share of the parameters (the
    engine hands them over one step at a time); the ordinary step holds all of them."""
    counts = {}
    for in_backward in (False, True):
        trainer = _trainer(in_backward, epochs=1)
        params = list(trainer.network.parameters())
        alive = []

        def count(_p: torch.Tensor, params=params, alive=alive) -> None:
            alive.append(sum(p.grad is not None for p in params))

        for p in params:  # registered after the update's own hooks: runs after each update has freed its gradient
            p.register_post_accumulate_grad_hook(count)
        trainer.run()
        counts[in_backward] = max(alive) / len(params)
    assert counts[False] == 1.0
    assert counts[True] < 0.1, counts


def test_a_non_finite_loss_changes_no_weight_and_stops_training(tmp_path, one_torch_thread):
    """Weights and EMA as they were; AdamW's state as a fresh one (zero moments, zero steps)."""
    trainer = _trainer(True, lambda_l2=float("inf"), handlers=[NonFiniteLossGuard(tmp_path)])
    before = {k: v.clone() for k, v in _state(trainer).items()}
    with pytest.raises(NonFiniteLossError, match="the loss became inf at epoch 1"):
        trainer.run()
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not v.any() for k, v in after.items() if k.startswith("opt."))


def test_a_gradient_that_overflows_stops_training_with_finite_weights(tmp_path, one_torch_thread):
    """With lr 1e6 the second loss is finite but its gradient overflows: no weight, EMA weight or moment becomes
    non-finite, and the guard names what optimizer_in_backward kept."""
    trainer = _trainer(True, lr=1e6, lambda_l2=1e-4, handlers=[NonFiniteLossGuard(tmp_path)])
    with pytest.raises(NonFiniteLossError, match=r"gradient became non-finite .* at epoch 1, iteration 2") as info:
        trainer.run()
    assert "no weight was updated from the first non-finite gradient on" in str(info.value)
    assert all(torch.isfinite(v).all() for v in _state(trainer).values() if v.is_floating_point())


def test_what_cannot_run_in_backward_is_refused_by_name():
    network = InvertibleDiffusionUNet(3, 2, 2, (8, 16), 1, (False, False))
    with pytest.raises(BadInputError, match=r"needs torch.optim.AdamW with fused=True"):
        UpdateInBackward(network, torch.optim.AdamW(network.parameters()))
    with pytest.raises(BadInputError, match=r"needs torch.optim.AdamW with fused=True"):
        UpdateInBackward(network, torch.optim.SGD(network.parameters(), lr=0.1))
    with pytest.raises(BadInputError, match="does not hold these trainable parameters"):
        UpdateInBackward(network, torch.optim.AdamW(network.head.parameters(), fused=True))
    with pytest.raises(BadInputError, match="micro_batch_size 1 would need the whole gradient"):
        IDMTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=[],
            network=network,
            optimizer=torch.optim.AdamW(network.parameters(), fused=True),
            scheduler=DDPMScheduler(num_train_timesteps=100),
            noise_sampler=NoiseSampler(100),
            micro_batch_size=1,
            optimizer_in_backward=True,
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(network)
        with pytest.raises(BadInputError, match="cannot run under DistributedDataParallel"):
            UpdateInBackward(wrapped, torch.optim.AdamW(network.parameters(), fused=True))
    finally:
        dist.destroy_process_group()


def test_training_refuses_micro_batches_with_it_before_reading_any_data(tmp_path):
    result = run_bundle(
        "configs/train.json",
        SMALL_TRAINING
        | {
            "dataset_dir": tmp_path / "D",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "optimizer_in_backward": "true",
            "micro_batch_size": 1,
        },
        "training",
    )
    assert result.returncode != 0
    assert "micro_batch_size 1 would need the whole gradient kept between micro-batches" in result.stderr
    assert "--optimizer_in_backward false" in result.stderr
    assert not (tmp_path / "C").exists() and not (tmp_path / "D").exists()


def test_the_plan_of_an_update_in_backward_has_no_gradients():
    """The plan keeps no gradients between steps, so its floor is lower by their bytes (weights, moments and EMA
    remain), and its peak lower by most of them."""
    base = TINY | {"batch_size": 2, "device": "cpu"}
    ordinary = plan_config(TRAIN, base).plan
    fused = plan_config(TRAIN, base | {"optimizer_in_backward": True}).plan
    assert ordinary.gradient_bytes == ordinary.parameter_bytes and fused.gradient_bytes == 0
    assert fused.floor_bytes == ordinary.floor_bytes - ordinary.gradient_bytes
    assert ordinary.peak_bytes - fused.peak_bytes > 0.5 * ordinary.gradient_bytes
    assert "inside backward" in fused.table()
