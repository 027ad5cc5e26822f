"""Evaluation through train.json + evaluate.json: the paper's Table 1 metrics and generation quality."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import recorded_checkpoint, run_bundle
from monai.metrics import MMDMetric, MultiScaleSSIMMetric
from monai.networks.schedulers import DDPMScheduler

from bundle.data import write_ellipsoid_phantoms
from bundle.diffusion import GridDDIMScheduler
from bundle.evaluation import reconstruct_from
from bundle.sample_quality import ms_ssim_settings, normalised_mmd

CONFIGS = "['configs/train.json','configs/evaluate.json']"
# the model's settings come from its run.json: the command line names only what to measure
CLI = {"num_inference_steps": "3", "num_generated": "2", "num_workers": "0"}
VALIDATION = ("BraTS20_Training_003", "BraTS20_Training_008")


def evaluate(overrides: dict) -> subprocess.CompletedProcess:
    return run_bundle(CONFIGS, overrides)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    write_ellipsoid_phantoms(root / "D", num_cases=10, shape=(24, 24, 20))
    recorded_checkpoint(root, num_train_timesteps=50, validation_cases=VALIDATION)
    return root


def test_metrics_json_and_table(setup, tmp_path):
    result = evaluate(CLI | {"dataset_dir": setup / "D", "ckpt_path": setup / "model.pt", "output_dir": tmp_path})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_volumes"] == 2 and metrics["cases"] == list(VALIDATION)  # the recorded validation split
    runs = [k for k in metrics if k.startswith(("one-step", "reconstruction"))]
    assert runs == ["one-step t=2", "one-step t=12", "one-step t=25", "reconstruction from t=12"]
    for run in runs:
        for modality in ("t1", "t2"):
            m = metrics[run][modality]
            assert m["psnr"]["best_of_batch"] >= m["psnr"]["mean"] - 1e-6
            assert m["mae"]["best_of_batch"] <= m["mae"]["mean"] + 1e-6
            assert 0 < m["ssim"]["mean"] <= 1 and m["mae"]["mean"] > 0
    generation = metrics["generation"]
    assert generation["num_generated"] == 2 and -1 <= generation["ms_ssim_pairwise_mean"] <= 1
    assert generation["mmd_num_volumes"] == 2 and 0 <= generation["mmd"] < 1  # per voxel, [0, 1] intensities
    assert generation["fid"].startswith("n/a")
    assert generation["reference"] == "validation split, 2 volumes" and generation["comparison"].startswith("n/a")
    table = (tmp_path / "metrics.md").read_text()
    assert "| reconstruction from t=12 | t2 |" in table and "best-of-batch" in table
    again = evaluate(CLI | {"dataset_dir": setup / "D", "ckpt_path": setup / "model.pt", "output_dir": tmp_path})
    assert again.returncode == 1 and "--overwrite true" in again.stderr


def test_generated_samples_against_the_training_split(setup, tmp_path):
    result = evaluate(
        CLI
        | {
            "dataset_dir": setup / "D",
            "ckpt_path": setup / "model.pt",
            "output_dir": tmp_path,
            "generation_reference": "training",
            "num_generated": "3",
        }
    )
    assert result.returncode == 0, result.stderr[-3000:]
    generation = json.loads((tmp_path / "metrics.json").read_text())["generation"]
    comparison = generation["comparison"]
    assert generation["reference"] == "training split, 8 volumes" and comparison["num_real"] == 8
    assert comparison["set_size"] == 3 and len(comparison["measures"]) == 12
    # an untrained network's samples are noise: no neighbour correlation, unlike the phantoms
    autocorrelation = comparison["statistics"]["autocorrelation/t1"]
    assert abs(autocorrelation["generated"]) < 0.2 < autocorrelation["real"]
    assert not comparison["measures"]["autocorrelation/t1"]["within_spread"]
    table = (tmp_path / "metrics.md").read_text()
    assert "### Generated vs real (training split, 8 volumes)" in table
    assert "| autocorrelation/t1 |" in table and "| correlation/t1_t2 |" in table


def test_an_unknown_generation_reference_is_refused(setup, tmp_path):
    result = evaluate(
        CLI
        | {
            "dataset_dir": setup / "D",
            "ckpt_path": setup / "model.pt",
            "output_dir": tmp_path,
            "generation_reference": "test",
        }
    )
    assert result.returncode == 1
    assert "generation_reference must be one of ['validation', 'training']" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("num_generated, num_real", [(3, 2), (2, 4)])
def test_mmd_with_unequal_numbers_of_real_and_generated_volumes(setup, tmp_path, num_generated, num_real):
    """MONAI's MMDMetric needs as many volumes on each side: the first min(real, generated) of each are compared."""
    ckpt = recorded_checkpoint(
        tmp_path / "C",
        num_train_timesteps=50,
        validation_cases=[f"BraTS20_Training_{i:03d}" for i in range(1, num_real + 1)],
    )
    result = evaluate(
        CLI
        | {"dataset_dir": setup / "D", "ckpt_path": ckpt, "output_dir": tmp_path / "O", "num_generated": num_generated}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "O" / "metrics.json").read_text())
    assert metrics["num_volumes"] == num_real
    generation = metrics["generation"]
    assert generation["num_generated"] == num_generated and generation["mmd_num_volumes"] == 2
    assert isinstance(generation["mmd"], float)
    assert f"first {generation['mmd_num_volumes']} validation and first 2 generated" in generation["mmd_definition"]
    assert generation["mmd_definition"] in (tmp_path / "O" / "metrics.md").read_text()


class _NoiseOracle(torch.nn.Module):
    """Predicts exactly the noise ``x_t`` was made with: the DDIM chain then returns x₀ exactly, if and only if each
    step is taken at the timestep its input was noised to."""

    def __init__(self, noise: torch.Tensor) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
@pytest.mark.parametrize(
    "t_start, num_train_timesteps, num_inference_steps", [(500, 2000, 50), (12, 50, 3), (0, 50, 3)]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reconstruction_starts_at_the_timestep_the_input_was_noised_to(
    t_start, num_train_timesteps, num_inference_steps, schedule, eta
):
    """With T = 2000 and 50 steps, x₅₀₀ was denoised as if it were x₄₉₀ (the first step of the sampling grid ≤ 500).
    The reconstruction's DDIM scheduler has the training run's schedule, whichever it is, and steps without noise
    whatever the scheduler's η (the sampling one's, --eta)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 2, 6, 6, 6, generator=generator) * 1.8 - 0.9
    noise = torch.randn(x0.shape, generator=generator)
    training = DDPMScheduler(num_train_timesteps, schedule=schedule)  # the training scheduler's alphas
    noisy = training.add_noise(x0, noise, torch.full((2,), t_start))
    estimate = reconstruct_from(
        _NoiseOracle(noise),
        noisy,
        t_start=t_start,
        scheduler=GridDDIMScheduler(num_train_timesteps, schedule=schedule, eta=eta),
        num_inference_steps=num_inference_steps,
    )
    torch.testing.assert_close(estimate, x0, atol=1e-4, rtol=0)


def test_normalised_mmd_is_monais_mmd_of_equally_many_volumes_per_voxel():
    generator = torch.Generator().manual_seed(0)
    real, generated = torch.rand(5, 2, 6, 6, 6, generator=generator), torch.rand(3, 2, 6, 6, 6, generator=generator)
    value, count = normalised_mmd(real, generated)
    assert count == 3
    assert value == pytest.approx(MMDMetric()(real[:3], generated[:3]).item() / (2 * 6**3), rel=1e-6)
    assert normalised_mmd(generated, real)[0] == pytest.approx(value, abs=1e-6)  # float32 sums in another order
    # identical volumes within each set: the mean over voxels of the squared difference, (0.7 - 0.2)²
    assert normalised_mmd(torch.full((3, 2, 6, 6, 6), 0.2), torch.full((2, 2, 6, 6, 6), 0.7))[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        normalised_mmd(real[:1], generated)


@pytest.mark.parametrize(
    "recorded, given, message",
    [
        (
            {"num_train_timesteps": 100},
            {"num_train_timesteps": 50},
            (
                "trained with num_train_timesteps=100, but this run gives num_train_timesteps=50; pass "
                "--num_train_timesteps 100"
            ),
        ),
        (
            {"schedule": "sigmoid_beta"},
            {"schedule": "cosine"},
            "trained with schedule=sigmoid_beta, but this run gives schedule=cosine; pass --schedule sigmoid_beta",
        ),
        ({}, {"spatial_size": "[32,32,32]"}, 'pass --spatial_size "[16,16,16]"'),
    ],
)
def test_model_settings_that_disagree_with_the_record_are_refused_before_evaluating(
    setup, tmp_path, recorded, given, message
):
    ckpt = recorded_checkpoint(tmp_path / "C", **{"num_train_timesteps": 50, "validation_cases": VALIDATION} | recorded)
    result = evaluate(CLI | {"dataset_dir": setup / "D", "ckpt_path": ckpt, "output_dir": tmp_path / "O"} | given)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "O").exists()


def test_evaluation_takes_the_validation_cases_that_training_recorded(setup, tmp_path):
    """Another seed and val_fraction than training's would recompute another split, holding training cases:
    the cases recorded in run.json are evaluated instead, exactly those, in that order."""
    recorded = ["BraTS20_Training_007", "BraTS20_Training_001", "BraTS20_Training_004"]
    ckpt = recorded_checkpoint(tmp_path / "C", num_train_timesteps=50, validation_cases=recorded)
    result = evaluate(
        CLI
        | {"dataset_dir": setup / "D", "ckpt_path": ckpt, "output_dir": tmp_path / "O", "seed": 7, "val_fraction": 0.5}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "O" / "metrics.json").read_text())
    assert metrics["cases"] == recorded and metrics["num_volumes"] == 3
    cases = "BraTS20_Training_007, BraTS20_Training_001, BraTS20_Training_004"
    assert cases in (tmp_path / "O" / "metrics.md").read_text()
    # a recorded case that is no longer found stops evaluation before any work, naming it
    gone = recorded_checkpoint(
        tmp_path / "G", num_train_timesteps=50, validation_cases=["BraTS20_Training_002", "BraTS20_Training_042"]
    )
    result = evaluate(CLI | {"dataset_dir": setup / "D", "ckpt_path": gone, "output_dir": tmp_path / "P"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "BraTS20_Training_042" in result.stderr and "dataset_dir" in result.stderr
    assert not (tmp_path / "P").exists()


def test_missing_checkpoint_is_named(setup, tmp_path):
    result = evaluate(
        CLI | {"dataset_dir": setup / "D", "ckpt_path": tmp_path / "none.pt", "output_dir": tmp_path / "O"}
    )
    assert result.returncode == 1 and "none.pt' does not exist" in result.stderr
    assert not (tmp_path / "O").exists()


def test_a_missing_dataset_dir_is_named_and_gets_no_phantoms(setup, tmp_path):
    """A misspelt --dataset_dir must not be filled with phantoms and evaluated on."""
    result = evaluate(
        CLI | {"dataset_dir": tmp_path / "typo", "ckpt_path": setup / "model.pt", "output_dir": tmp_path / "O"}
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "typo' does not exist" in result.stderr and "Only a new training run writes" in result.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "O").exists()


def test_an_output_dir_that_cannot_hold_the_metrics_is_refused_before_any_work(setup, tmp_path):
    """It crashed after the whole evaluation, with nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    for output_dir, message in ((afile, "is a file"), (afile / "eval", "cannot be created: '" + str(afile))):
        result = evaluate(CLI | {"dataset_dir": setup / "D", "ckpt_path": setup / "model.pt", "output_dir": output_dir})
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"output_dir '{output_dir}'" in result.stderr and message in result.stderr
        assert "evaluating" not in result.stderr  # stopped before the first batch
    assert afile.read_text() == "kept"


def test_the_sampler_is_a_name_as_in_inference(setup, tmp_path):
    """--sampler replaced the sampler object by a string, and evaluation failed after the whole one-step pass; any
    entry of the samplers section generates."""
    for sampler in ("ddpm", "pndm"):
        result = evaluate(
            CLI
            | {
                "dataset_dir": setup / "D",
                "ckpt_path": setup / "model.pt",
                "output_dir": tmp_path / sampler,
                "sampler": sampler,
            }
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp_path / sampler / "metrics.json").read_text())["generation"]["num_generated"] == 2
    unknown = evaluate(
        CLI
        | {
            "dataset_dir": setup / "D",
            "ckpt_path": setup / "model.pt",
            "output_dir": tmp_path / "P",
            "sampler": "heun",
        }
    )
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "sampler must be one of ['ddim', 'ddpm', 'dpm_solver', 'pndm']; got 'heun'" in unknown.stderr
    assert "evaluating" not in unknown.stderr and not (tmp_path / "P").exists()


@pytest.mark.parametrize("size, kernel, scales", [(64, 7, 4), (32, 7, 3), (16, 3, 3)])
def test_ms_ssim_settings_fit_the_volume(size, kernel, scales):
    settings = ms_ssim_settings((size,) * 3)
    assert settings["kernel_size"] == kernel and len(settings["weights"]) == scales
    volume = torch.rand(1, 1, size, size, size)
    value = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, **settings)(volume, volume)
    assert torch.allclose(value, torch.ones_like(value), atol=1e-5)


class _Features(torch.nn.Module):
    """A stand-in feature extractor: mean, spread and gradient energy of each volume."""

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        flat = volume.flatten(1)
        gradient = (volume[..., 1:] - volume[..., :-1]).flatten(1)
        return torch.stack([flat.mean(1), flat.std(1), gradient.abs().mean(1)], dim=1)


def test_fid_with_a_user_feature_extractor(setup, tmp_path):
    torch.jit.script(_Features()).save(str(tmp_path / "features.ts"))
    result = evaluate(
        CLI
        | {
            "dataset_dir": setup / "D",
            "ckpt_path": setup / "model.pt",
            "output_dir": tmp_path / "O",
            "feature_extractor": tmp_path / "features.ts",
        }
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fid = json.loads((tmp_path / "O" / "metrics.json").read_text())["generation"]["fid"]
    assert isinstance(fid, float) and fid >= 0
    missing = evaluate(
        CLI
        | {
            "dataset_dir": setup / "D",
            "ckpt_path": setup / "model.pt",
            "output_dir": tmp_path / "P",
            "feature_extractor": tmp_path / "none.ts",
        }
    )
    assert missing.returncode == 1 and "feature_extractor" in missing.stderr
