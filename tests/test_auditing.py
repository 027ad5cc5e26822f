"""The memorization audit through the command line, as a user runs it: near-copies of training cases among the
samples are flagged with their originals, held-out volumes are not, and bad input is refused by name before work."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import recorded_checkpoint, run_bundle

from bundle.auditing import sample_volumes
from bundle.data import preprocessing, training_cases
from bundle.errors import BadInputError

CONFIGS = "['configs/train.json','configs/audit.json']"
HELD_OUT = ("BraTS20_Training_005", "BraTS20_Training_006")


def _write_sample(folder: Path, name: str, volume: torch.Tensor, affine: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for channel, modality in enumerate(("t1", "t2")):
        image = nib.Nifti1Image(volume[channel].numpy().astype(np.float32), affine)
        nib.save(image, folder / f"{name}_{modality}.nii.gz")


@pytest.fixture(scope="module")
def audited(cases, tmp_path_factory) -> tuple[Path, dict, Path]:
    """A model whose run held out two of the six cases, samples that are two noisy, shifted copies of training cases
    and the two held-out cases, and the audit's output folder after the command line ran."""
    root = tmp_path_factory.mktemp("audit")
    ckpt = recorded_checkpoint(root / "models", validation_cases=HELD_OUT)
    record = json.loads((root / "models" / "run.json").read_text())
    split = training_cases(cases, validation_cases=HELD_OUT, write_phantoms=False, spatial_size=[16, 16, 16])
    prepare = preprocessing(["t1", "t2"], [16, 16, 16])
    volume = {r["case"]: torch.as_tensor(prepare(r)["image"]).float() for r in split["train"] + split["validation"]}
    generator = torch.Generator().manual_seed(0)
    samples, affine = root / "samples", np.asarray(record["affine"])
    for k, case in enumerate(["BraTS20_Training_002", "BraTS20_Training_003"]):
        copy = torch.roll(volume[case], (1, 0, -1), dims=(1, 2, 3)) + 0.01 * torch.randn(
            2, 16, 16, 16, generator=generator
        )
        _write_sample(samples, f"sample_{k:03d}", copy.clamp(0, 1), affine)
    for k, case in enumerate(HELD_OUT, start=2):
        _write_sample(samples, f"sample_{k:03d}", volume[case], affine)
    overrides = {"ckpt_path": ckpt, "samples_dir": samples, "output_dir": root / "audit", "dataset_dir": cases}
    result = run_bundle(CONFIGS, overrides, "auditing")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads((root / "audit" / "audit.json").read_text()), Path(ckpt)


def test_near_copies_are_flagged_with_their_originals_and_held_out_volumes_are_not(audited):
    root, report, _ = audited
    by_name = {s["name"]: s for s in report["samples"]}
    assert [by_name[f"sample_{k:03d}"]["flagged"] for k in range(4)] == [True, True, False, False]
    assert by_name["sample_000"]["nearest"] == "BraTS20_Training_002"
    assert by_name["sample_001"]["nearest"] == "BraTS20_Training_003"
    assert min(by_name[f"sample_{k:03d}"]["similarity"] for k in range(2)) > 0.95  # a new patient's is about 0.7
    assert report["threshold"] == pytest.approx(max(h["similarity"] for h in report["held_out"]))
    assert report["num_training_cases"] == 4 and {h["case"] for h in report["held_out"]} == set(HELD_OUT)
    text = (root / "audit" / "audit.md").read_text()
    assert "**2 of 4 samples flagged**" in text and "audit_pairs.png" in text
    assert (root / "audit" / "audit_pairs.png").stat().st_size > 1000


def test_an_earlier_audit_is_not_overwritten_without_overwrite(audited, cases):
    root, _, ckpt = audited
    before = (root / "audit" / "audit.json").read_text()
    overrides = {"ckpt_path": ckpt, "samples_dir": root / "samples", "output_dir": root / "audit", "dataset_dir": cases}
    result = run_bundle(CONFIGS, overrides, "auditing")
    assert result.returncode != 0 and "pass --overwrite true" in result.stderr
    assert (root / "audit" / "audit.json").read_text() == before


def test_a_checkpoint_without_a_recorded_split_is_refused_before_work(audited, cases, tmp_path):
    root, _, _ = audited
    ckpt = recorded_checkpoint(tmp_path / "models")  # no validation cases
    overrides = {
        "ckpt_path": ckpt,
        "samples_dir": root / "samples",
        "output_dir": tmp_path / "audit",
        "dataset_dir": cases,
    }
    result = run_bundle(CONFIGS, overrides, "auditing")
    assert result.returncode != 0 and "records no validation cases" in result.stderr
    assert not (tmp_path / "audit" / "audit.json").exists()


def test_samples_that_cannot_be_audited_are_named(audited, tmp_path):
    root, _, _ = audited
    record = json.loads((root / "models" / "run.json").read_text())
    with pytest.raises(BadInputError, match="holds no samples"):
        sample_volumes(tmp_path, ["t1", "t2"], record)
    volume = torch.rand(2, 16, 16, 16)
    _write_sample(tmp_path / "missing", "sample_000", volume, np.asarray(record["affine"]))
    (tmp_path / "missing" / "sample_000_t2.nii.gz").unlink()
    with pytest.raises(BadInputError, match=r"Sample 'sample_000' .* lacks \['t2'\]"):
        sample_volumes(tmp_path / "missing", ["t1", "t2"], record)
    _write_sample(tmp_path / "grid", "sample_000", torch.rand(2, 20, 16, 16), np.asarray(record["affine"]))
    with pytest.raises(BadInputError, match=r"sample_000_t1.nii.gz is on another grid \(\[20, 16, 16\] voxels\)"):
        sample_volumes(tmp_path / "grid", ["t1", "t2"], record)
