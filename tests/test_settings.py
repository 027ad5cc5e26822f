"""The training configuration's settings are checked before anything is built, loaded or written."""

from __future__ import annotations

import pytest
from conftest import SMALL_TRAINING as SMALL, run_bundle
from monai.networks.schedulers import DDPMScheduler

from bundle.errors import BadInputError
from bundle.settings import check_training_settings


def _settings(tmp_path, **changes) -> dict:
    return {
        "spatial_size": [16, 16, 16], "batch_size": 2, "micro_batch_size": None, "amp": False,
        "noise_scheduler": DDPMScheduler(100, schedule="cosine"), "schedule": "cosine", "learning_rate": 2e-4,
        "ema_decay": 0.999, "lambda_rec": 0.0, "lambda_l2": 1e-4, "val_interval": 1, "drift_interval": 100,
        "val_timestep_fractions": [0.05, 0.25, 0.5], "preview_interval": 5, "device": "cpu",
        "ckpt_dir": tmp_path / "models", "output_dir": tmp_path / "runs",
    } | changes


@pytest.mark.parametrize("changes, message", [
    ({"spatial_size": 64}, "spatial_size must be three positive integers such as [64,64,64]; got 64"),
    ({"spatial_size": [16, 16]}, "spatial_size must be three positive integers"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"micro_batch_size": -1}, "micro_batch_size must be a positive integer"),
    ({"amp": "maybe"}, "amp must be true or false, got 'maybe'"),
    ({"noise_scheduler": DDPMScheduler(100, schedule="cosine", s=0.05)}, "schedule arguments differ"),
    ({"noise_scheduler": DDPMScheduler(100, schedule="cosine", prediction_type="v_prediction")},
     "noise_scheduler#prediction_type is 'v_prediction'"),
    ({"schedule": "linear_beta"}, "noise_scheduler#schedule is 'linear_beta'"),
    ({"learning_rate": -1}, "learning_rate must be a positive number"),
    ({"ema_decay": 1.5}, "ema_decay must be in [0, 1)"),
    ({"lambda_rec": -0.1}, "lambda_rec must be a number ≥ 0"),
    ({"val_interval": 0}, "val_interval must be a positive integer"),
    ({"drift_interval": "often"}, "drift_interval must be a positive integer"),
    ({"preview_interval": 1.5}, "preview_interval must be a positive integer"),
    ({"val_timestep_fractions": [1.0]}, "val_timestep_fractions must be a list of fractions of T in [0, 1)"),
    ({"device": "cuda:7"}, "device is 'cuda:7', but this machine has"),
])
def test_each_bad_setting_is_named_with_what_it_accepts(tmp_path, changes, message):
    with pytest.raises(BadInputError) as error:
        check_training_settings(**_settings(tmp_path, **changes))
    assert message in str(error.value)


def test_good_settings_pass_and_output_folders_that_are_files_are_refused(tmp_path):
    check_training_settings(**_settings(tmp_path))
    check_training_settings(**_settings(tmp_path, amp="true", micro_batch_size=1, ema_decay=0))
    (tmp_path / "models").write_text("")
    with pytest.raises(BadInputError, match="ckpt_dir .*models' is a file; give a folder"):
        check_training_settings(**_settings(tmp_path))


def test_a_bad_setting_stops_training_before_anything_is_read_or_written(tmp_path):
    """The checks run first: the missing dataset_dir is neither searched nor filled with phantoms."""
    result = run_bundle("configs/train.json", SMALL | {
        "dataset_dir": tmp_path / "D", "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R", "learning_rate": "-1",
    }, "training")
    assert result.returncode == 1
    assert "learning_rate must be a positive number such as 2e-4; got -1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / name).exists() for name in ("D", "C", "R"))
