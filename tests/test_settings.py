"""The workflows' settings are checked before anything is built, loaded or written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_TRAINING as SMALL
from conftest import run_bundle
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion import SAMPLERS, make_sampler
from bundle.errors import BadInputError
from bundle.run_record import RUN_RECORD, run_record
from bundle.settings import EvaluationSettings, InferenceSettings, TrainingSettings


def _settings(tmp_path, **changes) -> dict:
    return {
        "spatial_size": [16, 16, 16],
        "spacing": None,
        "modalities": ["t1", "t2"],
        "val_fraction": 0.2,
        "skip_invalid": False,
        "batch_size": 2,
        "micro_batch_size": None,
        "amp": False,
        "noise_scheduler": DDPMScheduler(100, schedule="cosine"),
        "schedule": "cosine",
        "learning_rate": 2e-4,
        "ema_decay": 0.999,
        "lambda_rec": 0.0,
        "lambda_l2": 1e-4,
        "attention_levels": [False, True],
        "val_interval": 1,
        "drift_interval": 100,
        "val_timestep_fractions": [0.05, 0.25, 0.5],
        "preview_interval": 5,
        "device": "cpu",
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "runs",
        "resume": False,
        "overwrite": False,
    } | changes


def _checked(tmp_path, **changes) -> TrainingSettings:
    """The settings of ``_settings``, with what the device and folders hold checked as training checks them."""
    settings = TrainingSettings(**_settings(tmp_path, **changes))
    settings.check_device_and_folders()
    return settings


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"spatial_size": 64}, "spatial_size must be three positive integers such as [64,64,64]; got 64"),
        ({"spatial_size": [16, 16]}, "spatial_size must be three positive integers"),
        (
            {"spacing": 0},
            "spacing must be null (each case's box resized to spatial_size), a voxel size in mm such as 1.0",
        ),
        ({"spacing": [1.0, 1.0]}, "or three such as [1.0,1.0,1.5]; got [1.0, 1.0]"),
        ({"spacing": "1mm"}, "spacing must be null"),
        ({"val_fraction": 0.0}, "val_fraction must be a number in (0, 1)"),
        ({"val_fraction": 1.0}, "val_fraction must be a number in (0, 1)"),
        ({"val_fraction": "0.2"}, "val_fraction must be a number in (0, 1)"),
        ({"skip_invalid": "yes"}, "skip_invalid must be true or false, got 'yes'"),
        ({"resume": "no"}, "resume must be true or false, got 'no'"),
        ({"overwrite": 1}, "overwrite must be true or false, got 1"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"micro_batch_size": -1}, "micro_batch_size must be a positive integer"),
        ({"amp": "maybe"}, "amp must be true or false, got 'maybe'"),
        ({"recompute_norms": "yes"}, "recompute_norms must be true or false, got 'yes'"),
        ({"attention_levels": [True, "maybe"]}, "attention_levels must hold true/false values"),
        (
            {"noise_scheduler": DDPMScheduler(100, schedule="cosine", prediction_type="v_prediction")},
            "noise_scheduler#prediction_type is 'v_prediction'",
        ),
        ({"learning_rate": -1}, "learning_rate must be a positive number"),
        ({"ema_decay": 1.5}, "ema_decay must be in [0, 1)"),
        ({"lambda_rec": -0.1}, "lambda_rec must be a number ≥ 0"),
        ({"val_interval": 0}, "val_interval must be a positive integer"),
        ({"drift_interval": "often"}, "drift_interval must be a positive integer"),
        ({"preview_interval": 1.5}, "preview_interval must be an integer ≥ 0"),
        ({"val_timestep_fractions": [1.0]}, "val_timestep_fractions must be a list of fractions of T in [0, 1)"),
        ({"patch_training": "yes"}, "patch_training"),
        ({"patch_training": True, "patch_fractions": [0, 1]}, "patch_fractions must be patch sides as fractions"),
        ({"patch_training": True, "patch_probabilities": [0.5, 0.5]}, "patch_probabilities must give each of the 3"),
        ({"device": "cuda:7"}, "device is 'cuda:7', but this machine has"),
    ],
)
def test_each_bad_setting_is_named_with_what_it_accepts(tmp_path, changes, message):
    with pytest.raises(BadInputError) as error:
        _checked(tmp_path, **changes)
    assert message in str(error.value)


def test_good_settings_pass_and_output_folders_that_are_files_are_refused(tmp_path):
    _checked(tmp_path)
    settings = _checked(
        tmp_path, amp="true", micro_batch_size=1, ema_decay=0, resume="false", overwrite="TRUE", skip_invalid="true"
    )
    # the command line's strings are bools after the check, which the components read
    assert (settings.amp, settings.resume, settings.overwrite, settings.skip_invalid) == (True, False, True, True)
    assert _checked(tmp_path, attention_levels=["false", "TRUE"]).attention_levels == (False, True)
    assert settings.validation_timesteps == [5, 25, 50]  # of T = 100
    (tmp_path / "models").write_text("")
    with pytest.raises(BadInputError, match=r"ckpt_dir .*models' is a file; give a folder"):
        _checked(tmp_path)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"])
def test_every_monai_noise_schedule_is_accepted_and_every_sampler_shares_its_alphas(tmp_path, schedule):
    """Any MONAI schedule trains (the cosine-only rule is gone): the settings take it, and every sampler built for the
    trained model (:func:`~bundle.diffusion.make_sampler`, by name, as inference and evaluation build them) has the
    training scheduler's ᾱ."""
    scheduler = DDPMScheduler(100, schedule=schedule)
    settings = _checked(tmp_path, noise_scheduler=scheduler, schedule=schedule)
    assert settings.noise_scheduler is scheduler and settings.schedule == schedule
    for name in SAMPLERS["epsilon"]:
        torch.testing.assert_close(make_sampler(name, 100, schedule).alphas_cumprod, scheduler.alphas_cumprod)


def _record_beside(folder, schedule: str = "cosine", spatial_size=(16, 16, 16)) -> None:
    """``folder/run.json`` of a run on ``spatial_size`` with the ``schedule`` noise schedule of T = 100."""
    folder.mkdir(exist_ok=True)
    image = torch.zeros(2, *spatial_size)
    record = run_record(
        case={"image": image},
        modalities=["t1", "t2"],
        noise_scheduler=DDPMScheduler(100, schedule=schedule),
        schedule=schedule,
        validation_cases=["a"],
        network=torch.nn.Identity(),
    )
    (folder / RUN_RECORD).write_text(json.dumps(record))


def test_the_checkpoint_folder_is_checked_last_against_resume_and_overwrite(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"")
    with pytest.raises(BadInputError, match=r"already holds .*model.pt from an earlier run.*--overwrite true"):
        _checked(tmp_path)
    # a bad setting is named first, though the folder would be refused too
    with pytest.raises(BadInputError, match="learning_rate must be a positive number"):
        _checked(tmp_path, learning_rate=0)
    _checked(tmp_path, overwrite="true")
    with pytest.raises(BadInputError, match=r"--resume true, but there is no training_state.pt"):
        _checked(tmp_path, resume=True)
    (models / "training_state.pt").write_bytes(b"")
    _record_beside(models, "linear_beta")
    with pytest.raises(
        BadInputError,
        match="trained with schedule=linear_beta, but this run gives schedule=cosine; pass --schedule linear_beta",
    ):
        _checked(tmp_path, resume=True)
    _checked(tmp_path, resume=True, schedule="linear_beta", noise_scheduler=DDPMScheduler(100, schedule="linear_beta"))
    with pytest.raises(BadInputError, match="pass --num_train_timesteps 100"):
        _checked(
            tmp_path, resume=True, schedule="linear_beta", noise_scheduler=DDPMScheduler(50, schedule="linear_beta")
        )
    with pytest.raises(BadInputError, match=r"spatial_size=\"\[16,16,16\]\".*--spatial_size"):
        _checked(
            tmp_path,
            resume=True,
            spatial_size=[8, 8, 8],
            schedule="linear_beta",
            noise_scheduler=DDPMScheduler(100, schedule="linear_beta"),
        )


def _inference(tmp_path, **changes) -> dict:
    return {
        "output_dir": tmp_path / "samples",
        "num_samples": 2,
        "batch_size": 1,
        "device": "cpu",
        "overwrite": False,
    } | changes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_samples": 0}, "num_samples must be a positive integer; got 0"),
        ({"batch_size": "2"}, "batch_size must be a positive integer; got '2'"),
        ({"overwrite": "maybe"}, "overwrite must be true or false, got 'maybe'"),
        ({"device": "cuda:7"}, "device is 'cuda:7', but this machine has"),
    ],
)
def test_each_bad_inference_setting_is_named(tmp_path, changes, message):
    with pytest.raises(BadInputError) as error:
        InferenceSettings(**_inference(tmp_path, **changes))
    assert message in str(error.value)


def test_inference_settings_parse_the_flags_and_refuse_an_output_folder_that_cannot_be_one(tmp_path):
    settings = InferenceSettings(**_inference(tmp_path, overwrite="false", skip_invalid="true"))
    assert settings.overwrite is False and settings.skip_invalid is True
    (tmp_path / "afile").write_text("")
    for output_dir, message in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "x", "cannot be created")):
        with pytest.raises(BadInputError, match=f"output_dir .*{message}"):
            InferenceSettings(**_inference(tmp_path, output_dir=output_dir))


def _evaluation(tmp_path, **changes) -> dict:
    return {
        "output_dir": tmp_path / "eval",
        "evaluate_batch_size": 2,
        "reconstruction_fraction": 0.25,
        "num_train_timesteps": 100,
        "num_generated": 4,
        "feature_extractor": None,
        "device": "cpu",
        "overwrite": False,
    } | changes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"overwrite": "no"}, "overwrite must be true or false, got 'no'"),
        ({"reconstruction_fraction": 1.0}, "reconstruction_fraction must be a fraction of T in [0, 1)"),
        ({"evaluate_batch_size": 0}, "evaluate_batch_size must be a positive integer; got 0"),
        ({"num_generated": 2.0}, "num_generated must be a positive integer; got 2.0"),
        (
            {"feature_extractor": "/nonexistent/features.ts"},
            "feature_extractor '/nonexistent/features.ts' does not exist",
        ),
        ({"device": "cuda:7"}, "device is 'cuda:7', but this machine has"),
    ],
)
def test_each_bad_evaluation_setting_is_named(tmp_path, changes, message):
    with pytest.raises(BadInputError) as error:
        EvaluationSettings(**_evaluation(tmp_path, **changes))
    assert message in str(error.value)


def test_evaluation_settings_refuse_earlier_metrics_unless_overwrite(tmp_path):
    settings = EvaluationSettings(**_evaluation(tmp_path, overwrite="false"))
    assert settings.overwrite is False
    assert settings.outputs == [tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "metrics.md"]
    assert settings.reconstruction_timestep == 25
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.md").write_text("")
    refusal = r"1 output files of an earlier run .*\(e.g. metrics.md\); pass --overwrite true"
    with pytest.raises(BadInputError, match=refusal):
        EvaluationSettings(**_evaluation(tmp_path))
    assert EvaluationSettings(**_evaluation(tmp_path, overwrite="true")).overwrite is True


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning_rate": "-1"}, "learning_rate must be a positive number such as 2e-4; got -1"),
        # the val_fraction check moved from the split into the settings: still before any data is written
        ({"val_fraction": "0.0"}, "val_fraction must be a number in (0, 1)"),
    ],
)
def test_a_bad_setting_stops_training_before_anything_is_read_or_written(tmp_path, override, message):
    """The checks run first: the missing dataset_dir is neither searched nor filled with phantoms."""
    result = run_bundle(
        "configs/train.json",
        SMALL
        | {
            "dataset_dir": tmp_path / "D",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            **override,
        },
        "training",
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.count("ERROR: ") == 1
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / name).exists() for name in ("D", "C", "R"))
