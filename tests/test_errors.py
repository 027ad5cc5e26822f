"""How the bundle reports bad input and a non-finite loss: once, on stderr, without a traceback, exit code 1."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_TRAINING as SMALL
from conftest import run_bundle
from ignite.engine import Engine, Events
from monai.networks.schedulers import DDPMScheduler

from bundle.checkpoint import TrainingCheckpoint
from bundle.data import write_ellipsoid_phantoms
from bundle.diffusion import IDMTrainer, NoiseSampler
from bundle.errors import BadInputError, NonFiniteLossError, bad_input_in, install_error_hook
from bundle.flags import as_flag, as_flags
from bundle.handlers import NonFiniteLossGuard
from bundle.networks import InvertibleDiffusionUNet


def test_true_false_settings_read_the_command_lines_strings_and_refuse_anything_else():
    assert [as_flag(v, "x") for v in (True, False, "true", "false", " FALSE ", "True")] == [
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert as_flags(["false", True, "TRUE"], "levels") == (False, True, True)
    for bad in ("no", "0", 1, None):
        with pytest.raises(BadInputError, match=f"overwrite must be true or false, got {bad!r}"):
            as_flag(bad, "overwrite")
    with pytest.raises(BadInputError, match=r"levels must hold true/false values, got \['true', 'maybe'\]"):
        as_flags(["true", "maybe"], "levels")
    with pytest.raises(BadInputError, match="levels must be a list of true/false values, got 'true'"):
        as_flags("true", "levels")


def test_the_error_hook_prints_bad_input_once_even_when_monai_wraps_it(capsys, monkeypatch):
    """MONAI's config parser re-raises an expression's error as a RuntimeError from it: the hook finds the bad input
    in the chain, prints it as one line, and leaves any other error to Python's own hook (its traceback)."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    install_error_hook()
    try:
        try:
            raise BadInputError("batch_size must be a positive integer; got 0.")
        except BadInputError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error
    except RuntimeError as wrapped:
        assert isinstance(bad_input_in(wrapped), BadInputError)
        sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    assert capsys.readouterr().err == "ERROR: batch_size must be a positive integer; got 0.\n"
    try:
        raise KeyError("not a bad input")
    except KeyError as other:
        assert bad_input_in(other) is None
        sys.excepthook(type(other), other, other.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'not a bad input'" in err


def test_network_def_flags_given_as_command_line_strings_are_parsed_by_the_config(tmp_path):
    """``--attention_levels "[false,true,true]"`` and ``--memory_efficient false`` reach the network as bools."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update(
        {
            "attention_levels": ["false", "true", "true"],
            "memory_efficient": "false",
            "network_def#channels": [8, 16, 32],
        }
    )
    network = parser.get_parsed_content("network_def")
    assert network.memory_efficient is False and network.trunk.attention_levels == (False, True, True)
    parser["memory_efficient"] = "maybe"
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("network_def", lazy=False)
    assert "memory_efficient must be true or false, got 'maybe'" in str(bad_input_in(info.value))


def test_a_bad_command_line_prints_its_error_once(tmp_path):
    result = run_bundle(
        "configs/train.json",
        SMALL
        | {
            "dataset_dir": tmp_path / "D",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "micro_batch_size": 0,
        },
    )
    assert result.returncode == 1
    assert result.stderr.count("micro_batch_size must be a positive integer") == 1
    assert "micro_batch_size must be a positive integer" not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_non_finite_loss_in_the_first_epoch_is_reported_once_without_a_checkpoint(tmp_path):
    write_ellipsoid_phantoms(tmp_path / "D", num_cases=4, shape=(24, 24, 20))
    result = run_bundle(
        "configs/train.json",
        SMALL
        | {
            "dataset_dir": tmp_path / "D",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "lambda_l2": "$float('inf')",
            "train#trainer#max_epochs": 1,
        },
        "training",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert log.count("the loss became inf at epoch 1") == 1 and "the loss became inf" in result.stderr
    assert "no checkpoint has been written yet" in result.stderr and "last good checkpoint" not in log
    assert "Traceback" not in log
    assert not (tmp_path / "C").exists()


def _engine_at(epoch: int, loss: float = float("nan"), gradient: float = 1.0) -> Engine:
    engine = Engine(lambda engine, batch: None)
    engine.state.epoch, engine.state.iteration = epoch, 3 * epoch
    engine.state.output = {"loss": torch.tensor(loss), "prediction_mse": torch.tensor(0.5)}
    engine.network = torch.nn.Linear(2, 2)
    for p in engine.network.parameters():
        p.grad = torch.full_like(p, gradient)
    return engine


def test_the_non_finite_message_names_the_checkpoint_only_when_there_is_one(tmp_path):
    guard = NonFiniteLossGuard(tmp_path / "C")
    with pytest.raises(NonFiniteLossError, match="no checkpoint has been written yet") as info:
        guard(_engine_at(1))
    assert "the loss became nan at epoch 1, iteration 3" in str(info.value) and "--resume" not in str(info.value)
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / TrainingCheckpoint.STATE).write_bytes(b"")
    with pytest.raises(NonFiniteLossError) as info:
        guard(_engine_at(2))
    message = str(info.value)
    assert str(tmp_path / "C" / TrainingCheckpoint.STATE) in message and "epoch 1" in message
    assert "--resume true" in message and "no checkpoint" not in message


def test_a_non_finite_gradient_of_a_finite_loss_stops_training_too(tmp_path):
    guard = NonFiniteLossGuard(tmp_path)
    guard(_engine_at(1, loss=2e28))  # finite loss and gradients: nothing happens
    with pytest.raises(NonFiniteLossError, match="the loss's gradient became non-finite"):
        guard(_engine_at(1, loss=2e28, gradient=float("inf")))


def _trainer(tmp_path: Path, lambda_l2: float = 1e-4, lr: float = 1e-3) -> IDMTrainer:
    """An IDM trainer of a small 2D network with EMA and the guard, over 3 batches per epoch."""
    torch.manual_seed(0)
    network = InvertibleDiffusionUNet(
        spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 16, 32), attention_levels=(False, True, True)
    )
    ema = torch.optim.swa_utils.AveragedModel(network, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    return IDMTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=[{"image": torch.rand(2, 2, 16, 16)}] * 3,
        epoch_length=3,
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=lr),
        scheduler=DDPMScheduler(num_train_timesteps=100, schedule="cosine"),
        noise_sampler=NoiseSampler(100),
        lambda_l2=lambda_l2,
        ema=ema,
        train_handlers=[NonFiniteLossGuard(tmp_path)],
    )


def test_the_trainer_stops_at_a_non_finite_loss_before_the_step_and_raises_it_from_run(tmp_path, caplog):
    """The guard's error leaves ignite quietly (no ERROR record, no epoch completed, so no checkpoint) and
    is raised by ``run``; the weights, the EMA and the optimizer never see the bad step."""
    trainer = _trainer(tmp_path, lambda_l2=float("inf"))
    epochs_completed = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: epochs_completed.append(engine.state.epoch))
    weights = {**trainer.network.state_dict(), **trainer.ema.state_dict()}
    before = {k: v.clone() for k, v in weights.items()}
    with caplog.at_level(logging.INFO), pytest.raises(NonFiniteLossError, match="the loss became inf at epoch 1"):
        trainer.run()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert epochs_completed == [] and not trainer.optimizer.state
    assert all(torch.equal(before[k], weights[k]) for k in before)


def test_a_learning_rate_that_overflows_the_gradient_stops_training_with_finite_weights(tmp_path):
    """With lr 1e6 the second loss is finite (≈1e28) but its gradient overflows: that step would make every
    weight NaN (and an epoch ending there would checkpoint them)."""
    trainer = _trainer(tmp_path, lr=1e6)
    with pytest.raises(NonFiniteLossError, match=r"gradient became non-finite .* at epoch 1, iteration 2"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
