"""Same settings and seed, same model: through the command line, bitwise on the CPU, and after a run is killed
and resumed. Each command line runs in a process of its own, seeded by the OS as a new interpreter is (the
suite's zygote reseeds the processes it forks), so an unseeded draw anywhere would show here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, SMALL_TRAINING, bundle_args, run_bundle

from scripts.benchmarking.child_process import child_environment

EPOCHS = 2
# the 6 cases of conftest's fixture: 5 train in 3 iterations an epoch (batch 2), 1 validates
SMALL = SMALL_TRAINING | {"train#trainer#max_epochs": EPOCHS, "lr_scheduler#T_max": EPOCHS}
WEIGHTS = ("network", "ema", "optimizer", "noise_sampler", "lr_scheduler", "trainer")


def _files(folder: Path) -> tuple[dict, dict]:
    """(model.pt, training_state.pt) of a checkpoint folder."""
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=False)
    return load("model.pt"), load("training_state.pt")


def _assert_equal(a, b, where: str = "") -> None:
    """Bitwise equality of two nested structures of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_run(cases: Path, folder: Path, **overrides) -> Path:
    """Trains by the command line into ``folder``; its checkpoint folder."""
    run = {"dataset_dir": cases, "ckpt_dir": folder / "models", "output_dir": folder / "logs"}
    result = run_bundle("configs/train.json", SMALL | run | overrides, "training")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "models"


def test_two_runs_with_one_seed_write_identical_weights_and_another_seed_others(cases, tmp_path):
    one_epoch = {"train#trainer#max_epochs": 1}
    first, second, other = (
        _files(train_run(cases, tmp_path / name, seed=seed, **one_epoch))
        for name, seed in (("first", 0), ("second", 0), ("other", 1))
    )
    _assert_equal(first[0], second[0], "model.pt")
    for key in WEIGHTS:
        _assert_equal(first[1][key], second[1][key], f"training_state.pt:{key}")
    differ = [name for name, tensor in first[0].items() if not torch.equal(tensor, other[0][name])]
    assert len(differ) > len(first[0]) // 2, differ  # the initialisation itself follows the seed


def _kill_in_epoch(folder: Path, cases: Path, epoch: int, **overrides) -> str:
    """Starts ``python -m monai.bundle run training …`` as a user does and SIGKILLs it once it has logged the
    first iteration of ``epoch``; its log up to then."""
    run = {"dataset_dir": cases, "ckpt_dir": folder / "models", "output_dir": folder / "logs"}
    args = [sys.executable, "-m", *bundle_args("configs/train.json", SMALL | run | overrides, "training")]
    process = subprocess.Popen(
        args, cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = []
    try:
        for line in process.stdout:
            log.append(line)
            if f"Epoch: {epoch}/{EPOCHS}, Iter: 1/" in line:
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(log)[-3000:]
    return "".join(log)


def assert_killed_and_resumed_equals(whole: Path, cases: Path, folder: Path, **overrides) -> None:
    """A run of ``overrides`` killed in its second epoch and resumed in ``folder`` ends bitwise where the
    uninterrupted run whose checkpoint folder is ``whole`` ended (every object of its training state)."""
    log = _kill_in_epoch(folder, cases, 2, **overrides)
    _, state = _files(folder / "models")
    assert state["trainer"] == {"epoch": 1, "iteration": 3}, log[-3000:]  # killed before epoch 2 was saved
    expected, resumed = _files(whole), _files(train_run(cases, folder, resume="true", **overrides))
    assert resumed[1]["trainer"] == {"epoch": EPOCHS, "iteration": 3 * EPOCHS}
    _assert_equal(expected[0], resumed[0], "model.pt")
    assert expected[1].keys() == resumed[1].keys()
    for key in expected[1]:
        _assert_equal(expected[1][key], resumed[1][key], f"training_state.pt:{key}")


def test_a_run_killed_in_its_second_epoch_and_resumed_equals_the_uninterrupted_run(cases, tmp_path):
    assert_killed_and_resumed_equals(train_run(cases, tmp_path / "whole"), cases, tmp_path / "killed")
