"""The native grid (``spacing`` set): resampled, not resized; one box and one affine for a registered dataset, a box
around each case's foreground otherwise; samples written back on the dataset's own grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_TRAINING, run_bundle
from monai.data import MetaTensor
from monai.transforms import Orientation, ResizeWithPadOrCrop

from bundle.data import case_grid, discover_cases, preprocessing, training_cases
from bundle.data.phantoms import brats_affine
from bundle.errors import BadInputError
from bundle.outputs import to_original_grid
from bundle.run_record import RUN_RECORD, TrainedModel

GRID = ((60, 64, 40), 2.0)  # a small BraTS-like frame, 2 mm
BOX = [24, 28, 20]  # voxels of 4 mm: a non-cubic box, cropped on every axis of BraTS's frame
FRAME = case_grid(4.0)  # the built-in phantoms of a native run at 4 mm: BraTS's frame, 60×60×39 voxels


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """A dataset_dir holding 4 built-in phantoms, written as a native training run at 4 mm writes them (on
    :data:`FRAME`)."""
    root = tmp_path_factory.mktemp("data")
    training_cases(root, num_phantoms=4, spatial_size=BOX, spacing=4.0)
    return root


def test_registered_cases_share_one_box_and_one_affine(phantoms):
    images = [preprocessing(["t1", "t2"], BOX, spacing=4.0)(r)["image"] for r in discover_cases(phantoms)]
    assert all(image.shape == (2, *BOX) for image in images)
    for image in images[1:]:
        np.testing.assert_array_equal(image.affine, images[0].affine)
    affine = images[0].affine.numpy()
    np.testing.assert_allclose(np.abs(affine[:3, :3]), 4.0 * np.eye(3))  # RAS, 4 mm, no resize
    # the box is centred on the frame: its centre maps to the frame's centre (the phantoms' origin is their centre)
    frame_centre = FRAME[1] @ np.array([*((np.array(FRAME[0]) - 1) / 2), 1.0])
    box_centre = affine @ np.array([*((np.array(BOX) - 1) / 2), 1.0])
    np.testing.assert_allclose(box_centre[:3], frame_centre[:3], atol=4.0)


def test_a_datalist_case_gets_a_box_around_its_own_foreground(phantoms, tmp_path):
    case = discover_cases(phantoms)[0]
    for modality in ("t1", "t2"):  # the same head as it is, and 20 mm away (5 voxels along the stored x axis)
        image = nib.load(case[modality])
        nib.save(image, tmp_path / f"head_{modality}.nii.gz")
        moved = np.pad(image.get_fdata(), ((5, 10), (0, 0), (0, 0))).astype(np.float32)
        nib.save(nib.Nifti1Image(moved, image.affine), tmp_path / f"moved_{modality}.nii.gz")
    items = [{"t1": f"{name}_t1.nii.gz", "t2": f"{name}_t2.nii.gz"} for name in ("head", "moved")]
    (tmp_path / "list.json").write_text(json.dumps({"training": items}))
    records = discover_cases(tmp_path)
    assert all("frame" not in record for record in records)  # a datalist is not taken as registered
    transform = preprocessing(["t1", "t2"], [12, 12, 10], spacing=4.0)
    head, moved = (transform(record)["image"] for record in records)
    assert moved.shape == head.shape == (2, 12, 12, 10)
    # the box followed the head: 20 mm towards −x in RAS (the stored x axis points to −x), the same image inside
    np.testing.assert_allclose((moved.affine - head.affine)[:3, 3].numpy(), [-20.0, 0.0, 0.0], atol=1e-4)
    torch.testing.assert_close(moved.as_tensor(), head.as_tensor())


def test_bad_spacing_is_refused_by_name():
    with pytest.raises(BadInputError, match=r"spacing must be null .* got -1"):
        preprocessing(["t1"], BOX, spacing=-1)


def test_a_sample_goes_back_to_the_dataset_grid_voxel_for_voxel():
    shape, spacing = GRID
    original = brats_affine(shape, spacing)
    frame = MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(original))
    on_box = ResizeWithPadOrCrop(BOX)(Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(frame))
    sample = torch.rand(2, *BOX)
    record = {
        "affine": on_box.affine.tolist(),
        "original_grid": {"affine": original.tolist(), "spatial_size": list(shape)},
    }
    written, affine = to_original_grid(sample, record)
    np.testing.assert_allclose(affine, original)
    assert written.shape == (2, *shape)
    # the training box (cropped at the frame's centre, at the frame's own spacing) goes back where it came from,
    # flipped back to the frame's LPS storage, and the rest of the frame is zero
    x, y, z = (slice((n - b) // 2, (n - b) // 2 + b) for n, b in zip(shape, BOX, strict=True))
    torch.testing.assert_close(written[:, x, y, z].flip(1, 2), sample, atol=1e-5, rtol=0)
    outside = torch.ones(shape, dtype=torch.bool)
    outside[x, y, z] = False
    assert written[:, outside].abs().max() < 1e-6


def test_native_training_records_its_grid_and_inference_writes_on_the_dataset_grid(phantoms, tmp_path):
    train = run_bundle(
        "configs/train.json",
        SMALL_TRAINING
        | {
            "dataset_dir": phantoms,
            "spatial_size": str(BOX).replace(" ", ""),
            "spacing": "4.0",
            "val_fraction": "0.25",
            "ckpt_dir": tmp_path / "models",
            "output_dir": tmp_path / "runs",
            "train#trainer#max_epochs": "1",
        },
    )
    assert train.returncode == 0, train.stderr[-3000:]
    record = json.loads((tmp_path / "models" / RUN_RECORD).read_text())
    assert record["spatial_size"] == BOX and record["spacing"] == [4.0, 4.0, 4.0]
    assert record["original_grid"]["spatial_size"] == list(FRAME[0])
    np.testing.assert_allclose(record["original_grid"]["affine"], FRAME[1])
    np.testing.assert_allclose(np.abs(np.asarray(record["affine"])[:3, :3]), 4.0 * np.eye(3))

    refusal = "trained with spacing=4.0, but this run gives spacing=2.0; pass --spacing 4.0"
    with pytest.raises(BadInputError, match=refusal):
        TrainedModel(tmp_path / "models" / "model.pt").check(spacing=2.0)

    infer = run_bundle(
        "configs/inference.json",
        {
            "ckpt_path": tmp_path / "models" / "model.pt",
            "output_dir": tmp_path / "samples",
            "num_samples": "1",
            "sampler": "ddim",
            "num_inference_steps": "2",
        },
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    written = nib.load(tmp_path / "samples" / "sample_000_t2.nii.gz")
    assert written.shape == FRAME[0]  # overlays any case of the dataset voxel for voxel
    np.testing.assert_allclose(written.affine, FRAME[1])
    data = written.get_fdata()
    assert data[0].max() == 0 and data[-1].max() == 0  # outside the 96 mm-wide training box (the frame is 240 mm)
    assert data.std() > 0


@pytest.mark.parametrize(
    "recorded, asked, message",
    [
        (None, 4.0, "trained with spacing=null, but this run gives spacing=4.0; pass --spacing null,"),
        (
            [4.0, 4.0, 8.0],
            None,
            ('trained with spacing="[4.0,4.0,8.0]", but this run gives spacing=null; pass --spacing "[4.0,4.0,8.0]",'),
        ),
    ],
)
def test_another_spacing_than_the_training_runs_is_refused_with_the_value_to_pass(tmp_path, recorded, asked, message):
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / RUN_RECORD).write_text(json.dumps({"spatial_size": BOX, "modalities": ["t1"], "spacing": recorded}))
    with pytest.raises(BadInputError) as error:
        TrainedModel(tmp_path / "model.pt").check(spacing=asked)
    assert message in str(error.value)
    assert TrainedModel(tmp_path / "model.pt").check(spacing=recorded, spatial_size=BOX, modalities=["t1"])
