"""The TensorBoard handlers: one shared writer per run, closed at exit; the step handler's time estimate."""

from __future__ import annotations

import itertools
import logging
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_python
from ignite.engine import Engine, Events
from monai.handlers import TensorBoardStatsHandler, from_engine
from monai.networks.schedulers import DDPMScheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import bundle.handlers.tensorboard
from bundle.handlers import InversionDriftMonitor, PreviewHandler, StepStatsHandler, summary_writer
from bundle.handlers.step_stats import SMALL_CPU_RECIPE
from bundle.networks import InvertibleDiffusionUNet
from bundle.visualize import read_scalars

ESTIMATE = "per training step"  # in the estimate's message, once per run


def _trainer(network: torch.nn.Module, scheduler: DDPMScheduler, device: str = "cpu", sleep: float = 0.0) -> Engine:
    """An ignite engine standing in for :class:`~bundle.diffusion.IDMTrainer`: its ``network`` and ``scheduler``,
    ``state.device``, and per step the output decollated per sample, with the keys the handlers read."""
    images, noise, timesteps = torch.rand(2, 2, 8, 8, 8) * 2 - 1, torch.randn(2, 2, 8, 8, 8), torch.tensor([5, 60])

    def step(engine: Engine, batch: int) -> list[dict]:
        time.sleep(sleep)
        losses = {
            "loss": torch.tensor(0.5 + batch),
            "prediction_mse": torch.tensor(0.25 + batch),
            "weight_norm": torch.tensor(3.0),
        }
        return [
            {"image": i, "label": n, "timesteps": int(t)} | losses
            for i, n, t in zip(images, noise, timesteps, strict=True)
        ]

    engine = Engine(step)
    engine.network, engine.scheduler = network, scheduler
    engine.state.device = torch.device(device)
    return engine


def _small_network() -> InvertibleDiffusionUNet:
    torch.manual_seed(0)
    return InvertibleDiffusionUNet(3, 2, 2, channels=(8, 16), num_blocks=1, attention_levels=(False, True))


def test_the_handlers_write_into_one_event_file_through_the_shared_writer_and_leave_it_open(tmp_path):
    """As configs/train.json wires them: the step statistics, the drift monitor, MONAI's TensorBoardStatsHandler
    and the previews all write with one writer, into one event file; none of them closes it."""
    network = _small_network()
    writer = SummaryWriter(log_dir=str(tmp_path))
    trainer = _trainer(network, DDPMScheduler(100, schedule="cosine"))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.125)
    StepStatsHandler(optimizer, summary_writer=writer).attach(trainer)
    InversionDriftMonitor(summary_writer=writer, interval=2).attach(trainer)
    TensorBoardStatsHandler(
        summary_writer=writer, tag_name="train_loss", output_transform=from_engine(["loss"], first=True)
    ).attach(trainer)
    volumes = {"image": torch.rand(2, 2, 8, 8, 8), "denoised": torch.rand(2, 2, 8, 8, 8)}
    evaluator = Engine(lambda engine, batch: volumes)
    PreviewHandler(summary_writer=writer, interval=1).attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0]))
    trainer.run([0, 1], max_epochs=2)
    writer.add_scalar("after/training", 7.0, 1)  # a closed writer would open a second file for this
    writer.close()

    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1, [f.name for f in files]
    tags = [
        "train/step_seconds",
        "train/lr",
        "train/prediction_mse",
        "train/weight_norm",
        "train/peak_memory_mb",
        "train/inversion_drift",
        "train_loss",
        "after/training",
    ]
    scalars = read_scalars(tmp_path, tags)
    assert set(scalars) == set(tags)
    assert [step for step, _ in scalars["train/step_seconds"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["train/prediction_mse"]] == [0.25, 1.25, 0.25, 1.25]
    assert [value for _, value in scalars["train/lr"]] == [0.125] * 4
    assert [step for step, _ in scalars["train/inversion_drift"]] == [2, 4]
    assert 0 < scalars["train/inversion_drift"][0][1] < 1e-5
    assert [value for _, value in scalars["train_loss"]] == [0.5, 1.5, 0.5, 1.5]
    events = EventAccumulator(str(files[0]), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("validation_preview")] == [1, 1]  # the evaluator's epoch, twice


@pytest.mark.parametrize("resumed", [False, True])
def test_the_time_estimate_is_logged_once_with_the_steps_of_the_run(tmp_path, caplog, resumed):
    """After this run's third iteration: the measured time per step and the steps in all (max_epochs × iterations
    per epoch, less those done before a resumed run); a short run on the CPU gets no warning."""
    network = torch.nn.Linear(2, 2)
    trainer = _trainer(network, DDPMScheduler(100))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    handler = StepStatsHandler(optimizer, summary_writer=SummaryWriter(str(tmp_path)))
    handler.attach(trainer)
    logged_at = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def note_when_logged(engine: Engine) -> None:
        if ESTIMATE in caplog.text:
            logged_at.append(engine.state.iteration)

    if resumed:  # as TrainingCheckpoint.load leaves a trainer stopped after epoch 2
        trainer.state.max_epochs, trainer.state.epoch_length, trainer.state.epoch, trainer.state.iteration = 4, 5, 2, 10
    with caplog.at_level(logging.INFO, logger="bundle.handlers.step_stats"):
        trainer.run(range(5), max_epochs=4)
    handler.summary_writer.close()
    assert trainer.state.iteration == 20
    messages = [r for r in caplog.records if ESTIMATE in r.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.INFO
    message = messages[0].getMessage()
    assert re.match(r"measured \S+ s per training step; ", message), message
    if resumed:
        assert "10 steps in this resumed run (4 epochs × 5 iterations, less 10 done before) ≈ " in message
        assert logged_at[0] == 13
    else:
        assert "20 steps in all (4 epochs × 5 iterations) ≈ " in message
        assert logged_at[0] == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_long_run_on_the_cpu_names_the_readmes_small_cpu_recipe(tmp_path, caplog, device):
    """A million epochs of 5 steps of at least 1 ms: over an hour. On the CPU a warning names the small recipe;
    on another device (``meta`` stands in for a GPU here) the estimate alone is logged."""
    network = torch.nn.Linear(3, 4)
    trainer = _trainer(network, DDPMScheduler(100), device=device, sleep=0.001)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    handler = StepStatsHandler(optimizer, summary_writer=SummaryWriter(str(tmp_path)))
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda engine: engine.terminate())
    with caplog.at_level(logging.INFO, logger="bundle.handlers.step_stats"):
        trainer.run(range(5), max_epochs=10**6)
    handler.summary_writer.close()
    assert [
        r.getMessage().count("5000000 steps in all (1000000 epochs × 5 iterations)")
        for r in caplog.records
        if ESTIMATE in r.getMessage()
    ] == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if device == "cpu":
        assert len(warnings) == 1, warnings
        assert "training this 16-parameter network on the CPU would take about " in warnings[0]
        assert "426M-parameter network, which needs a GPU" in warnings[0] and SMALL_CPU_RECIPE in warnings[0]
    else:
        assert warnings == []


def test_the_small_cpu_recipe_is_the_readmes():
    """The warning's overrides are those of a training command in README.md (its small model on a CPU)."""
    recipe = shlex.split(SMALL_CPU_RECIPE)
    assert "--spatial_size" in recipe and "--network_def#channels" in recipe
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL):
        block = re.sub(r"(^|\s)#\s.*$", "", block, flags=re.MULTILINE)  # comments; not the # of a setting's path
        command = shlex.split(block.replace("\\\n", " "))
        if "training" in command:
            commands.append({key: value for key, value in itertools.pairwise(command) if key.startswith("--")})
    wanted = dict(zip(recipe[::2], recipe[1::2], strict=True))
    assert any(wanted.items() <= command.items() for command in commands), (
        f"no training command of README.md has {SMALL_CPU_RECIPE}: {commands}"
    )


def test_the_shared_writer_is_closed_at_exit_which_flushes_it(tmp_path, monkeypatch):
    registered = []
    monkeypatch.setattr(bundle.handlers.tensorboard.atexit, "register", registered.append)
    writer = summary_writer(str(tmp_path))
    writer.add_scalar("train/step_seconds", 2.5, 3)
    assert registered == [writer.close]
    registered[0]()
    registered[0]()  # twice: the second does nothing
    assert read_scalars(tmp_path, ["train/step_seconds"]) == {"train/step_seconds": [(3, 2.5)]}
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_scalars_written_just_before_a_process_fails_are_on_disk(tmp_path):
    """As a run stopped by a non-finite loss or an exception: the last scalars, never flushed, reach the file."""
    script = tmp_path / "write_and_fail.py"
    script.write_text(
        "import sys\n"
        "from bundle.handlers import summary_writer\n"
        "writer = summary_writer(sys.argv[1])\n"
        "for step in range(3):\n"
        "    writer.add_scalar('train/loss', 0.5 * step, step)\n"
        "raise RuntimeError('the loss became nan')\n"
    )
    result = run_python([script, tmp_path / "R"])
    assert result.returncode == 1 and "the loss became nan" in result.stderr, result.stderr[-3000:]
    assert read_scalars(Path(tmp_path / "R"), ["train/loss"]) == {"train/loss": [(0, 0.0), (1, 0.5), (2, 1.0)]}
