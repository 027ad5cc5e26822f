"""The training bundle end to end, through the same command lines a MONAI user types."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from conftest import ROOT, largest_update_allocation, run_bundle, run_python
from conftest import SMALL_TRAINING as SMALL
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler
from torch.utils.tensorboard import SummaryWriter

from bundle.checkpoint import TrainingCheckpoint, check_checkpoint_folder
from bundle.data import training_cases, write_ellipsoid_phantoms
from bundle.diffusion import NoiseSampler, ema_with_warmup
from bundle.errors import BadInputError
from bundle.handlers import InversionDriftMonitor
from bundle.networks import InvertibleDiffusionUNet
from bundle.visualize import read_scalars

TRAIN = "configs/train.json"


def train(overrides: dict, config: str = TRAIN, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_bundle(config, overrides, "training", launcher)


def load_network(overrides: dict, weights: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(ROOT / TRAIN)
    for key, value in overrides.items():
        if key.startswith("network_def#") or key == "attention_levels":
            parser[key] = [
                v.strip() == "true" if v.strip() in ("true", "false") else int(v) for v in value.strip("[]").split(",")
            ]
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return network


def test_the_trainers_adamw_update_allocates_nothing_of_a_parameters_size():
    """``configs/train.json``'s AdamW is fused: one in-place kernel. The for-loop update (PyTorch's default
    on the CPU) allocates temporaries of each parameter's size, the foreach one (its default on CUDA) a
    copy of every second moment: 4 B per parameter, 1.7 GB for the paper configuration."""
    parser = ConfigParser()
    parser.read_config(ROOT / TRAIN)
    parser["network_def#channels"] = [8, 16, 32]
    parser["attention_levels"] = [False, True, True]
    parser["device"] = torch.device("cpu")
    largest_allocation, largest_parameter = largest_update_allocation(parser.get_parsed_content("optimizer"))
    assert largest_parameter == 16 * 16 * 27 * 4  # a 16 → 16 3³ convolution of the 32-channel level
    assert largest_allocation < 1024


@pytest.fixture(scope="module")
def six_cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats6")
    write_ellipsoid_phantoms(root / "MICCAI_BraTS2020_TrainingData", num_cases=6, shape=(40, 40, 32))
    return root


@pytest.fixture(scope="module")
def one_epoch(six_cases, tmp_path_factory) -> Path:
    """A finished 1-epoch run of SMALL on ``six_cases``: its checkpoints in ``C``, its event files in ``R``. Tests
    that continue or overwrite it work on a copy (:func:`copy_of`)."""
    folder = tmp_path_factory.mktemp("one_epoch")
    overrides = SMALL | {"dataset_dir": six_cases, "ckpt_dir": folder / "C", "output_dir": folder / "R"}
    result = train(overrides | {"train#trainer#max_epochs": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_of(run: Path, target: Path) -> Path:
    """``run``'s ``C`` and ``R`` copied into ``target`` (a run's files name no folder: it resumes from anywhere)."""
    for name in ("C", "R"):
        shutil.copytree(run / name, target / name)
    return target


def test_issue_command_trains_and_writes_a_loadable_model(six_cases, tmp_path):
    overrides = {
        "dataset_dir": six_cases,
        "ckpt_dir": tmp_path / "C",
        "output_dir": tmp_path / "R",
        "spatial_size": "[32,32,32]",
        "network_def#channels": "[16,32,64]",
        "attention_levels": "[false,true,true]",
        "num_train_timesteps": "100",
        "batch_size": "2",
        "train#trainer#max_epochs": "2",
        "drift_interval": "2",
    }
    result = train(overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    network = load_network(overrides, tmp_path / "C" / "model.pt")
    assert network.trunk.channels == (16, 32, 64) and network.trunk.attention_levels == (False, True, True)
    with torch.no_grad():
        assert network(torch.rand(1, 2, 32, 32, 32), torch.tensor([10])).shape == (1, 2, 32, 32, 32)
    assert "val_eps_mse" in result.stdout + result.stderr
    drift = read_scalars(tmp_path / "R", ["train/inversion_drift"])["train/inversion_drift"]
    assert [step for step, _ in drift] == [2, 4, 6] and all(0 < value < 1e-4 for _, value in drift)
    record = json.loads((tmp_path / "C" / "run.json").read_text())
    assert record["spatial_size"] == [32, 32, 32] and record["modalities"] == ["t1", "t2"]
    assert len(record["affine"]) == 4 and record["affine"][0][0] > 0  # RAS voxel grid of the training volumes
    schedule = {k: v for k, v in record["noise_scheduler"].items() if k != "alphas_cumprod"}
    assert schedule == {
        "class": "DDPMScheduler",
        "objective": "epsilon",
        "num_train_timesteps": 100,
        "schedule": "cosine",
        "prediction_type": "epsilon",
    }  # checked at inference, with ᾱ:
    expected = DDPMScheduler(num_train_timesteps=100, schedule="cosine").alphas_cumprod
    assert torch.allclose(torch.tensor(record["noise_scheduler"]["alphas_cumprod"]), expected)
    # the validation cases, which evaluation takes from here rather than recomputing the split
    assert record["validation_cases"] == [r["case"] for r in training_cases(six_cases)["validation"]]


def test_empty_dataset_dir_trains_on_phantoms(tmp_path):
    result = train(
        SMALL
        | {
            "dataset_dir": tmp_path / "D",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "num_phantoms": 3,
            "train#trainer#max_epochs": 1,
        }
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SYNTHETIC PHANTOMS" in result.stdout + result.stderr
    assert (tmp_path / "C" / "model.pt").is_file()


def test_bad_micro_batch_size_stops_training_before_it_starts(six_cases, tmp_path):
    result = train(
        SMALL
        | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R", "micro_batch_size": 0}
    )
    assert result.returncode != 0
    assert "micro_batch_size must be a positive integer" in result.stderr and "got 0" in result.stderr
    assert not (tmp_path / "C").exists()


def test_an_unknown_noise_schedule_stops_training_before_it_starts(six_cases, tmp_path):
    result = train(
        SMALL
        | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R", "schedule": "karras"}
    )
    assert result.returncode == 1
    assert (
        "schedule must be one of ['cosine', 'linear_beta', 'scaled_linear_beta', 'sigmoid_beta'] (MONAI's noise "
        "schedules), got 'karras'"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "C").exists() and not (tmp_path / "R").exists()


def test_bad_cases_stop_training_before_it_starts(six_cases, tmp_path):
    data = tmp_path / "D"
    write_ellipsoid_phantoms(data, num_cases=3, shape=(24, 24, 20))
    (data / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()
    result = train(SMALL | {"dataset_dir": data, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"})
    assert result.returncode != 0
    assert "BraTS20_Training_002_t2.nii.gz: file missing" in result.stderr
    assert "skip_invalid" in result.stderr
    assert not (tmp_path / "C").exists()
    result = train(
        SMALL
        | {
            "dataset_dir": data,
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "skip_invalid": "true",
            "train#trainer#max_epochs": 1,
        }
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "going on to train on the 2 valid cases" in result.stdout + result.stderr


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resuming_with_more_epochs_continues_the_cosine_schedule_over_the_new_length(six_cases, one_epoch, tmp_path):
    """A run of 1 epoch resumed with max_epochs 3 trains epochs 2 and 3 as a run configured for 3 epochs from
    the start does (epoch 1's learning rate is the base rate for any length), not at the old schedule's 0."""
    common = SMALL | {"dataset_dir": six_cases}
    whole = train(common | {"ckpt_dir": tmp_path / "A", "output_dir": tmp_path / "RA", "train#trainer#max_epochs": 3})
    assert whole.returncode == 0, whole.stderr[-3000:]
    copy_of(one_epoch, tmp_path)  # the 1-epoch run: C and R
    assert _state(tmp_path / "C" / "training_state.pt")["optimizer"]["param_groups"][0]["lr"] == 0.0  # annealed
    before = {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()}
    resume = common | {
        "ckpt_dir": tmp_path / "C",
        "output_dir": tmp_path / "R",
        "train#trainer#max_epochs": 3,
        "resume": "true",
    }
    # a resume must be the run it continues: other settings are refused by name, before training
    other_t = train(resume | {"num_train_timesteps": "200"})
    assert other_t.returncode == 1
    assert "num_train_timesteps=100, but this run gives num_train_timesteps=200" in other_t.stderr
    other_net = train(resume | {"network_def#channels": "[8,16,64]"})
    assert other_net.returncode == 1 and "training_state.pt was written by another network_def" in other_net.stderr
    assert "of another shape" in other_net.stderr and "Traceback" not in other_net.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()} == before
    resumed = train(resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _state(tmp_path / "A" / "training_state.pt"), _state(tmp_path / "C" / "training_state.pt")
    assert a["trainer"] == b["trainer"] == {"epoch": 3, "iteration": 9}
    assert b["lr_scheduler"]["T_max"] == 3 and b["lr_scheduler"]["last_epoch"] == 3
    for name, tensor in a["network"].items():  # the same learning rates, up to the closed form's rounding
        torch.testing.assert_close(b["network"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert "T_max 1 → 3" in resumed.stdout + resumed.stderr


def test_a_resumed_run_keeps_the_validation_cases_it_recorded(six_cases, one_epoch, tmp_path):
    """Resumed with another seed and val_fraction, a run still validates on (and does not train on) the cases
    it recorded at its start, and run.json keeps them for evaluation."""
    base = SMALL | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"}
    copy_of(one_epoch, tmp_path)
    recorded = json.loads((tmp_path / "C" / "run.json").read_text())["validation_cases"]
    assert len(recorded) == 1  # val_fraction 0.2 of 6; the resumed run's settings would hold out 3
    resumed = train(base | {"train#trainer#max_epochs": 2, "resume": "true", "seed": 5, "val_fraction": 0.5})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "5 training and 1 validation cases" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "C" / "run.json").read_text())["validation_cases"] == recorded


def _schedule(t_max: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.CosineAnnealingLR]:
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1.0)
    return network, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)


def test_a_resumed_cosine_schedule_takes_the_configured_length(tmp_path):
    """Saved after epoch 1 of a 1-epoch schedule (rate annealed to 0), restored under T_max = 4: epochs 2–4
    get the rates of a 4-epoch cosine, (1 + cos(π e / 4)) / 2 for e = 1, 2, 3."""
    network, optimizer, scheduler = _schedule(1)
    engine = Engine(lambda engine, batch: None)
    engine.state.epoch, engine.state.iteration = 1, 3
    optimizer.step()
    scheduler.step()
    TrainingCheckpoint(str(tmp_path), network, optimizer, scheduler, NoiseSampler(10)).save(engine)
    network, optimizer, scheduler = _schedule(4)
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs = 4
    TrainingCheckpoint(str(tmp_path), network, optimizer, scheduler, NoiseSampler(10)).load(engine)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(2):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([(1 + math.cos(math.pi * e / 4)) / 2 for e in (1, 2, 3)])
    assert scheduler.get_last_lr() == [rates[-1]] and engine.state.epoch == 1


def test_resuming_keeps_the_configured_fused_adamw_and_its_update_matches_the_for_loop_one(tmp_path):
    """A training state saved by a for-loop AdamW (bundle 0.2.0) restores into train.json's fused AdamW
    without turning ``fused`` off (load_state_dict copies the saved group options); the fused update is the
    for-loop one up to rounding."""
    torch.manual_seed(0)
    network, twin = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    twin.load_state_dict(network.state_dict())
    engine = Engine(lambda engine, batch: None)
    engine.state.epoch, engine.state.iteration, engine.state.max_epochs = 1, 1, 3
    saved = torch.optim.AdamW(network.parameters(), lr=0.1, weight_decay=0.01, foreach=False)
    for p in network.parameters():
        p.grad = torch.randn_like(p)
    saved.step()
    TrainingCheckpoint(
        str(tmp_path), network, saved, torch.optim.lr_scheduler.CosineAnnealingLR(saved, 3), NoiseSampler(10)
    ).save(engine)
    fused = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.01, fused=True)
    TrainingCheckpoint(
        str(tmp_path), twin, fused, torch.optim.lr_scheduler.CosineAnnealingLR(fused, 3), NoiseSampler(10)
    ).load(engine)
    assert fused.param_groups[0]["fused"] is True and saved.param_groups[0]["fused"] is None
    restored = [q.detach().clone() for q in twin.parameters()]
    for _ in range(3):
        for p, q in zip(network.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        saved.step()
        fused.step()
    for p, q, start in zip(network.parameters(), twin.parameters(), restored, strict=True):
        assert not torch.equal(q, start) and torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_the_drift_monitor_measures_the_trunks_round_trip_and_warns_when_it_is_no_longer_exact(tmp_path, caplog):
    """The monitor rebuilds x_t from the trainer's decollated output and logs the trunk's round-trip error;
    weights scaled up (a badly conditioned trunk) push it past the threshold and it says so."""
    torch.manual_seed(0)
    network = InvertibleDiffusionUNet(3, 2, 2, channels=(8, 16), num_blocks=1, attention_levels=(False, True))
    scheduler = DDPMScheduler(100, schedule="cosine")
    images, noise, timesteps = torch.rand(2, 2, 8, 8, 8) * 2 - 1, torch.randn(2, 2, 8, 8, 8), torch.tensor([5, 60])
    engine = Engine(lambda engine, batch: None)
    engine.network, engine.scheduler, engine.state.iteration = network, scheduler, 100
    engine.state.device = torch.device("cpu")
    engine.state.output = [
        {"image": i, "label": n, "timesteps": int(t)} for i, n, t in zip(images, noise, timesteps, strict=True)
    ]
    writer = SummaryWriter(str(tmp_path))
    monitor = InversionDriftMonitor(summary_writer=writer, interval=100, warn_above=1e-4)
    monitor.measure(engine)
    expected = network.trunk_round_trip_error(scheduler.add_noise(images, noise, timesteps), timesteps).max()
    assert monitor.latest == pytest.approx(float(expected)) and 0 < monitor.latest < 1e-5
    assert "round trip" not in caplog.text
    with torch.no_grad():
        for name, parameter in network.trunk.named_parameters():
            if "generator" not in name:  # the couplings' and attention's weights: the conditioning
                parameter.normal_(std=1.0)
    with caplog.at_level(logging.WARNING):
        monitor.measure(engine)
    assert monitor.latest > 1e-4 and "the invertible trunk's round trip is off by" in caplog.text
    writer.close()
    engine.network = torch.nn.Conv3d(2, 2, 3)  # a baseline trained by the same configuration: nothing to invert
    unused = SummaryWriter(str(tmp_path / "baseline"))
    baseline = InversionDriftMonitor(summary_writer=unused)
    baseline.measure(engine)
    unused.close()
    assert math.isnan(baseline.latest) and not read_scalars(tmp_path / "baseline", ["train/inversion_drift"])
    logged = read_scalars(tmp_path, ["train/inversion_drift"])["train/inversion_drift"]
    assert [step for step, _ in logged] == [100] and logged[0][1] == pytest.approx(monitor.latest)


def test_every_rank_resumes_its_own_noise_stream():
    """Under DDP only rank 0 saves the noise state: each rank must still continue its own stream from it."""
    images = torch.zeros(2, 1, 4, 4, 4)
    uninterrupted = {rank: NoiseSampler(100, seed=3, rank=rank) for rank in (0, 1)}
    draws = {rank: [sampler.sample(images) for _ in range(3)] for rank, sampler in uninterrupted.items()}
    assert not torch.equal(draws[0][2][0], draws[1][2][0])  # ranks draw different noise
    saved = NoiseSampler(100, seed=3, rank=0)
    saved.sample(images), saved.sample(images)
    for rank in (0, 1):
        resumed = NoiseSampler(100, seed=3, rank=rank)
        resumed.load_state_dict(saved.state_dict())
        noise, timesteps = resumed.sample(images)
        assert torch.equal(noise, draws[rank][2][0]) and torch.equal(timesteps, draws[rank][2][1])


def test_the_ema_decay_warms_up_to_its_setting():
    """Update n (after the first, which copies) uses d = min(decay, (1 + n)/(10 + n)): the average of a short run
    follows its weights instead of staying at the first ones."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_with_warmup(0.5), use_buffers=True)
    expected = None
    for step in range(12):
        model.weight.data.fill_(float(step))
        ema.update_parameters(model)
        d = min(0.5, (1 + step) / (10 + step))  # `step` updates came before; from step 9 on, d is the setting
        expected = float(step) if step == 0 else d * expected + (1 - d) * step
        assert ema.module.weight.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        ema_with_warmup(1.0)


def test_resuming_a_finished_run_without_more_epochs_is_refused(six_cases, one_epoch, tmp_path):
    base = SMALL | {
        "dataset_dir": six_cases,
        "ckpt_dir": tmp_path / "C",
        "output_dir": tmp_path / "R",
        "train#trainer#max_epochs": 1,
    }
    copy_of(one_epoch, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()}
    again = train(base | {"resume": "true"})
    assert again.returncode == 1
    assert "already trained 1 epoch" in again.stderr and "--train#trainer#max_epochs" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()} == before


def test_existing_checkpoints_are_not_overwritten_and_resume_needs_one(six_cases, one_epoch, tmp_path):
    base = SMALL | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"}
    missing = train(base | {"resume": "true"})
    assert missing.returncode == 1 and "no training_state.pt" in missing.stderr
    shutil.rmtree(tmp_path / "C", ignore_errors=True)  # what the refused resume may have left: nothing to keep
    shutil.rmtree(tmp_path / "R", ignore_errors=True)
    copy_of(one_epoch, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()}
    events = sorted((tmp_path / "R").glob("events.out.tfevents.*"))
    # the command line delivers "false" as a string, which is truthy: it must still mean false
    again = train(base | {"train#trainer#max_epochs": 1, "resume": "false", "overwrite": "false"})
    assert again.returncode == 1 and "--resume true" in again.stderr and "--overwrite true" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()} == before
    # refused before the data is read and the trainer (with its TensorBoard writers) is built
    assert sorted((tmp_path / "R").glob("events.out.tfevents.*")) == events
    unclear = train(base | {"train#trainer#max_epochs": 1, "overwrite": "yes"})
    assert unclear.returncode == 1 and "overwrite must be true or false, got 'yes'" in unclear.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()} == before


def test_an_overwriting_run_replaces_the_earlier_runs_checkpoint_and_curves(six_cases, one_epoch, tmp_path):
    """A run with --overwrite true that stops in its first epoch (here on a non-finite loss) leaves neither the
    earlier run's checkpoint, which --resume true would continue as if it were this run's, nor its curves in
    output_dir, which read_scalars would merge with this run's."""
    base = SMALL | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"}
    copy_of(one_epoch, tmp_path)
    earlier = {p.name for p in (tmp_path / "R").glob("events.out.tfevents.*")}
    assert earlier and "val_eps_mse" in read_scalars(tmp_path / "R", ["val_eps_mse"])
    stopped = train(base | {"train#trainer#max_epochs": 1, "overwrite": "true", "lambda_l2": "$float('inf')"})
    assert stopped.returncode == 1 and "the loss became inf at epoch 1" in stopped.stderr
    log = stopped.stdout + stopped.stderr
    assert "--overwrite true: removed" in log and "model.pt" in log and "training_state.pt" in log
    assert sorted(p.name for p in (tmp_path / "C").iterdir()) == []
    assert earlier.isdisjoint(p.name for p in (tmp_path / "R").glob("events.out.tfevents.*"))
    assert read_scalars(tmp_path / "R", ["val_eps_mse"]) == {}
    resumed = train(base | {"train#trainer#max_epochs": 2, "resume": "true"})
    assert resumed.returncode == 1 and "no training_state.pt" in resumed.stderr


def test_overwrite_keeps_this_runs_event_files_and_refusal_removes_nothing(tmp_path, caplog):
    """The TensorBoard writers of the run open their event files before training starts: only other
    processes' files are the earlier run's. A new run without --overwrite that shares output_dir with an
    earlier one is warned that their curves merge."""
    network, optimizer, scheduler = _schedule(1)
    ckpt_dir, log_dir = tmp_path / "C", tmp_path / "R"
    ckpt_dir.mkdir()
    log_dir.mkdir()
    for name in ("model.pt", "training_state.pt", "run.json", "model.ts"):
        (ckpt_dir / name).write_text("earlier")
    other = log_dir / f"events.out.tfevents.1700000000.{socket.gethostname()}.{os.getpid() + 1}.0"
    own = log_dir / f"events.out.tfevents.1800000000.{socket.gethostname()}.{os.getpid()}.0"
    other.write_text("earlier")
    own.write_text("this run")
    checkpoint = TrainingCheckpoint(
        str(ckpt_dir), network, optimizer, scheduler, NoiseSampler(10), log_dir=str(log_dir), overwrite=True
    )
    engine = Engine(lambda engine, batch: None)
    with pytest.raises(BadInputError, match="--overwrite true"):
        check_checkpoint_folder(
            ckpt_dir,
            resume=False,
            overwrite=False,
            spatial_size=[16, 16, 16],
            modalities=["t1", "t2"],
            noise_scheduler=DDPMScheduler(10),
            schedule="linear_beta",
        )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model.pt", "model.ts", "run.json", "training_state.pt"]
    assert other.exists()
    fresh = TrainingCheckpoint(
        str(tmp_path / "C2"), network, optimizer, scheduler, NoiseSampler(10), log_dir=str(log_dir)
    )
    fresh.prepare(engine)
    assert "already holds 1 TensorBoard event files of earlier runs" in caplog.text and other.exists()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        checkpoint.prepare(engine)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model.ts"]  # not a file that training writes
    assert sorted(p.name for p in log_dir.iterdir()) == [own.name]
    assert "--overwrite true: removed" in caplog.text and other.name in caplog.text


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(six_cases, tmp_path):
    base = SMALL | {"dataset_dir": six_cases, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"}
    assert train(base | {"train#trainer#max_epochs": 1}).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()}
    result = train(base | {"train#trainer#max_epochs": 2, "resume": "true", "lambda_l2": "$float('inf')"})
    assert result.returncode == 1
    assert "the loss became inf at epoch 2" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "C").iterdir()} == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_training(six_cases, tmp_path):
    """Two ranks, each back-propagating its batch of 2 one sample at a time."""
    overrides = SMALL | {
        "dataset_dir": six_cases,
        "ckpt_dir": tmp_path / "C",
        "output_dir": tmp_path / "R",
        "train#trainer#max_epochs": 1,
        "micro_batch_size": 1,
    }
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
    ]
    result = train(overrides, config="['configs/train.json','configs/multi_gpu_train.json']", launcher=launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    network = load_network(overrides, tmp_path / "C" / "model.pt")
    assert isinstance(network, torch.nn.Module)
    log = result.stdout + result.stderr
    assert log.count("IDMTrainer - INFO - Epoch[1] Complete") == 2  # both ranks trained


def _handlers_on_rank1(train_config: dict) -> dict[str, list[str]]:
    """The handlers of ``train_config`` under ``multi_gpu_train.json`` on a rank > 0 (``is_not_rank0`` true, on a
    terminal): each engine's enabled handlers, by ``_target_``, as the config's ``_disabled_`` keys decide."""
    parser = ConfigParser(train_config)
    for key, value in json.loads((ROOT / "configs" / "multi_gpu_train.json").read_text()).items():
        parser[key] = value  # as --config_file "[train, overlay]" merges them
    parser["is_not_rank0"] = True
    parser["generation_interval"] = 10
    enabled = {}
    for engine in ("train", "validate"):
        enabled[engine] = []
        for index, handler in enumerate(parser[f"{engine}#handlers"]):
            if isinstance(handler, dict) and "_disabled_" in handler:
                with patch("os.isatty", return_value=True):
                    if parser.get_parsed_content(f"{engine}#handlers#{index}#_disabled_"):
                        continue
            enabled[engine].append(handler["_target_"])
    return enabled


def test_the_multi_gpu_overlay_names_what_it_changes_and_a_new_handler_moves_nothing():
    """Ranks > 0 train and validate but write no logs, curves or progress bars: every such handler says so in
    train.json (``_disabled_`` by ``is_not_rank0``, which the overlay sets), so inserting a handler anywhere in
    train.json leaves the others as they were (the overlay used to disable handlers by their list positions)."""
    overlay = json.loads((ROOT / "configs" / "multi_gpu_train.json").read_text())
    assert not [key for key in overlay if re.search(r"#\d+(#|$)", key)], "the overlay picks list items by position"
    assert "initialize" not in overlay
    train = json.loads((ROOT / TRAIN).read_text())
    expected = {
        "train": [
            "LrScheduleHandler",
            "ValidationHandler",
            "bundle.handlers.NonFiniteLossGuard",
            "bundle.checkpoint.TrainingCheckpoint",
        ],
        "validate": [],
    }
    assert _handlers_on_rank1(train) == expected
    inserted = {"_target_": "EarlyStopHandler", "patience": 3, "score_function": "$lambda engine: 0.0"}
    for engine in ("train", "validate"):
        edited = json.loads(json.dumps(train))
        edited[engine]["handlers"].insert(0, inserted)
        assert _handlers_on_rank1(edited) == expected | {engine: ["EarlyStopHandler", *expected[engine]]}


def test_plot_training_curve_writes_beside_the_event_files_and_keeps_an_existing_figure(tmp_path):
    """Its default output was docs/training_curve.png, so a run from the bundle root replaced the shipped figure."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "R") as writer:
        for epoch, value in enumerate((1.0, 0.8, 0.7), start=1):
            writer.add_scalar("val_eps_mse", value, epoch)
    plot = [ROOT / "scripts" / "plot_training_curve.py", "--log_dir", tmp_path / "R"]
    run = lambda *args: run_python([*plot, *args], cwd=tmp_path, timeout=300)
    result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    figure = tmp_path / "R" / "training_curve.png"
    assert figure.read_bytes().startswith(b"\x89PNG") and not (tmp_path / "docs").exists()
    figure.write_bytes(b"kept")
    again = run("--overwrite", "false")
    assert again.returncode == 1 and "already exists" in again.stderr and "--overwrite true" in again.stderr
    assert figure.read_bytes() == b"kept"
    assert run("--overwrite", "true").returncode == 0 and figure.read_bytes().startswith(b"\x89PNG")


def test_temporary_files_of_killed_writers_are_removed_when_a_run_starts_or_resumes(tmp_path, caplog):
    """A process killed while it wrote its checkpoint leaves ``.training_state.pt.tmp<pid>`` (several GB for the
    paper's network): the next run in that folder removes those of writers that no longer run, and logs them; a
    running writer's file is left alone."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ckpt_dir = tmp_path / "C"
        ckpt_dir.mkdir()
        stale = [
            ckpt_dir / f".training_state.pt.tmp{dead_pid}",
            ckpt_dir / f".model.pt.tmp{dead_pid}",
            ckpt_dir / f".run.json.tmp{os.getpid()}",
        ]
        running = ckpt_dir / f".training_state.pt.tmp{alive.pid}"
        for path in [*stale, running, ckpt_dir / "model.pt"]:
            path.write_bytes(b"partial")
        network, optimizer, scheduler = _schedule(1)
        checkpoint = TrainingCheckpoint(str(ckpt_dir), network, optimizer, scheduler, NoiseSampler(10))
        with caplog.at_level(logging.WARNING):
            checkpoint.prepare(Engine(lambda engine, batch: None))
        assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([running.name, "model.pt"])
        assert "Removed 3 temporary files left by writers that no longer run" in caplog.text
    finally:
        alive.kill()
        alive.wait()
