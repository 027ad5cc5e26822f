"""Patch training: the patches each step draws (sizes, places, coordinates), a network that reads coordinates, the
plan of the largest patch batch, and a patch-trained model that samples whole volumes through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import redraw_zero_init_, run_bundle
from test_reproducibility import assert_killed_and_resumed_equals, train_run

from bundle.diffusion import PatchSampler, idm_loss
from bundle.errors import BadInputError
from bundle.memory_plan import plan_config
from bundle.networks import InvertibleDiffusionUNet, voxel_coordinates
from tests.conftest import ROOT

GRID = [16, 16, 12]


def _volumes(batch: int = 2) -> torch.Tensor:
    """(batch, 2, *GRID) volumes whose every voxel holds a value unique to it and to its volume."""
    return torch.arange(batch * 2 * 16 * 16 * 12, dtype=torch.float32).reshape(batch, 2, *GRID)


def test_voxel_coordinates_run_from_minus_one_to_one_along_each_axis():
    grid = voxel_coordinates([3, 5, 1])
    assert grid.shape == (3, 3, 5, 1)
    assert grid[0, :, 0, 0].tolist() == [-1.0, 0.0, 1.0]
    assert grid[1, 0, :, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert torch.equal(grid[2], torch.zeros(3, 5, 1))  # a side of one voxel is at the centre
    assert torch.equal(grid[0, 1], torch.zeros(5, 1))  # each channel varies along its axis only


def test_patch_sizes_are_fractions_of_the_grid_rounded_to_the_divisor_and_batches_keep_the_voxels():
    sampler = PatchSampler(GRID, fractions=(0.25, 0.5, 1.0), probabilities=(0.2, 0.3, 0.5), size_divisor=4)
    assert sampler.sizes == [[4, 4, 4], [8, 8, 8], [16, 16, 12]]  # 3 rounds to 4: the divisor is the smallest side
    assert sampler.repeats == [48, 6, 1]  # 3072 / 64, 3072 / 512, 1
    assert sampler.batches(2) == [(96, [4, 4, 4]), (12, [8, 8, 8]), (2, [16, 16, 12])]


def test_each_patch_is_a_box_of_its_volume_with_the_whole_volume_s_coordinates_of_that_box():
    sampler = PatchSampler(GRID, fractions=(0.5,), probabilities=(1.0,), size_divisor=2, seed=3)
    images = _volumes()
    condition = images[:, :1] * -1
    patches, given = sampler.sample(images, condition)
    assert patches.shape == (2 * 8, 2, 8, 8, 6) and given.shape == (16, 1 + 3, 8, 8, 6)
    whole = voxel_coordinates(GRID)
    for j in range(16):
        volume = j // 8
        # the first voxel's value says where the box starts
        index = int((patches[j, 0, 0, 0, 0] - images[volume, 0, 0, 0, 0]).item())
        start = [index // (16 * 12), index // 12 % 16, index % 12]
        box = (slice(None), *(slice(s, s + p) for s, p in zip(start, (8, 8, 6), strict=True)))
        assert torch.equal(patches[j], images[volume][box]), j
        assert torch.equal(given[j, :1], condition[volume][box]), j  # the condition is cut with the same box
        assert torch.equal(given[j, 1:], whole[box]), j
    assert len({int(p[0, 0, 0, 0]) for p in patches}) > 5  # the places are drawn, not fixed


def test_the_size_is_drawn_with_its_probability_the_same_on_every_rank_and_places_differ_between_ranks():
    images = _volumes(1)
    ranks = [PatchSampler(GRID, (0.5, 1.0), (0.3, 0.7), seed=0, rank=rank) for rank in (0, 1)]
    sizes, same_places = [], 0
    for _ in range(400):
        (first, _), (second, _) = (sampler.sample(images) for sampler in ranks)
        assert first.shape == second.shape
        sizes.append(first.shape[-1])
        same_places += first.shape[-1] != 12 and torch.equal(first, second)
    assert abs(sizes.count(6) / len(sizes) - 0.3) < 0.07
    assert same_places < 20
    replay = PatchSampler(GRID, (0.5, 1.0), (0.3, 0.7), seed=0, rank=0)
    replay.load_state_dict(ranks[0].state_dict())  # a resumed run draws on where it stopped
    assert ranks[0].state_dict() == {"draws": 400}
    assert torch.equal(replay.sample(images)[0], ranks[0].sample(images)[0])


@pytest.mark.parametrize(
    "fractions, probabilities, match",
    [
        ((0.5, 1.5), (0.5, 0.5), "patch_fractions"),
        ((), (), "patch_fractions"),
        ((0.5, 1.0), (0.5,), "patch_probabilities"),
        ((0.5, 1.0), (0.5, 0.6), "summing to 1"),
    ],
)
def test_bad_patch_settings_are_named(fractions, probabilities, match):
    with pytest.raises(BadInputError, match=match):
        PatchSampler(GRID, fractions, probabilities)


def test_patches_for_a_network_that_does_not_read_coordinates_are_refused_with_the_setting_to_change():
    network = InvertibleDiffusionUNet(3, 2, 2, channels=(8, 16), num_blocks=1, attention_levels=(False, True))
    with pytest.raises(BadInputError, match="set network_def#coordinates true"):
        PatchSampler(GRID, network=network)
    network = InvertibleDiffusionUNet(3, 2, 2, channels=(8, 16), attention_levels=(False, True), coordinates=True)
    assert PatchSampler(GRID, (0.25,), (1.0,), network=network).sizes == [[4, 4, 4]]  # its multiple of 4


def test_a_network_with_coordinates_adds_the_whole_volume_s_and_takes_a_patch_s_as_given():
    torch.manual_seed(0)
    arguments = {"channels": (8, 16), "num_blocks": 1, "attention_levels": (False, True), "coordinates": True}
    network = redraw_zero_init_(InvertibleDiffusionUNet(3, 2, 2, **arguments))
    assert network.stem.in_channels == 5 and network.config["coordinates"] is True
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 40])
    whole = voxel_coordinates([8, 8, 8]).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        assert torch.equal(network(x, t), network(torch.cat([x, whole], 1), t))
        shifted = network(torch.cat([x, whole.flip(2)], 1), t)
    assert not torch.allclose(shifted, network(x, t))  # the coordinates are read
    _, loss, terms = idm_loss(network, torch.cat([x, whole], 1)[:, :2], t, x, lambda_rec=0.1)
    assert torch.isfinite(loss) and "reconstruction" in terms  # λ_R rebuilds the input with its coordinates
    with pytest.raises(ValueError, match=r"\(B, 2, S, S, S\)"):
        network(torch.randn(2, 3, 8, 8, 8), t)


def test_the_plan_of_patch_training_is_that_of_its_largest_patch_batch():
    overrides = {
        "network_def#channels": [8, 16, 32],
        "attention_levels": [False, True, True],
        "spatial_size": [16, 16, 16],
        "batch_size": 2,
        "num_train_timesteps": 100,
        "memory_budget": 0,
        "ema_decay": 0,
        "patch_fractions": [0.5, 1.0],
        "patch_probabilities": [0.5, 0.5],
    }
    train = str(ROOT / "configs" / "train.json")
    patches = plan_config(train, overrides | {"patch_training": True}).plan
    halves = plan_config(
        train, overrides | {"patch_training": True, "patch_fractions": [0.5], "patch_probabilities": [1.0]}
    ).plan
    wholes = plan_config(
        train, overrides | {"patch_training": True, "patch_fractions": [1.0], "patch_probabilities": [1.0]}
    ).plan
    assert (halves.batch_size, halves.image_shape) == (16, [2, 8, 8, 8])
    assert (wholes.batch_size, wholes.image_shape) == (2, [2, 16, 16, 16])
    assert patches.peak_bytes == max(halves.peak_bytes, wholes.peak_bytes)
    assert halves.peak_bytes != wholes.peak_bytes


PATCHES = {"patch_training": "true"}


@pytest.fixture(scope="module")
def patch_run(cases, tmp_path_factory) -> Path:
    """The checkpoint folder of a model trained on patches through the command line."""
    return train_run(cases, tmp_path_factory.mktemp("patch_run"), **PATCHES)


def test_a_patch_trained_model_records_its_patches_and_samples_whole_volumes(patch_run, tmp_path):
    record = json.loads((patch_run / "run.json").read_text())
    assert record["network"]["coordinates"] is True
    assert record["patches"] == {
        "fractions": [0.25, 0.5, 1.0],
        "probabilities": [0.2, 0.3, 0.5],
        "sizes": [[8, 8, 8], [8, 8, 8], [16, 16, 16]],  # a quarter of 16 is below the network's multiple of 8
    }
    overrides = {"ckpt_path": patch_run / "model.pt", "output_dir": tmp_path, "num_samples": 1}
    result = run_bundle("configs/inference.json", overrides | {"num_inference_steps": 4})
    assert result.returncode == 0, result.stderr[-3000:]
    image = nib.load(tmp_path / "sample_000_t2.nii.gz")
    assert image.shape == (16, 16, 16)
    assert torch.isfinite(torch.as_tensor(image.get_fdata())).all()


def test_a_patch_run_killed_and_resumed_equals_the_uninterrupted_one_patches_included(patch_run, cases, tmp_path):
    assert "patch_sampler" in torch.load(patch_run / "training_state.pt", weights_only=False)
    assert_killed_and_resumed_equals(patch_run, cases, tmp_path / "killed", **PATCHES)
