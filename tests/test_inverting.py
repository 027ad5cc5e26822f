"""Image → noise through the command line: a generated sample inverts to the noise it was drawn from and comes back
close, the held-out cases are inverted by default, the noise is written on the training grid, and settings are
checked before work."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import recorded_checkpoint, run_bundle
from torch import nn

from bundle.diffusion import GridDDIMScheduler, sample_from
from bundle.inverting import inversion_scores, noise_ks_distance

CONFIGS = "['configs/train.json','configs/invert.json']"
HELD_OUT = ("BraTS20_Training_005", "BraTS20_Training_006")
MEAN, STD = 0.2, 0.3  # the Gaussian data of the exact noise predictor


def test_the_ks_distance_is_small_for_normal_noise_and_large_for_other():
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(2, 4096, generator=generator)
    assert (noise_ks_distance(normal) < 0.03).all()
    assert (noise_ks_distance(normal * 2) > 0.15).all() and (noise_ks_distance(normal + 0.5) > 0.15).all()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("invert")
    return root, recorded_checkpoint(root / "models", validation_cases=HELD_OUT)


class _GaussianEps(nn.Module):
    """The exact ε̂ for data x₀ ~ N(MEAN, STD²) per voxel (in the model's range) under ``alphas_cumprod``."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps].view(-1, *[1] * (x.ndim - 1))
        return ((1 - a).sqrt() * (x - a.sqrt() * MEAN) / (a * STD**2 + 1 - a)).to(x.dtype)


def test_a_generated_volume_inverts_to_the_noise_it_was_sampled_from_and_comes_back():
    scheduler = GridDDIMScheduler(num_train_timesteps=1000, schedule="cosine", clip_sample=False)
    network = _GaussianEps(scheduler.alphas_cumprod)
    start = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(100)
    generated = sample_from(network, scheduler, start)
    noise, scores = inversion_scores(network, scheduler, generated, 100)
    assert torch.corrcoef(torch.stack([noise.flatten(), start.flatten()]))[0, 1] > 0.99  # the noise it came from
    assert (noise - start).abs().max() < 0.2  # up to the chain's first-order error
    assert (scores["round_trip_error"] < 0.01).all(), scores
    assert (scores["noise_ks"] < 0.1).all() and ((scores["noise_std"] - 1).abs() < 0.1).all()
    real = generated.roll(1, dims=2) * 0.5 + 0.3  # not what this model generates: the noise is far from N(0, I)
    far = inversion_scores(network, scheduler, real, 100)[1]
    assert far["noise_ks"].min() > 3 * scores["noise_ks"].max(), (far, scores)


def test_the_workflow_writes_the_noise_of_each_sample_on_the_training_grid(model, cases):
    root, ckpt = model
    samples = root / "samples"
    drawn = {"ckpt_path": ckpt, "output_dir": samples, "num_samples": 2, "sampler": "ddim", "num_inference_steps": 5}
    assert run_bundle("configs/inference.json", drawn).returncode == 0
    overrides = {"ckpt_path": ckpt, "samples_dir": samples, "output_dir": root / "inverted", "dataset_dir": cases}
    result = run_bundle(CONFIGS, overrides | {"num_inference_steps": 5}, "inverting")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "inverted" / "inversion.json").read_text())
    assert [row["name"] for row in report["volumes"]] == ["sample_000", "sample_001"]
    assert report["sampler"] == "GridDDIMScheduler" and report["num_inference_steps"] == 5
    record = json.loads((root / "models" / "run.json").read_text())
    for name in ("sample_000", "sample_001"):
        for modality in ("t1", "t2"):
            image = nib.load(root / "inverted" / f"{name}_noise_{modality}.nii.gz")
            assert image.shape == (16, 16, 16) and np.allclose(image.affine, record["affine"])
            assert np.isfinite(image.get_fdata()).all()


def test_without_samples_the_held_out_cases_are_inverted_and_bad_settings_refused(model, cases):
    root, ckpt = model
    overrides = {"ckpt_path": ckpt, "output_dir": root / "held_out", "dataset_dir": cases, "num_inference_steps": 5}
    result = run_bundle(CONFIGS, overrides, "inverting")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((root / "held_out" / "inversion.json").read_text())["volumes"]
    assert [row["name"] for row in rows] == list(HELD_OUT)
    assert all(np.isfinite(list(row.values())[1:]).all() for row in rows)
    again = run_bundle(CONFIGS, overrides, "inverting")
    assert again.returncode != 0 and "pass --overwrite true" in again.stderr
    steps = run_bundle(CONFIGS, overrides | {"output_dir": root / "other", "num_inference_steps": 0}, "inverting")
    assert steps.returncode != 0 and "num_inference_steps must be an integer in [1, 20]" in steps.stderr
