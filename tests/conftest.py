"""Shared test helpers."""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from scripts.benchmarking import child_process
from scripts.benchmarking.child_process import child_environment

ROOT = Path(__file__).resolve().parents[1]
# command-line overrides of configs/train.json for a small, fast training run
SMALL_TRAINING = {
    "spatial_size": "[16,16,16]",
    "network_def#channels": "[8,16,32]",
    "attention_levels": "[false,true,true]",
    "num_train_timesteps": "100",
    "batch_size": "2",
    "num_workers": "0",
}


@cache
def _zygote() -> tuple[subprocess.Popen, Path]:
    """The suite's ``tests/zygote.py`` process (started on first use, ended with the test session) and the file
    that collects its own error output."""
    log = Path(tempfile.mkdtemp(prefix="idm_zygote_")) / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "zygote.py")],
            cwd=ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_environment(),
        )
    atexit.register(shutil.rmtree, log.parent, True)
    atexit.register(process.stdin.close)  # its loop ends at the end of its input (runs first: last registered)
    return process, log


def run_python(
    args: list, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python ARGS`` as a user types it (a script or ``-m module``, run as ``__main__`` with these ``sys.argv``,
    in ``cwd``, with ``env`` (default: this environment with the bundle root first on ``PYTHONPATH``), output captured),
    in a process forked from :mod:`zygote`, which has imported torch, MONAI and the bundle once for the session.

    Raises:
        subprocess.TimeoutExpired: when it ran past ``timeout`` seconds (it is killed).
    """
    args = [str(a) for a in args]
    env = child_environment() if env is None else env
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        answer = _ask_zygote(args, cwd, env, out, err, timeout)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if answer["timed_out"]:
        raise subprocess.TimeoutExpired([sys.executable, *args], timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable, *args], answer["returncode"], stdout, stderr)


def _ask_zygote(args: list[str], cwd: Path, env: dict, stdout: Path, stderr: Path, timeout: float) -> dict:
    """The zygote's answer (``returncode``, ``timed_out``) to ``python ARGS`` run in ``cwd`` with ``env``, its output
    appended to the two files."""
    zygote, log = _zygote()
    request = {"argv": args, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
    zygote.stdin.write(json.dumps(request | {"timeout": timeout}) + "\n")
    zygote.stdin.flush()
    reply = zygote.stdout.readline()
    if not reply:
        raise RuntimeError(f"tests/zygote.py ended: {log.read_text()[-3000:]}")
    return json.loads(reply)


@pytest.fixture(scope="session", autouse=True)
def _studies_run_their_command_lines_in_the_zygote():
    """The quality, generation and synthesis studies' ``python -m monai.bundle run …`` command lines
    (:func:`scripts.benchmarking.child_process.run_bundle_command`) run in processes forked from the zygote too."""

    def launch_python(argv, env, log) -> int:
        return _ask_zygote([str(a) for a in argv], ROOT, dict(env), log, log, timeout=3600)["returncode"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(child_process, "launch_python", launch_python)
        yield


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """A BraTS2020 folder of six small ellipsoid phantoms (24×24×20) for runs through the command line."""
    from bundle.data import write_ellipsoid_phantoms

    root = tmp_path_factory.mktemp("brats6")
    write_ellipsoid_phantoms(root / "MICCAI_BraTS2020_TrainingData", num_cases=6, shape=(24, 24, 20))
    return root


def bundle_args(config: str, overrides: dict, run_id: str = "run") -> list[str]:
    """What follows ``python -m`` in ``python -m monai.bundle run RUN_ID --config_file CONFIG --key value …``."""
    return [
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config,
        *[a for k, v in overrides.items() for a in (f"--{k}", str(v))],
    ]


def run_bundle(
    config: str, overrides: dict, run_id: str = "run", launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG --key value …`` from the bundle root,
    as a user types it (by :func:`run_python`; ``launcher`` replaces ``python -m`` with a real process, e.g.
    torchrun's)."""
    args = bundle_args(config, overrides, run_id)
    env = child_environment(GLOO_SOCKET_IFNAME="lo")
    if launcher is None:
        return run_python(["-m", *args], env=env)
    # a process that aborts (SIGABRT, e.g. a C++ std::terminate) prints every thread's Python stack
    env["PYTHONFAULTHANDLER"] = "1"
    return subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False)


def redraw_zero_init_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Re-draws every parameter that is exactly zero (the identity initialisation) from N(0, std²).

    Zero-initialised output convolutions, attention output projections and orthogonal generators
    make a fresh network the identity; tests must exercise a network away from it.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def recorded_checkpoint(
    folder: Path,
    modalities: tuple[str, ...] = ("t1", "t2"),
    condition_modalities: tuple[str, ...] = (),
    num_train_timesteps: int = 20,
    schedule: str = "cosine",
    validation_cases: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """``folder/model.pt``, a small IDM (channels 8–32, attention at the two coarse levels, identity initialisation
    re-drawn; the same weights for the same ``seed``) for 16³ volumes, with the ``run.json`` that a training run of
    this noise schedule and these validation cases would write beside it; its path."""
    from monai.networks.schedulers import DDPMScheduler

    from bundle.networks import InvertibleDiffusionUNet
    from bundle.run_record import RUN_RECORD, run_record

    torch.manual_seed(seed)
    network = redraw_zero_init_(
        InvertibleDiffusionUNet(
            3,
            len(modalities) + len(condition_modalities),
            len(modalities),
            (8, 16, 32),
            attention_levels=(False, True, True),
        ),
        seed=seed,
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / "model.pt")
    record = run_record(
        case={"image": torch.zeros(len(modalities), 16, 16, 16)},
        modalities=modalities,
        condition_modalities=condition_modalities,
        network=network,
        schedule=schedule,
        noise_scheduler=DDPMScheduler(num_train_timesteps, schedule=schedule),
        validation_cases=validation_cases,
    )
    (folder / RUN_RECORD).write_text(json.dumps(record))
    return folder / "model.pt"


def largest_update_allocation(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """``(largest allocation of one update, largest parameter)`` in bytes, for an optimizer of CPU
    parameters: the update runs once on random gradients (its state comes to exist) and once under
    ``torch.profiler``, whose memory events give each operation's allocations."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        optimizer.step()
    largest_allocation = max((event.cpu_memory_usage for event in profiler.events()), default=0)
    return largest_allocation, max(p.numel() * p.element_size() for p in params)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
)
def device(request) -> torch.device:
    """Each test that takes it runs on the CPU and, where one is present, on a CUDA device (cuDNN's
    convolutions, TF32 included as PyTorch sets it by default)."""
    return torch.device(request.param)


@pytest.fixture
def one_torch_thread():
    """Runs the test on one torch intra-op thread and restores the setting afterwards. For tests of tiny
    tensors (gradchecks, float64 twins): there a second thread only adds synchronisation, which on a shared
    2-core machine made the float64 gradchecks of tiny layers and trunks about 10 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
