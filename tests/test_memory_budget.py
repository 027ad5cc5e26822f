"""The engine's memory budget: the steps it keeps, their gradients against plain autograd at every budget, the bytes
they keep against the budget, and the memory plan at a budget (a number and "auto")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import redraw_zero_init_, relative_error

from bundle.diffusion import idm_loss_backward
from bundle.errors import BadInputError
from bundle.flags import as_memory_budget
from bundle.memory_plan import GIB, plan_config
from bundle.networks import CouplingLayer, InvertibleAttention, InvertibleDiffusionUNet, InvertibleUNet
from bundle.networks.storage_plan import StepCost, choose_stored, step_costs
from scripts.benchmarking import saved_activation_bytes
from scripts.benchmarking.child_process import measuring_device
from scripts.benchmarking.plan_accuracy import measure_configured_step
from tests.test_memory_plan import TINY, TRAIN

CHANNELS = (8, 16, 32)


def _trunk(dtype=torch.float64, **kwargs) -> InvertibleUNet:
    torch.manual_seed(0)
    trunk = InvertibleUNet(3, CHANNELS, 2, (False, True, True), cond_dim=3, **kwargs)
    return redraw_zero_init_(trunk, std=0.1).to(dtype)


def _inputs(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, CHANNELS[0], 8, 16, 8, generator=generator, dtype=dtype),
        torch.randn(2, 3, generator=generator, dtype=dtype),
    )


def _gradients(trunk: InvertibleUNet, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
    trunk.zero_grad(set_to_none=True)
    x, cond = x.detach().clone().requires_grad_(), cond.detach().clone().requires_grad_()
    out = trunk(x, cond)
    (out * torch.cos(out)).sum().backward()
    return [out.detach(), x.grad, cond.grad, *(p.grad for p in trunk.parameters())]


def _costs(trunk: InvertibleUNet, x: torch.Tensor, cond: torch.Tensor) -> list[StepCost]:
    return step_costs(list(trunk.sequence.steps), (x,), cond.detach().requires_grad_())


def _counting_reverses(trunk: InvertibleUNet, monkeypatch) -> list[int]:
    """Records the position of every step whose ``reverse`` (its reconstruction in backward) runs."""
    reversed_steps: list[int] = []
    for position, step in enumerate(trunk.sequence.steps):
        original = step.reverse

        def counting(*args, _original=original, _position=position):
            reversed_steps.append(_position)
            return _original(*args)

        monkeypatch.setattr(step, "reverse", counting)
    return reversed_steps


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_gradients_equal_plain_autograds_at_every_budget_and_only_the_kept_steps_skip_their_reconstruction(
    share, monkeypatch, one_torch_thread
):
    """float64, a 3-level trunk with attention: the output and the gradients of the input, the condition and every
    parameter within 1e-12 of plain autograd's, with none, few, half and all of the steps' bytes in the budget; the
    steps reconstructed in backward are exactly those the budget does not keep."""
    trunk = _trunk()
    x, cond = _inputs()
    trunk.memory_efficient = False
    plain = _gradients(trunk, x, cond)
    trunk.memory_efficient = True
    costs = _costs(trunk, x, cond)
    total = sum(c.stored_bytes for c in costs)
    trunk.memory_budget = math.inf if share == 1.0 else share * total
    kept = trunk.sequence.stored_steps((x,), cond.detach().requires_grad_())
    reversed_steps = _counting_reverses(trunk, monkeypatch)
    budgeted = _gradients(trunk, x, cond)
    assert relative_error(plain[0], x) > 0.1  # far from the identity
    names = ["output", "input", "cond"] + [n for n, _ in trunk.named_parameters()]
    for name, a, b in zip(names, budgeted, plain, strict=True):
        assert b.norm() > 0, name
        assert relative_error(a, b) <= 1e-12, name
    expected = {0.0: (0, len(costs)), 1.0: (len(costs), len(costs))}
    low, high = expected.get(share, (1, len(costs) - 1))
    assert low <= sum(kept) <= high
    if share < 1.0:  # (all kept: the sequence runs as plain autograd, no step's reverse)
        assert sorted(reversed_steps) == [i for i, k in enumerate(kept) if not k]
    else:
        assert reversed_steps == []


def test_the_kept_bytes_grow_with_the_budget_and_stay_within_it(one_torch_thread):
    """What autograd keeps from the memory-efficient forward (``saved_tensors_hooks``) is the output state and the
    condition at budget 0 and grows with the budget by no more than the budget; at an unlimited budget it is what
    plain autograd keeps, within 10%."""
    trunk = _trunk(torch.float32)
    x, cond = _inputs(torch.float32)
    cond.requires_grad_()
    total = sum(c.stored_bytes for c in _costs(trunk, x, cond))
    kept = {}
    for budget in (0, 0.1 * total, 0.5 * total, math.inf):
        trunk.memory_budget = budget
        kept[budget] = saved_activation_bytes(lambda: trunk(x, cond), trunk)
    trunk.memory_efficient = False
    plain = saved_activation_bytes(lambda: trunk(x, cond), trunk)
    budgets = sorted(kept)
    assert kept[0] == x.numel() * 4 + cond.numel() * 4
    assert all(kept[a] < kept[b] for a, b in itertools.pairwise(budgets))
    for budget in budgets[1:-1]:
        assert kept[budget] - kept[0] <= budget
    assert abs(kept[math.inf] / plain - 1) < 0.1, (kept, plain)


def test_the_steps_kept_first_are_those_that_cost_the_most_flops_per_byte():
    costs = [StepCost(100, 1000), StepCost(100, 5000), StepCost(0, 0), StepCost(300, 9000), StepCost(50, 100)]
    assert choose_stored(costs, 0) == (False, False, True, False, False)  # keeping nothing costs nothing
    # 50 FLOPs per byte first; 30 and 10 do not fit beside it, 2 does
    assert choose_stored(costs, 150) == (False, True, True, False, True)
    assert choose_stored(costs, 500) == (True, True, True, True, False)  # 50, 30, 10; then 2 no longer fits
    assert choose_stored(costs, math.inf) == (True,) * 5
    trunk = _trunk(torch.float32)
    x, cond = _inputs(torch.float32)
    costs = _costs(trunk, x, cond)
    layers = [getattr(s, "layer", None) for s in trunk.sequence.steps]
    couplings = [
        c
        for c, layer in zip(costs, layers, strict=True)
        if isinstance(layer, CouplingLayer) and not isinstance(layer, InvertibleAttention)
    ]
    first, bottom = couplings[0], couplings[len(couplings) // 2]  # level 0's first, the bottom level's
    # the deep, wide level is worth more per byte than the full-resolution one
    assert bottom.flops / bottom.stored_bytes > 2 * first.flops / first.stored_bytes


@pytest.mark.parametrize(
    "value, error", [(-1, ValueError), (float("nan"), ValueError), ("lots", TypeError), (True, TypeError)]
)
def test_a_bad_budget_is_refused_by_name(value, error):
    with pytest.raises(error, match="memory_budget must be a number of bytes ≥ 0"):
        InvertibleDiffusionUNet(3, 2, 2, (8, 16), 1, (False, False), memory_budget=value)
    with pytest.raises(BadInputError, match=r"memory_budget must be a number of bytes ≥ 0 .* inf .* or auto"):
        as_memory_budget(value)


def test_the_configs_budget_is_bytes_inf_or_auto():
    assert as_memory_budget("inf") == math.inf and as_memory_budget(" Auto") == "auto"
    assert as_memory_budget(4e9) == 4e9 and as_memory_budget(0) == 0.0


def test_micro_batches_at_a_budget_give_the_whole_batch_plain_gradient(one_torch_thread):
    torch.manual_seed(0)
    model = redraw_zero_init_(InvertibleDiffusionUNet(3, 2, 2, CHANNELS, 1, (False, True, True))).double()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 8, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn_like(x)
    t = torch.tensor([5, 50, 90])
    grads = {}
    for name, memory_efficient, budget, micro in (("plain", False, 0, None), ("budget", True, 2e5, 1)):
        model.memory_efficient, model.memory_budget = memory_efficient, budget
        model.zero_grad(set_to_none=True)
        idm_loss_backward(model, x, t, noise, lambda_rec=0.0, lambda_l2=1e-3, micro_batch_size=micro)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    assert (
        sum(
            model.trunk.sequence.stored_steps(
                (torch.zeros(1, 8, 8, 8, 8, dtype=torch.float64),),
                torch.zeros(1, 32, dtype=torch.float64, requires_grad=True),
            )
        )
        > 0
    )
    for a, b in zip(grads["budget"], grads["plain"], strict=True):
        assert relative_error(a, b) <= 1e-11


def test_the_plan_follows_the_budget_and_auto_spends_what_the_device_has_to_spare():
    """The planned peak grows with the budget up to plain autograd's; "auto" on a device with room between the two
    picks a budget whose plan fits, and the plan's table says it."""
    network = TINY["network_def"] | {"memory_budget": "$bundle.network_memory_budget(@memory_budget)"}
    base = TINY | {"network_def": network, "batch_size": 2, "device": "cpu", "ema_decay": 0}
    peaks = {
        budget: plan_config(TRAIN, base | {"memory_budget": budget}).plan.peak_bytes for budget in (0, 1e6, 3e6, "inf")
    }
    plain = plan_config(TRAIN, base | {"network_def": network | {"memory_efficient": False}}).plan.peak_bytes
    assert peaks[0] < peaks[1e6] < peaks[3e6] < peaks["inf"]
    assert abs(peaks["inf"] / plain - 1) < 0.15, (peaks, plain)
    room = (peaks[0] + peaks["inf"]) / 2
    auto = plan_config(TRAIN, base | {"memory_budget": "auto", "device_memory_gb": room / GIB})
    assert 0 < auto.memory_budget < math.inf and auto.plan.fits
    assert peaks[0] < auto.plan.peak_bytes <= room
    assert "activations kept (memory_budget)" in auto.plan.table()
    unknown = plan_config(TRAIN, base | {"memory_budget": "auto", "device": "cuda"})
    assert unknown.memory_budget == 0  # a GPU that is not here, of unknown memory: nothing to spend


def test_the_plan_predicts_the_measured_peak_at_a_budget_with_the_update_in_backward():
    """A budget that keeps some steps, the update inside backward and EMA, measured in a fresh process like
    test_memory_plan's configurations: the plan is below the measurement by no more than the CPU process's own
    allocations (< 64 MB)."""
    network = TINY["network_def"] | {"memory_budget": 2e7}
    overrides = TINY | {
        "network_def": network,
        "spatial_size": [32, 32, 32],
        "batch_size": 4,
        "optimizer_in_backward": True,
    }
    planned = plan_config(TRAIN, overrides | {"device": measuring_device().type}).plan
    assert planned.gradient_bytes == 0 and planned.memory_budget == 2e7
    result = measure_configured_step(overrides, timeout=600)
    assert "error" not in result, result
    assert 0 <= result["peak_bytes"] - planned.peak_bytes < 64e6, (planned.peak_bytes, result)
