"""What the MONAI Label app asks of the bundle (bundle.serving): the case files a request's image names, and its
sampling options, each bad one refused by name. The server itself: tests/test_monai_label.py."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import recorded_checkpoint

from bundle.errors import BadInputError
from bundle.run_record import TrainedModel
from bundle.serving import case_files, request_options


@pytest.fixture(scope="module")
def translator(tmp_path_factory) -> TrainedModel:
    """A recorded T1 + FLAIR → T2, T1ce model (T = 20)."""
    folder = tmp_path_factory.mktemp("translator")
    return TrainedModel(recorded_checkpoint(folder, ("t2", "t1ce"), ("t1", "flair")))


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        nib.save(nib.Nifti1Image(np.random.rand(6, 6, 6).astype(np.float32), np.eye(4)), folder / name)


def test_the_given_files_are_found_beside_any_file_of_the_case(translator, tmp_path):
    _touch(tmp_path, "p01_t1.nii.gz", "p01_flair.nii.gz", "p01_t2.nii.gz", "sub-2-T1.nii", "sub-2-flair.nii")
    expected = {"t1": str(tmp_path / "p01_t1.nii.gz"), "flair": str(tmp_path / "p01_flair.nii.gz")}
    for name in ("p01_t1.nii.gz", "p01_flair.nii.gz", "p01_t2.nii.gz"):
        assert case_files(tmp_path / name, translator) == expected
    assert case_files(tmp_path / "sub-2-flair.nii", translator) == {
        "t1": str(tmp_path / "sub-2-T1.nii"),
        "flair": str(tmp_path / "sub-2-flair.nii"),
    }


def test_a_case_without_a_given_modality_is_refused_naming_the_file(translator, tmp_path):
    _touch(tmp_path, "p02_t1.nii.gz", "p02_t2.nii.gz")
    with pytest.raises(BadInputError, match=r"p02_t2.nii.gz has no flair: p02_flair.nii.gz beside it"):
        case_files(tmp_path / "p02_t2.nii.gz", translator)


def test_a_name_without_a_modality_or_no_image_is_refused(translator, tmp_path):
    _touch(tmp_path, "scan.nii.gz")
    with pytest.raises(BadInputError, match=r"scan.nii.gz: .*<case>_<modality>.nii.gz .*patient01_t1.nii.gz"):
        case_files(tmp_path / "scan.nii.gz", translator)
    with pytest.raises(BadInputError, match="names no image of the studies"):
        case_files("", translator)


def test_a_generation_model_is_not_served(tmp_path):
    generator = TrainedModel(recorded_checkpoint(tmp_path))
    with pytest.raises(BadInputError, match="generation model"):
        case_files(tmp_path / "x_t1.nii.gz", generator)


def test_request_options_become_inference_settings(translator):
    assert request_options({}, translator) == ({}, 0)
    request = {"sampler": "ddim", "num_inference_steps": "20", "eta": "0.5", "seed": 7, "modality": "t1ce"}
    assert request_options(request, translator) == (
        {"sampler": "ddim", "num_inference_steps": 20, "eta": 0.5, "seed": 7},
        1,
    )
    # a viewer sends an option's default as the app declared it: a list stands for its first entry
    assert request_options({"sampler": ["dpm_solver", "ddim"], "modality": ["t2", "t1ce"]}, translator) == (
        {"sampler": "dpm_solver"},
        0,
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("sampler", "euler", r"sampler='euler': this model samples with one of \['ddim', 'ddpm', 'dpm_solver'"),
        ("num_inference_steps", 0, r"num_inference_steps=0: give a whole number in \[1, 20\]"),
        ("num_inference_steps", "2.5", r"num_inference_steps='2.5'"),
        ("seed", "x", r"seed='x': give a whole number"),
        ("eta", "-1", r"eta='-1': give a number ≥ 0"),
        ("modality", "flair", r"modality='flair': the model generates \['t2', 't1ce'\]"),
    ],
)
def test_bad_request_options_are_refused_by_name(translator, option, value, message):
    with pytest.raises(BadInputError, match=message):
        request_options({option: value}, translator)
