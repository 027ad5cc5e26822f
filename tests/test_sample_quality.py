"""Generation measures (bundle.sample_quality) and the training-time generation monitor."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from bundle.data.phantoms import make_ellipsoid_phantom
from bundle.errors import BadInputError
from bundle.handlers import GenerationMonitor
from bundle.networks import InvertibleDiffusionUNet
from bundle.sample_quality import compare_to_real, distance_ratio, quality_summary, volume_statistics

MODALITIES = ["t1", "t2"]


@pytest.fixture(scope="module")
def phantoms() -> torch.Tensor:
    """(24, 2, 16, 16, 16) phantoms in [0, 1], as the bundle's preprocessing would give them."""
    volumes = []
    for seed in range(24):
        case = make_ellipsoid_phantom((32, 32, 24), seed=seed)
        volume = torch.tensor(np.stack([case["t1"], case["t2"]]), dtype=torch.float32)[None]
        volume = torch.nn.functional.interpolate(volume, size=(16, 16, 16), mode="trilinear")[0]
        volumes.append(volume / volume.amax(dim=(1, 2, 3), keepdim=True))
    return torch.stack(volumes)


def test_held_out_real_volumes_are_within_the_spread_on_every_measure(phantoms):
    result = compare_to_real(phantoms[16:], phantoms[:16], MODALITIES)
    assert result["set_size"] == 8 and result["num_real"] == 16
    assert len(result["measures"]) == 12 and result["within_spread"] == 1.0
    ratios = [max(m["generated_vs_real"] / m["real_vs_real_max"], 0.01) for m in result["measures"].values()]
    ratio = math.exp(sum(map(math.log, ratios)) / 12)
    assert result["distance_ratio"] == pytest.approx(ratio) and result["distance_ratio"] <= 1
    assert quality_summary(result) == f"12/12 measures within the real-vs-real spread, distance ratio {ratio:.2f}"


def test_voxel_noise_is_outside_the_spread_on_every_measure(phantoms):
    noise = torch.rand(8, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    result = compare_to_real(noise, phantoms[:16], MODALITIES)
    assert result["within_spread"] == 0.0 and result["distance_ratio"] > 1
    assert abs(result["statistics"]["autocorrelation/t1"]["generated"]) < 0.05  # noise: no spatial correlation
    assert result["statistics"]["autocorrelation/t1"]["real"] > 0.8


def test_each_measure_catches_its_own_defect(phantoms):
    real, held_out = phantoms[:16], phantoms[16:]
    outside = lambda generated: {
        n for n, m in compare_to_real(generated, real, MODALITIES)["measures"].items() if not m["within_spread"]
    }
    # copies of one volume: no diversity (pairwise MS-SSIM 1)
    assert "diversity" in outside(held_out[:1].expand(8, -1, -1, -1, -1).clone())
    # T2 replaced by the T1's contrast: the T1/T2 relation is lost, each modality's own statistics are not
    swapped = held_out.clone()
    swapped[:, 1] = held_out[:, 0] * held_out[:, 1].mean() / held_out[:, 0].mean()
    assert {"correlation/t1_t2", "joint_histogram/t1_t2"} <= outside(swapped)
    # a blur: sharpness (power spectrum) and neighbour correlation change
    blurred = torch.nn.functional.avg_pool3d(held_out, 3, stride=1, padding=1, count_include_pad=False)
    assert {"power_spectrum/t1", "autocorrelation/t1"} <= outside(blurred)
    # intensities 0.15 brighter everywhere: the histogram, the head's size and MMD move
    assert {"histogram/t1", "foreground/t1", "mmd"} <= outside((held_out + 0.15).clamp(0, 1))


def test_volume_statistics_values():
    ramp = torch.linspace(0, 1, 16).expand(16, 16, 16)[None, None].clone()  # smooth along one axis, constant along two
    statistics = volume_statistics(torch.cat([ramp, ramp], 1))
    assert statistics["autocorrelation"][0, 0].item() == pytest.approx(1.0, abs=1e-3)
    assert statistics["correlation"][0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert statistics["foreground"][0, 0].item() == pytest.approx((ramp > 0.1).float().mean().item())
    assert statistics["spectrum"].shape == (1, 2, 8)
    noise = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    spectrum = volume_statistics(noise)["spectrum"].mean(0)[0]  # white noise: flat
    assert (spectrum.max() - spectrum.min()).item() < 0.3
    assert abs(volume_statistics(noise)["autocorrelation"].mean().item()) < 0.03


def test_histogram_distance_is_the_intensity_shift(phantoms):
    shifted = phantoms[:8] * 0.5 + 0.25  # in [0.25, 0.75]: no clamping
    base = phantoms[:8] * 0.5
    result = compare_to_real(shifted, torch.cat([base, base]), MODALITIES, num_splits=2)
    assert result["measures"]["histogram/t1"]["generated_vs_real"] == pytest.approx(0.25, abs=2e-3)


def test_bad_inputs_are_named(phantoms):
    with pytest.raises(ValueError, match="at least 2 generated and 4 real volumes, got 8 and 3"):
        compare_to_real(phantoms[:8], phantoms[:3], MODALITIES)
    with pytest.raises(ValueError, match="C = 2 modalities"):
        compare_to_real(phantoms[:8, :1], phantoms[:8, :1], MODALITIES)
    diverged = phantoms[:8].clone()
    diverged[3, 0, 2, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="generated volumes hold non-finite values"):
        compare_to_real(diverged, phantoms[8:], MODALITIES)


class _Writer:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def add_image(self, tag, image, global_step):
        self.images[(tag, global_step)] = image

    def flush(self):
        pass


def _monitor(writer, interval=2):
    scheduler = DDPMScheduler(num_train_timesteps=20)
    return GenerationMonitor(
        summary_writer=writer,
        scheduler=scheduler,
        num_inference_steps=3,
        interval=interval,
        num_samples=3,
        modalities=MODALITIES,
        batch_size=2,
    )


def _validator(phantoms, epoch, count):
    torch.manual_seed(0)
    network = InvertibleDiffusionUNet(
        spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8), attention_levels=(False, False), num_blocks=1
    )
    loader = [{"image": phantoms[i : i + 2]} for i in range(0, count, 2)]
    return SimpleNamespace(state=SimpleNamespace(epoch=epoch), data_loader=loader, network=network)


def test_monitor_writes_every_measure_at_the_checked_epochs(phantoms):
    writer = _Writer()
    monitor = _monitor(writer)
    monitor(_validator(phantoms, 1, 8))
    assert writer.scalars == {} and monitor.latest is None  # epoch 1 is not a multiple of 2
    monitor(_validator(phantoms, 2, 8))
    first = monitor.latest
    assert first["num_generated"] == 3 and first["num_real"] == 8
    for name, measure in first["measures"].items():
        assert writer.scalars[(f"generation/{name}", 2)] == measure["generated_vs_real"]
        assert writer.scalars[(f"generation/{name}_real_spread", 2)] == measure["real_vs_real_max"]
    assert writer.scalars[("generation/within_spread", 2)] == first["within_spread"]
    assert writer.scalars[("generation/distance_ratio", 2)] == first["distance_ratio"]
    assert writer.images[("generation_samples", 2)].shape == (1, 2 * 16, 3 * 16)  # rows: modalities; columns: samples
    monitor(_validator(phantoms, 4, 8))  # the same network and the same noise: the same samples
    assert monitor.latest["measures"] == first["measures"]


def test_monitor_without_enough_validation_volumes_says_so_once(phantoms, caplog):
    monitor = _monitor(_Writer(), interval=1)
    with caplog.at_level(logging.WARNING):
        monitor(_validator(phantoms, 1, 2))
        monitor(_validator(phantoms, 2, 2))
    assert monitor.latest is None
    assert sum("fewer than the 4" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("interval", [0, -1, 1.5, True])
def test_monitor_refuses_a_bad_interval(interval):
    with pytest.raises(BadInputError, match="--generation_interval must be an integer ≥ 1"):
        _monitor(_Writer(), interval=interval)


def test_the_distance_ratio_is_a_geometric_mean_with_a_floor_per_measure():
    """Twice the spread on one measure and half on another give 1; a measure at or below zero distance (MMD can be)
    counts as a hundredth of the spread instead of pulling the mean to zero; no measures is an error."""
    measures = {
        "a": {"generated_vs_real": 2.0, "real_vs_real_max": 1.0},
        "b": {"generated_vs_real": 1.0, "real_vs_real_max": 2.0},
    }
    assert distance_ratio(measures) == pytest.approx(1.0)
    measures["c"] = {"generated_vs_real": -0.5, "real_vs_real_max": 0.1}
    assert distance_ratio(measures) == pytest.approx(0.01 ** (1 / 3))
    with pytest.raises(ValueError, match="at least one measure"):
        distance_ratio({})
