"""The memory planner (bundle.memory_plan, scripts/plan_memory.py): live-byte counting, the floor, the prediction
against a measured CPU peak, micro_batch_size "auto", and the refusal of a run that cannot fit before any data is
read."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bundle.diffusion import idm_loss, idm_loss_backward
from bundle.errors import BadInputError
from bundle.memory_plan import GIB, LiveBytes, plan_config
from bundle.networks import InvertibleDiffusionUNet
from scripts.benchmarking.child_process import measuring_device
from scripts.benchmarking.plan_accuracy import measure_configured_step
from scripts.benchmarking.quality import network_definitions
from scripts.benchmarking.workload import Workload
from tests.conftest import ROOT, SMALL_TRAINING, redraw_zero_init_, relative_error, run_bundle, run_python

TRAIN = str(ROOT / "configs" / "train.json")
NETWORKS = network_definitions(Workload("idm", 16, channels=(8, 16, 32), attention_levels=(False, True, True)))
TINY = {
    "network_def": NETWORKS["idm"],
    "spatial_size": [16, 16, 16],
    "batch_size": 2,
    "num_train_timesteps": 100,
    "memory_budget": 0,
}  # (the planner's other features; tests/test_memory_budget.py plans budgets)
MB = 1e6


def _network(**overrides) -> InvertibleDiffusionUNet:
    torch.manual_seed(0)
    arguments = {k: v for k, v in NETWORKS["idm"].items() if k != "_target_"}
    return redraw_zero_init_(InvertibleDiffusionUNet(**arguments | overrides))


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    """A view adds nothing, a new tensor adds its bytes, a freed one gives them back; CUDA's 512-byte blocks round
    every storage up."""
    with FakeTensorMode(), LiveBytes("cpu") as live:
        a = torch.empty(1000)
        view = a[10:]
        b = a * 2
        assert live.live == 8000
        del a, view
        assert live.live == 4000 and live.peak == 8000
        del b
        assert live.live == 0
    with FakeTensorMode(), LiveBytes("cpu", block_bytes=512) as live:
        small = torch.empty(3)  # noqa: F841 - alive while counted
        assert live.live == 512


def test_a_cpu_plan_counts_onednn_s_convolution_workspaces_at_their_operator():
    """oneDNN copies a convolution's input (forward), and its input and output gradient (backward), into blocks of
    16 channels inside the operator: 4 channels count as 16. A GPU plan made with the CPU's operators leaves
    them out."""
    peaks = {}
    for workspaces in (False, True):
        with FakeTensorMode(), LiveBytes("cpu", onednn_workspaces=workspaces) as live:
            x = torch.empty(2, 4, 8, 8, 8, requires_grad=True)
            weight = torch.empty(4, 4, 3, 3, 3, requires_grad=True)
            live.count([x, weight])
            torch.nn.functional.conv3d(x, weight, padding=1).sum().backward()
            peaks[workspaces] = live.peak
    operand = 2 * 16 * 8**3 * 4  # one (2, 4, 8, 8, 8) operand in blocks of 16 channels
    assert peaks[True] - peaks[False] == 2 * operand  # the backward's two copies, beside its outputs


def test_what_is_alive_at_the_peak_is_named_by_operator_place_and_shape():
    """The floor (what was alive when the step started) is left out; the step's tensors at its peak are grouped
    and listed largest first, a tensor freed before the peak is not among them."""
    with FakeTensorMode(), LiveBytes("cpu") as live:
        floor = torch.empty(10_000)  # noqa: F841 - alive through the step
        live.start_step()
        gone = torch.empty(500).exp()
        del gone
        x = torch.empty(2, 100)
        big = x.repeat(1, 10)  # noqa: F841 - alive at the peak
        live.set_phase("update")
        small = [x.sin(), x.cos()]  # noqa: F841 - alive at the peak
    assert live.alive_at_peak() == [
        {"bytes": 8000, "count": 1, "made_by": "repeat", "where": "forward", "dtype": "float32", "shape": "[2, 1000]"},
        {"bytes": 800, "count": 1, "made_by": "empty", "where": "forward", "dtype": "float32", "shape": "[2, 100]"},
        {"bytes": 800, "count": 1, "made_by": "sin", "where": "update", "dtype": "float32", "shape": "[2, 100]"},
        {"bytes": 800, "count": 1, "made_by": "cos", "where": "update", "dtype": "float32", "shape": "[2, 100]"},
    ]


def test_the_floor_is_weights_gradients_adamw_state_and_ema():
    """4 B of weights, 4 of gradients, 8 of AdamW moments (and one step counter per tensor) and 4 of EMA per
    parameter; EMA off leaves its 4 out; the step's peak lies above the floor."""
    with_ema = plan_config(TRAIN, TINY).plan
    without = plan_config(TRAIN, TINY | {"ema_decay": 0}).plan
    params = with_ema.params
    tensors = len(list(_network().parameters()))
    assert params > 10_000 and with_ema.gradient_bytes == 4 * params
    assert 4 * params <= with_ema.parameter_bytes < 4 * params * 1.01
    assert 8 * params <= with_ema.optimizer_bytes <= 8 * params + 4 * tensors + 64
    assert 4 * params <= with_ema.ema_bytes < 4 * params * 1.01 and without.ema_bytes == 0
    assert with_ema.floor_bytes - without.floor_bytes == with_ema.ema_bytes
    assert with_ema.peak_bytes > with_ema.floor_bytes + 1 * MB
    assert set(with_ema.phase_peaks) == {"forward", "backward", "update"}
    assert with_ema.peak_phase == "backward" and with_ema.peak_module.startswith("trunk")


def test_the_weight_term_is_back_propagated_on_its_own_with_the_whole_loss_gradient():
    """λ_L2 ‖W‖₂ back-propagated before the network's backward gives the gradient of the whole Eq. 8 loss at once,
    and keeps no copy of the weights through the backward pass (the plan's peak is that of λ_L2 = 0, within a
    fraction of the weights' bytes)."""
    model = _network().double()
    generator = torch.Generator().manual_seed(3)
    noisy, noise = (torch.randn(2, 2, 16, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    timesteps = torch.tensor([5, 70])
    idm_loss_backward(model, noisy, timesteps, noise, lambda_rec=0.0, lambda_l2=0.5)
    split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    idm_loss(model, noisy, timesteps, noise, lambda_rec=0.0, lambda_l2=0.5)[1].backward()
    for (name, p), a in zip(model.named_parameters(), split, strict=True):
        assert relative_error(a, p.grad) < 1e-12, name
    plans = {
        lambda_l2: plan_config(TRAIN, TINY | {"lambda_l2": lambda_l2, "ema_decay": 0}).plan for lambda_l2 in (0.0, 1e-4)
    }
    assert abs(plans[1e-4].peak_bytes - plans[0.0].peak_bytes) < plans[0.0].parameter_bytes / 4


def test_the_plan_predicts_the_measured_cpu_peak():
    """Two configurations (whole batch of 4; micro-batches of 1 without EMA) measured in fresh processes (peak
    anonymous RSS above its value before the network was built): the plan is below the measurement by no more than
    the CPU process's own allocations (oneDNN's generated code and buffers, Python objects: < 64 MB), and the
    difference between the two configurations is predicted within 10%."""
    configurations = [
        TINY | {"spatial_size": [32, 32, 32], "batch_size": 4},
        TINY | {"spatial_size": [32, 32, 32], "batch_size": 4, "micro_batch_size": 1, "ema_decay": 0},
    ]
    planned, measured = [], []
    for overrides in configurations:
        planned.append(plan_config(TRAIN, overrides | {"device": measuring_device().type}).plan.peak_bytes)
        result = measure_configured_step(overrides, timeout=600)
        assert "error" not in result, result
        measured.append(result["peak_bytes"])
    for p, m in zip(planned, measured, strict=True):
        assert 0 <= m - p < 64 * MB, (planned, measured)
    assert abs((planned[0] - planned[1]) / (measured[0] - measured[1]) - 1) < 0.1, (planned, measured)


def test_micro_batch_size_auto_picks_the_largest_that_fits_and_a_run_that_cannot_fit_is_refused():
    """With room for micro-batches of 2 but not 4, "auto" picks 2; with room for none, the refusal gives the
    predicted peak and what would fit (a smaller spatial_size, amp, EMA off). (A two-level network of one block per
    level: the choice is the planner's, whatever the network; each plan traces every micro-batch of the step.)"""
    shallow = NETWORKS["idm"] | {"channels": [8, 16], "num_blocks": 1, "attention_levels": [False, True]}
    base = TINY | {"network_def": shallow, "batch_size": 4, "device": "cpu"}
    peaks = {micro: plan_config(TRAIN, base | {"micro_batch_size": micro}).plan.peak_bytes for micro in (4, 2)}
    assert peaks[4] > peaks[2]
    room = (peaks[2] + peaks[4]) / 2 / GIB
    chosen = plan_config(TRAIN, base | {"micro_batch_size": "auto", "device_memory_gb": room})
    assert chosen.micro_batch_size == 2 and chosen.plan.fits
    assert plan_config(TRAIN, base | {"micro_batch_size": "auto", "device_memory_gb": 8.0}).micro_batch_size is None
    too_small = chosen.plan.floor_bytes * 1.01 / GIB  # the weights and their state fit, not even 1 sample's step
    with pytest.raises(BadInputError, match="predicted not to fit") as refused:
        plan_config(TRAIN, base | {"micro_batch_size": "auto", "device_memory_gb": too_small}, check=True)
    message = str(refused.value)
    assert "even in micro-batches of 1 sample" in message and "spatial_size of about" in message
    assert "a coarser --spacing" in message
    assert "--amp true" in message and "--ema_decay 0" in message
    with pytest.raises(BadInputError, match=r"micro_batch_size must be a positive integer, null .* or 'auto'"):
        plan_config(TRAIN, base | {"micro_batch_size": "all"})


def test_monai_networks_plain_and_checkpointed_are_planned_too():
    """MONAI's DiffusionModelUNet through the same trainer: activation checkpointing lowers its planned peak."""
    monai = NETWORKS["monai"]
    checkpointed = {"_target_": "scripts.benchmarking.baselines.enable_activation_checkpointing", "model": monai}
    plans = {
        name: plan_config(TRAIN, TINY | {"network_def": definition, "spatial_size": [32] * 3}).plan
        for name, definition in (("plain", monai), ("checkpointed", checkpointed))
    }
    assert plans["plain"].params == plans["checkpointed"].params > 10_000
    assert plans["plain"].floor_bytes == plans["checkpointed"].floor_bytes
    assert plans["checkpointed"].peak_bytes < plans["plain"].peak_bytes


def test_training_refuses_a_run_that_cannot_fit_before_reading_any_data(tmp_path):
    """--device_memory_gb below the plan: the run stops with the plan's error before the dataset is looked at (no
    phantoms are written to the empty dataset_dir) and before anything is written to ckpt_dir or output_dir."""
    dataset = tmp_path / "data"
    overrides = SMALL_TRAINING | {
        "dataset_dir": dataset,
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "runs",
        "device_memory_gb": 0.001,
    }
    result = run_bundle(TRAIN, overrides, "training")
    assert result.returncode != 0
    assert "predicted not to fit" in result.stderr and "micro_batch_size auto" in result.stderr
    assert not dataset.exists() and not list((tmp_path / "models").glob("*")) and not (tmp_path / "runs").exists()


def test_plan_memory_command_prints_one_json_object_and_exits_1_when_it_does_not_fit():
    args = [
        "scripts/plan_memory.py",
        "--network_def#channels",
        "[8,16,32]",
        "--attention_levels",
        "[false,true,true]",
        "--spatial_size",
        "[16,16,16]",
        "--batch_size",
        "2",
        "--json",
        "true",
    ]
    fits = run_python(args)
    assert fits.returncode == 0, fits.stderr
    plan = json.loads(fits.stdout)
    assert {"peak_bytes", "floor_bytes", "params", "fits"} <= plan.keys() and plan["fits"] is True
    assert plan["peak_bytes"] > plan["floor_bytes"] > 16 * plan["params"]
    table = run_python([*args[:-2], "--device", "cuda", "--device_memory_gb", "0.001"])  # the table, of a GPU
    assert table.returncode == 1 and re.search(r"^fits +NO$", table.stdout, re.MULTILINE), table.stdout
    assert "planned with the CPU's operators" in table.stdout
    bad = run_python([*args, "--micro_batch_size", "0"])
    assert bad.returncode == 1 and "ERROR: micro_batch_size must be a positive integer" in bad.stderr


def test_a_size_the_network_pads_is_planned_at_the_padded_size_and_said():
    """[12, 16, 20] runs at [16, 16, 24] inside the network (multiples of 8 for three levels with attention at the
    bottom): the plan costs what the padded size costs and its note says so; a multiple gets no note."""
    padded = plan_config(TRAIN, TINY | {"spatial_size": [12, 16, 20]}).plan
    multiple = plan_config(TRAIN, TINY | {"spatial_size": [16, 16, 24]}).plan
    assert _network().padded_size([12, 16, 20]) == (16, 16, 24)
    assert any("pads [12, 16, 20] to [16, 16, 24] inside" in note for note in padded.notes)
    assert not any("pads" in note for note in multiple.notes)
    # the same trunk activations; only the input, its noise and the output are smaller
    assert 0.8 * multiple.peak_bytes < padded.peak_bytes <= multiple.peak_bytes
