"""Rectified flow as the training objective: its target and estimates, its Euler sampler against the exact flow of
Gaussian data, and a run that records its objective, so that inference, evaluation and a resume take it from the
record (a conditioned run on the native grid with micro_batch_size auto: the planner traces its step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_TRAINING, run_bundle
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from bundle.diffusion import (
    FlowEulerScheduler,
    GridDDIMScheduler,
    make_sampler,
    monitoring_sampler,
    predict_start_and_noise,
    training_scheduler,
    training_target,
)
from bundle.errors import BadInputError
from bundle.memory_plan import plan_config
from bundle.run_record import TrainedModel
from tests.conftest import ROOT

T = 1000
MEAN, STD = 0.2, 0.3  # the data: x₀ ~ N(MEAN, STD²) per voxel


@pytest.mark.parametrize("objective", ["epsilon", "rectified_flow"])
def test_the_exact_target_gives_back_the_image_and_the_noise(objective):
    """A network that predicts its target exactly recovers x₀ and ε at every t, for either objective."""
    scheduler = training_scheduler(objective, T, "cosine")
    assert isinstance(scheduler, RFlowScheduler if objective == "rectified_flow" else DDPMScheduler)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 2, 6, 6, 6, generator=generator) * 2 - 1
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.tensor([1, 250, 700, 950])
    noisy = scheduler.add_noise(images, noise, timesteps)
    start, eps = predict_start_and_noise(scheduler, noisy, training_target(scheduler, images, noise), timesteps)
    torch.testing.assert_close(start, images, atol=1e-4, rtol=0)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=0)


def _exact_velocity(x: torch.Tensor, s: float) -> torch.Tensor:
    """E[x₀ − ε | x_s] for Gaussian data: x_s = (1 − s) x₀ + s ε ~ N((1 − s) MEAN, (1 − s)² STD² + s²)."""
    spread = (1 - s) ** 2 * STD**2 + s**2
    centred = x - (1 - s) * MEAN
    return MEAN + ((1 - s) * STD**2 - s) / spread * centred


def _euler_error(steps: int, total: int = T) -> float:
    """The largest error of the Euler sampler's x₀ over 1000 chains against the flow's exact x₀ = MEAN + STD x₁."""
    scheduler = FlowEulerScheduler(num_train_timesteps=total)
    scheduler.set_timesteps(steps)
    start = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = start.clone()
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(_exact_velocity(x, t / total), t, x)[0]
    return (x - (MEAN + STD * start)).abs().max().item()


def test_euler_along_the_exact_flow_of_gaussian_data_is_first_order():
    """The error halves as the steps double (first order), and the grid starts at pure noise (t = T), steps
    evenly and ends on the data."""
    errors = {n: _euler_error(n) for n in (5, 10, 20, 40)}
    for n in (5, 10, 20):
        assert 1.7 < errors[n] / errors[2 * n] < 2.3, errors
    scheduler = FlowEulerScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [1000, 750, 500, 250]
    assert scheduler.previous_timestep(250) == 0


def test_the_grid_holds_the_integers_asked_for_above_float16s_range():
    """MONAI's grid passes through float16, whose integers above 2048 are even: T = 5000 in 3 steps is 5000, 3333,
    1667 here (MONAI: 5000, 3332, 1666)."""
    scheduler = FlowEulerScheduler(num_train_timesteps=5000)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [5000, 3333, 1667]


def test_each_objective_has_its_own_samplers_and_the_name_of_another_is_refused():
    assert isinstance(make_sampler(None, 100, None, objective="rectified_flow"), FlowEulerScheduler)
    assert isinstance(make_sampler(None, 100, "cosine"), DDPMScheduler)
    assert isinstance(monitoring_sampler("rectified_flow", 100, None), FlowEulerScheduler)
    monitor = monitoring_sampler("epsilon", 100, "cosine")
    assert isinstance(monitor, GridDDIMScheduler) and monitor.eta == 1.0
    with pytest.raises(BadInputError, match=r"one of \['euler'\] \(ddim samples models trained with objective eps"):
        make_sampler("ddim", 100, None, objective="rectified_flow")
    with pytest.raises(BadInputError, match=r"one of \['ddim', 'ddpm', 'dpm_solver', 'pndm'\] \(euler samples"):
        make_sampler("euler", 100, "cosine")
    with pytest.raises(BadInputError, match="objective must be one of"):
        training_scheduler("v_prediction", 100, "cosine")


def test_the_plan_traces_the_flow_step():
    """The planner runs the trainer's own step: a flow's target (x₀ − ε) is one more image-sized tensor."""
    base = {
        "spatial_size": [16, 16, 16],
        "network_def#channels": [8, 16, 32],
        "attention_levels": [False, True, True],
        "batch_size": 2,
        "device": "cpu",
    }
    train = str(ROOT / "configs" / "train.json")
    peaks = {
        objective: plan_config(train, base | {"objective": objective}).plan.peak_bytes
        for objective in ("epsilon", "rectified_flow")
    }
    image_bytes = 2 * 2 * 16**3 * 4  # batch 2, t1 and t2, float32
    assert 0 <= peaks["rectified_flow"] - peaks["epsilon"] <= 2 * image_bytes, peaks


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> Path:
    """A T1→T2 rectified flow trained one epoch on 6 built-in cases on the native 12 mm grid, micro_batch_size
    auto."""
    folder = tmp_path_factory.mktemp("flow")
    result = run_bundle("configs/train.json", _training(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _training(folder: Path) -> dict:
    return SMALL_TRAINING | {
        "objective": "rectified_flow",
        "condition_modalities": "['t1']",
        "modalities": "['t2']",
        "spacing": "12.0",
        "micro_batch_size": "auto",
        "device_memory_gb": "4",
        "dataset_dir": folder / "data",
        "ckpt_dir": folder / "models",
        "output_dir": folder / "runs",
        "num_phantoms": 6,
        "train#trainer#max_epochs": 1,
    }


def test_the_run_records_its_objective_and_inference_samples_by_it(flow, tmp_path):
    record = json.loads((flow / "models" / "run.json").read_text())["noise_scheduler"]
    assert record == {
        "class": "RFlowScheduler",
        "objective": "rectified_flow",
        "num_train_timesteps": 100,
        "schedule": None,
        "prediction_type": "v_prediction",
    }
    assert isinstance(TrainedModel(flow / "models" / "model.pt").sampler(), FlowEulerScheduler)
    run = {"ckpt_path": flow / "models" / "model.pt", "dataset_dir": flow / "data", "num_inference_steps": "3"}
    result = run_bundle("configs/inference.json", run | {"output_dir": tmp_path / "samples"})  # no sampler named
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted((tmp_path / "samples").glob("*_t2.nii.gz"))
    assert written and all(np.isfinite(nib.load(f).get_fdata()).all() for f in written)
    refused = run_bundle("configs/inference.json", run | {"output_dir": tmp_path / "ddim", "sampler": "ddim"})
    assert refused.returncode == 1 and "ddim samples models trained with objective epsilon" in refused.stderr
    assert not (tmp_path / "ddim").exists()


def test_evaluation_reconstructs_along_the_flow(flow, tmp_path):
    """A flow model's evaluation: one-step estimates, the reconstruction from t = 0.25 T along its Euler steps, and
    the translation of each case (by its default sampler)."""
    result = run_bundle(
        "['configs/train.json','configs/evaluate.json']",
        {
            "ckpt_path": flow / "models" / "model.pt",
            "dataset_dir": flow / "data",
            "output_dir": tmp_path,
            "num_inference_steps": "3",
            "num_workers": "0",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"one-step t=5", "one-step t=25", "one-step t=50", "reconstruction from t=25"} <= metrics.keys()
    assert np.isfinite(metrics["reconstruction from t=25"]["t2"]["ssim"]["mean"])
    assert "translation" in metrics


def test_a_resume_with_the_other_objective_is_refused_by_name(flow):
    overrides = _training(flow) | {"objective": "epsilon", "resume": "true", "train#trainer#max_epochs": 2}
    result = run_bundle("configs/train.json", overrides)
    assert result.returncode == 1
    assert "trained with objective=rectified_flow, but this run gives objective=epsilon" in result.stderr
    assert "pass --objective rectified_flow" in result.stderr


def test_a_resumed_flow_run_equals_the_uninterrupted_one(flow, tmp_path):
    """A copy of the one-epoch run resumed to two epochs writes bitwise the weights of a two-epoch run (the noise,
    the timesteps and the velocity target all follow from the seed and the step)."""
    shutil.copytree(flow, tmp_path / "resumed")
    resumed = run_bundle(
        "configs/train.json", _training(tmp_path / "resumed") | {"resume": "true", "train#trainer#max_epochs": 2}
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run_bundle(
        "configs/train.json",
        _training(tmp_path / "whole") | {"dataset_dir": flow / "data", "train#trainer#max_epochs": 2},
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    weights = [torch.load(tmp_path / name / "models" / "model.pt") for name in ("resumed", "whole")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
