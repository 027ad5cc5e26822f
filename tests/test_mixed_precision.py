"""Mixed precision: ``torch.autocast`` (bfloat16) through the memory-saving engine and the trainer's ``amp``
setting, and networks cast to half precision."""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import redraw_zero_init_, relative_error
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion import IDMTrainer, NoiseSampler, autocast_dtype, idm_loss_backward
from bundle.errors import BadInputError
from bundle.networks import InvertibleDiffusionUNet, InvertibleUNet


def make_trunk(memory_budget: float = 0) -> InvertibleUNet:
    torch.manual_seed(0)
    return redraw_zero_init_(
        InvertibleUNet(3, (8, 16, 32), 2, (False, True, True), cond_dim=6, memory_budget=memory_budget), std=0.05
    )


def _gradients(trunk, x, cond, weight, autocast: bool):
    """Output and gradients of (input, cond, parameters), the forward under bfloat16 autocast when asked and
    the backward after it (the usual AMP loop)."""
    x, cond = x.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = trunk(x, cond)
        loss = (out.float() * weight).sum()
    return out, torch.autograd.grad(loss, [x, cond, *trunk.parameters()])


def test_under_autocast_the_state_stays_float32_and_every_step_inverts_to_float32_rounding(device):
    trunk = make_trunk().to(device)
    x = torch.randn(2, 8, 16, 16, 16, device=device)
    cond = torch.randn(2, 6, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        assert trunk(x.bfloat16(), cond).dtype == torch.float32  # e.g. a stem convolution's bfloat16 output
        state = (x,)
        for index, step in enumerate(trunk.sequence.steps):
            out = step(state, cond)
            assert all(t.dtype == torch.float32 for t in out), (index, step)
            assert max(relative_error(a, b) for a, b in zip(step.inverse(out, cond), state, strict=True)) <= 1e-6, (
                index,
                step,
            )
            state = out


@pytest.mark.parametrize("memory_budget", [0, 1e6])
def test_memory_efficient_gradients_under_autocast_are_as_accurate_as_plain_autograd_under_autocast(
    device, memory_budget
):
    """Against the float32 gradient, per tensor: bfloat16 itself moves gradients by about 1e-2; the
    memory-efficient engine must not add to that (its reconstruction is exact to float32 rounding, and each
    step's backward recomputes under its forward's autocast setting), with every step rebuilt or some kept."""
    trunk = make_trunk(memory_budget=memory_budget).to(device)
    x = torch.randn(2, 8, 16, 16, 16, device=device)
    cond, weight = torch.randn(2, 6, device=device), torch.randn_like(x)
    trunk.memory_efficient = False
    _, exact = _gradients(trunk, x, cond, weight, autocast=False)
    out_plain, plain = _gradients(trunk, x, cond, weight, autocast=True)
    trunk.memory_efficient = True
    out_me, memory_efficient = _gradients(trunk, x, cond, weight, autocast=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        kept = trunk.sequence.stored_steps((x,), cond.detach().requires_grad_())
    assert (0 < sum(kept) < len(kept)) if memory_budget else not any(kept)
    assert out_me.dtype == torch.float32 and relative_error(out_me, out_plain) <= 1e-6
    error_plain = [relative_error(g, e) for g, e in zip(plain, exact, strict=True)]
    error_me = [relative_error(g, e) for g, e in zip(memory_efficient, exact, strict=True)]
    assert 1e-4 < statistics.median(error_plain) < 5e-2  # autocast did run the conditioners in bfloat16
    assert statistics.median(error_me) <= 1.5 * statistics.median(error_plain)
    assert max(error_me) <= 1.5 * max(error_plain)
    assert all(g.dtype == torch.float32 for g in memory_efficient[2:])  # parameter gradients stay float32


def test_the_trainers_amp_runs_the_loss_under_bfloat16_autocast_with_float32_weights_and_gradients():
    torch.manual_seed(0)
    network = redraw_zero_init_(
        InvertibleDiffusionUNet(3, 2, 2, channels=(8, 16, 32), num_blocks=1, attention_levels=(False, True, True)),
        std=0.05,
    )
    noisy, noise = torch.randn(2, 2, 16, 16, 16), torch.randn(2, 2, 16, 16, 16)
    timesteps = torch.tensor([3, 70])

    def step(amp_dtype):
        network.zero_grad(set_to_none=True)
        prediction, loss, _ = idm_loss_backward(network, noisy, timesteps, noise, 0.0, 1e-4, 1, amp_dtype)
        return prediction, loss, [p.grad.clone() for p in network.parameters()]

    prediction_32, loss_32, grads_32 = step(None)
    prediction_16, loss_16, grads_16 = step(torch.bfloat16)
    assert prediction_32.dtype == torch.float32 and prediction_16.dtype == torch.bfloat16  # the head ran in bf16
    assert loss_16.dtype == torch.float32 and abs(loss_16 - loss_32) / loss_32 < 1e-2
    assert all(g.dtype == torch.float32 for g in grads_16)
    errors = [relative_error(a, b) for a, b in zip(grads_16, grads_32, strict=True) if b.norm() > 0]
    assert 0 < statistics.median(errors) < 5e-2
    assert all(p.dtype == torch.float32 for p in network.parameters())


def test_amp_settings_are_checked():
    assert autocast_dtype(False) is None and autocast_dtype(True) == torch.bfloat16
    assert autocast_dtype(True, {"dtype": torch.bfloat16}) == torch.bfloat16
    with pytest.raises(BadInputError, match=r"amp_kwargs may only be .*float16 autocast needs loss scaling"):
        autocast_dtype(True, {"dtype": torch.float16})
    network = InvertibleDiffusionUNet(2, 1, 1, channels=(8, 16), num_blocks=1, attention_levels=(False, False))
    trainer = IDMTrainer(
        "cpu",
        1,
        [],
        network,
        torch.optim.AdamW(network.parameters()),
        DDPMScheduler(10, schedule="cosine"),
        NoiseSampler(10),
        amp=True,
    )
    assert trainer.amp_dtype == torch.bfloat16


def test_a_half_precision_network_runs_plain_and_the_memory_efficient_engine_refuses_it_by_name():
    trunk = make_trunk().to(torch.bfloat16)
    x, cond = torch.randn(1, 8, 16, 16, 16, dtype=torch.bfloat16), torch.randn(1, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y = trunk(x, cond)  # the orthogonal matrices are solved in float32 (no half-precision solver)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    with pytest.raises(TypeError, match=r"exact only in float32 or float64; got a torch.bfloat16 state.*autocast"):
        trunk(x, cond)
    trunk.memory_efficient = False
    trunk(x, cond).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trunk.parameters())
