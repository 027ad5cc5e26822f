"""Dataset discovery (BraTS, Decathlon, datalist; NIfTI and ITK formats), phantoms, preflight, split."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_TRAINING, recorded_checkpoint, run_bundle, run_python
from monai.networks.schedulers import DDPMScheduler

from bundle.data import (
    DatasetNotFoundError,
    PreflightError,
    case_anatomy,
    discover_cases,
    load_template,
    make_case,
    make_ellipsoid_phantom,
    preflight,
    preprocessing,
    split_cases,
    training_cases,
    write_anatomy_cases,
    write_ellipsoid_phantoms,
)
from bundle.data.phantoms import brats_affine
from bundle.errors import BadInputError
from bundle.run_record import RUN_RECORD, recorded_validation_cases, run_record

SHAPE = (24, 24, 20)


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    write_ellipsoid_phantoms(root / "MICCAI_BraTS2020_TrainingData", num_cases=3, shape=SHAPE)
    return root


def test_brats_layout_is_found_at_any_depth(brats_dir):
    records = discover_cases(brats_dir, ["t1", "t2"])
    assert [r["case"] for r in records] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert records[0]["t1"].endswith(
        "MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz"
    )
    assert records[0]["channels"] == {"t1": None, "t2": None}


def test_preprocessing_gives_channels_in_unit_range_and_ras(brats_dir):
    record = discover_cases(brats_dir, ["t1", "t2"])[0]
    image = preprocessing(["t1", "t2"], (16, 16, 16))(record)["image"]
    assert image.shape == (2, 16, 16, 16) and image.dtype == torch.float32
    assert image.min() == 0 and image.max() == 1
    assert np.all(np.diag(np.asarray(image.affine))[:3] > 0)  # RAS after reorientation of an LPS-stored file
    single = preprocessing(["t2"], (16, 16, 16))(discover_cases(brats_dir, ["t2"])[0])["image"]
    assert single.shape == (1, 16, 16, 16)


def test_decathlon_task01_takes_t1w_and_t2w_channels(tmp_path):
    phantom = make_ellipsoid_phantom(SHAPE, seed=5)
    volume = np.stack([phantom["flair"], phantom["t1"], phantom["t1ce"], phantom["t2"]], axis=-1)
    (tmp_path / "imagesTr").mkdir()
    nib.save(nib.Nifti1Image(volume, brats_affine(SHAPE, 1.5)), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "name": "BRATS",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
            }
        )
    )
    records = discover_cases(tmp_path, ["t1", "t2"])
    assert records[0]["channels"] == {"t1": 1, "t2": 3}
    image = preprocessing(["t1", "t2"], (12, 12, 12))(records[0])["image"]
    assert image.shape == (2, 12, 12, 12)
    # channel 0 is the T1 volume and channel 1 the T2 volume, as if read from separate files
    for channel, modality in enumerate(["t1", "t2"]):
        path = tmp_path / f"separate_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(phantom[modality], brats_affine(SHAPE, 1.5)), path)
        record = {"case": "x", modality: str(path), "channels": {modality: None}}
        alone = preprocessing([modality], (12, 12, 12))(record)
        assert torch.allclose(image[channel], alone["image"][0], atol=1e-5)
    with pytest.raises(BadInputError, match="modality 'pd' is not among its channels"):
        discover_cases(tmp_path, ["pd"])


def test_datalist_json_and_itk_formats(tmp_path):
    phantom = make_ellipsoid_phantom(SHAPE, seed=2)
    paths = {}
    for modality, suffix in (("t1", ".nrrd"), ("t2", ".mha")):
        image = itk.image_from_array(np.ascontiguousarray(phantom[modality].transpose(2, 1, 0)))
        image.SetSpacing([1.5, 1.5, 1.5])
        paths[modality] = str(tmp_path / f"subject_{modality}{suffix}")
        itk.imwrite(image, paths[modality])
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"t1": paths["t1"], "t2": paths["t2"]}]}))
    records = discover_cases(tmp_path, ["t1", "t2"])
    assert records[0]["t1"] == paths["t1"] and records[0]["t2"] == paths["t2"]
    assert preflight(records, ["t1", "t2"]) == records
    assert preprocessing(["t1", "t2"], (8, 8, 8))(records[0])["image"].shape == (2, 8, 8, 8)


def test_json_files_that_are_not_valid_json_are_skipped_with_a_warning(tmp_path, caplog):
    """A truncated datalist or a macOS AppleDouble ``._*.json`` (binary, not UTF-8) does not stop discovery of the
    dataset beside it; the invalid one is named in a warning, AppleDouble files are not even read."""
    write_ellipsoid_phantoms(tmp_path / "BraTS", num_cases=2, shape=SHAPE)
    (tmp_path / "._dataset.json").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X\xff\xfe")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "datalist.json").write_text('{"training": [{"t1": "a_t1.nii.gz"')  # truncated
    (tmp_path / "notes" / "latin1.json").write_bytes('{"name": "Müller"}'.encode("latin-1"))
    records = discover_cases(tmp_path, ["t1", "t2"])
    assert [r["case"] for r in records] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert f"Skipping {tmp_path / 'notes' / 'datalist.json'}: not a valid UTF-8 JSON file" in caplog.text
    assert str(tmp_path / "notes" / "latin1.json") in caplog.text and "._dataset.json" not in caplog.text
    # with no dataset at all, the error names the skipped files: one of them may be the intended datalist
    only = tmp_path / "notes"
    with pytest.raises(DatasetNotFoundError, match="No dataset found") as info:
        discover_cases(only, ["t1", "t2"])
    assert "not valid UTF-8 JSON" in str(info.value) and str(only / "datalist.json") in str(info.value)


def test_datalist_case_ids_follow_the_files_not_the_order(tmp_path):
    """Ids name the same files whatever the order of the items (a run's validation split is recorded by id)."""
    items = [
        {"t1": "site_a/sub-01_t1.nii.gz", "t2": "site_a/sub-01_t2.nii.gz"},
        {"t1": "site_b/sub-01_T1.nii.gz", "t2": "site_b/sub-01_T2.nii.gz"},
        {"image": ["sub-02-t1.nii.gz", "sub-02-t2.nii.gz"]},
        {"t1": "sub-03/t1.nii.gz", "t2": "sub-03/t2.nii.gz"},
    ]
    for order in (items, items[::-1]):
        (tmp_path / "datalist.json").write_text(json.dumps({"training": order}))
        cases = {
            r["case"]: Path(r["t1"]).relative_to(tmp_path).as_posix() for r in discover_cases(tmp_path, ["t1", "t2"])
        }
        assert cases == {
            "site_a/sub-01": "site_a/sub-01_t1.nii.gz",
            "site_b/sub-01": "site_b/sub-01_T1.nii.gz",
            "sub-02": "sub-02-t1.nii.gz",
            "sub-03": "sub-03/t1.nii.gz",
        }
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items + items[:1]}))
    with pytest.raises(
        BadInputError, match=r"datalist.json: .*sub-01_t1.nii.gz is given by more than one training item"
    ):
        discover_cases(tmp_path, ["t1", "t2"])
    clash = {"t1": "site_a/sub-01-t1.nii.gz", "t2": "site_a/sub-01-t2.nii.gz"}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [*items, clash]}))
    with pytest.raises(BadInputError, match=r"give the same case id 'site_a/sub-01'.*rename one of them"):
        discover_cases(tmp_path, ["t1", "t2"])


def test_a_datalists_validation_list_is_the_validation_split(tmp_path, caplog):
    """The items of a datalist's "validation" list are the validation split whatever seed and val_fraction say
    (they were ignored, and the training items re-split); a recorded split still wins."""
    caplog.set_level("INFO", logger="bundle.data")
    write_ellipsoid_phantoms(tmp_path / "images", num_cases=5, shape=SHAPE)
    item = lambda i: {m: f"images/BraTS20_Training_{i:03d}/BraTS20_Training_{i:03d}_{m}.nii.gz" for m in ("t1", "t2")}
    datalist = {"training": [item(i) for i in (1, 2, 3)], "validation": [item(5), item(4)]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    records = discover_cases(tmp_path, ["t1", "t2"])
    assert [(r["case"], r.get("split")) for r in records] == [
        ("BraTS20_Training_001", None),
        ("BraTS20_Training_002", None),
        ("BraTS20_Training_003", None),
        ("BraTS20_Training_004", "validation"),
        ("BraTS20_Training_005", "validation"),
    ]
    for seed, val_fraction in ((0, 0.2), (5, 0.6)):
        cases = training_cases(tmp_path, seed=seed, val_fraction=val_fraction)
        assert [r["case"] for r in cases["validation"]] == ["BraTS20_Training_004", "BraTS20_Training_005"]
        assert sorted(r["case"] for r in cases["train"]) == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert "Validation split: the 2 cases of the datalist's 'validation' list" in caplog.text
    caplog.clear()
    recorded = training_cases(tmp_path, validation_cases=["BraTS20_Training_001"])
    assert [r["case"] for r in recorded["validation"]] == ["BraTS20_Training_001"]
    assert len(recorded["train"]) == 4 and "that the training run recorded" in caplog.text
    # a case in both lists, a validation entry that is not a list, and no training item are named
    (tmp_path / "datalist.json").write_text(json.dumps(datalist | {"validation": [item(5), item(1)]}))
    with pytest.raises(
        BadInputError, match=r"BraTS20_Training_001_t1.nii.gz is given by more than one training/validation"
    ):
        discover_cases(tmp_path, ["t1", "t2"])
    (tmp_path / "datalist.json").write_text(json.dumps(datalist | {"validation": item(5)}))
    with pytest.raises(BadInputError, match=r"datalist.json: 'validation' must be a list"):
        discover_cases(tmp_path, ["t1", "t2"])
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": [item(4), item(5)]}))
    with pytest.raises(BadInputError, match="none under 'training'"):
        training_cases(tmp_path)


def test_phantom_contrasts_follow_t1_and_t2_physics():
    phantom = make_ellipsoid_phantom((48, 48, 40), seed=1)
    labels_seen = set(np.unique(phantom["seg"]).tolist())
    assert labels_seen == {0, 1, 2}  # tumour core and oedema present
    t1, t2 = phantom["t1"], phantom["t2"]
    # rebuild tissue masks from the contrast table: CSF is dark on T1 and bright on T2
    csf = (t2 > 0.9) & (t1 < 0.25)
    white = (t1 > 0.72) & (t2 < 0.48)
    assert csf.sum() > 50 and white.sum() > 50
    assert t1[csf].mean() < t1[white].mean() and t2[csf].mean() > t2[white].mean()
    different = make_ellipsoid_phantom((48, 48, 40), seed=2)["seg"]
    assert not np.array_equal(different, phantom["seg"])  # shape and position vary with the seed


def _write(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_preflight_reports_every_bad_case_together(tmp_path):
    write_ellipsoid_phantoms(tmp_path, num_cases=7, shape=SHAPE)
    case = lambda i: tmp_path / f"BraTS20_Training_{i:03d}"
    (case(1) / "BraTS20_Training_001_t2.nii.gz").unlink()  # missing
    (case(2) / "BraTS20_Training_002_t1.nii.gz").write_bytes(b"not a nifti file")  # unreadable
    flat = np.ones((24, 24), np.float32) + np.eye(24, dtype=np.float32)  # 2D
    _write(case(3) / "BraTS20_Training_003_t1.nii.gz", flat)
    bad = make_ellipsoid_phantom(SHAPE)["t1"]
    bad[3, 3, 3] = np.nan
    _write(case(4) / "BraTS20_Training_004_t1.nii.gz", bad)  # non-finite
    _write(case(5) / "BraTS20_Training_005_t2.nii.gz", np.full(SHAPE, 3.0, np.float32))  # constant
    _write(case(6) / "BraTS20_Training_006_t2.nii.gz", make_ellipsoid_phantom((20, 24, 20))["t2"])  # shape mismatch
    records = discover_cases(tmp_path, ["t1", "t2"])
    with pytest.raises(PreflightError) as info:
        preflight(records, ["t1", "t2"])
    message = str(info.value)
    assert "6 of 7 cases failed" in message
    for text in [
        "BraTS20_Training_001_t2.nii.gz: file missing",
        "BraTS20_Training_002_t1.nii.gz: unreadable",
        "BraTS20_Training_003_t1.nii.gz: has shape (24, 24), expected a 3D volume",
        "BraTS20_Training_004_t1.nii.gz: contains 1 non-finite values",
        "BraTS20_Training_005_t2.nii.gz: is constant",
        "case BraTS20_Training_006: modalities differ in shape",
    ]:
        assert text in message, text
    assert "skip_invalid: true" in message
    valid = preflight(records, ["t1", "t2"], skip_invalid=True)
    assert [r["case"] for r in valid] == ["BraTS20_Training_007"]


def test_split_is_deterministic_and_disjoint():
    records = [{"case": f"c{i}"} for i in range(10)]
    train, val = split_cases(records, val_fraction=0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert {r["case"] for r in train}.isdisjoint(r["case"] for r in val)
    assert split_cases(list(reversed(records)), val_fraction=0.2, seed=3) == (train, val)
    assert split_cases(records, val_fraction=0.2, seed=4) != (train, val)


def test_split_takes_the_recorded_validation_cases_whatever_the_seed():
    """The validation cases a training run recorded are the validation split, whatever ``seed`` and
    ``val_fraction`` say (evaluating with others would evaluate on training cases); with the run's own seed and
    cases the split is exactly the seeded one (a resumed run trains on the same order)."""
    records = [{"case": f"c{i}"} for i in range(10)]
    train, val = split_cases(records, val_fraction=0.2, seed=3)
    recorded = [r["case"] for r in val]
    assert split_cases(records, val_fraction=0.2, seed=3, validation_cases=recorded) == (train, val)
    other_train, other_val = split_cases(
        [*records, {"case": "c10"}], val_fraction=0.5, seed=4, validation_cases=recorded
    )
    assert [r["case"] for r in other_val] == recorded
    assert sorted(r["case"] for r in other_train) == sorted({f"c{i}" for i in range(11)} - set(recorded))
    with pytest.raises(BadInputError, match="not among the 9 usable cases") as info:
        split_cases([r for r in records if r["case"] != "c3"], val_fraction=0.2, seed=3, validation_cases=recorded)
    assert "c3" in str(info.value) and "c8" not in str(info.value)  # names the missing case only


def test_training_cases_keep_the_recorded_validation_cases(brats_dir):
    recorded = ["BraTS20_Training_002"]
    cases = training_cases(brats_dir, seed=11, validation_cases=recorded)
    assert [r["case"] for r in cases["validation"]] == recorded
    assert sorted(r["case"] for r in cases["train"]) == ["BraTS20_Training_001", "BraTS20_Training_003"]
    with pytest.raises(BadInputError, match="BraTS20_Training_009") as info:
        training_cases(brats_dir, validation_cases=["BraTS20_Training_009", "BraTS20_Training_001"])
    assert "dataset_dir" in str(info.value) and "BraTS20_Training_001" not in str(info.value)


def test_the_run_record_records_the_validation_cases(tmp_path, caplog):
    image = torch.zeros(2, 4, 4, 4)
    record = run_record(
        case={"image": image},
        modalities=["t1", "t2"],
        noise_scheduler=DDPMScheduler(100, schedule="cosine"),
        schedule="cosine",
        validation_cases=["b", "a"],
        network=torch.nn.Identity(),
    )
    assert record["validation_cases"] == ["b", "a"]
    assert RUN_RECORD == "run.json"
    (tmp_path / RUN_RECORD).write_text(json.dumps(record))
    assert recorded_validation_cases(tmp_path / "model.pt") == ["b", "a"]
    assert "recomputed" not in caplog.text
    # no record (a checkpoint from elsewhere): the split is recomputed, with a warning
    assert recorded_validation_cases(tmp_path / "elsewhere" / "model.pt") is None
    assert "There is no run.json beside" in caplog.text and "recomputed from seed, val_fraction" in caplog.text


def test_empty_dataset_dir_gets_phantoms_and_every_run_on_them_warns(tmp_path, caplog):
    root = tmp_path / "empty"
    root.mkdir()
    cases = training_cases(root, num_phantoms=3, spatial_size=(16, 16, 16))
    assert len(cases["train"]) == 2 and len(cases["validation"]) == 1
    assert "SYNTHETIC PHANTOMS" in caplog.text and "writing 3 synthetic brains" in caplog.text
    # their own case ids, which no real dataset uses, and the manifest written last
    folder = root / "IDM_phantoms"
    assert sorted(p.name for p in folder.iterdir()) == [f"IDM_Phantom_{i:03d}" for i in (1, 2, 3)] + ["phantoms.json"]
    assert json.loads((folder / "phantoms.json").read_text())["spacing"] == [6.0, 6.0, 6.0]  # a 16³ run's grid
    t1 = nib.load(folder / "IDM_Phantom_001" / "IDM_Phantom_001_t1.nii.gz")
    assert t1.shape == (40, 40, 26) and t1.get_data_dtype() == np.int16  # BraTS's 240×240×155 mm at 6 mm
    written = t1.get_fdata()
    caplog.clear()
    assert training_cases(root, num_phantoms=3, spatial_size=(16, 16, 16)) == cases  # a later run finds them
    assert "SYNTHETIC PHANTOMS" in caplog.text and "writing" not in caplog.text
    # a set that a killed run left part-written (no manifest, a case missing) is replaced whole, not trained on
    (folder / "phantoms.json").unlink()
    shutil.rmtree(folder / "IDM_Phantom_003")
    (folder / "IDM_Phantom_001" / "IDM_Phantom_001_t1.nii.gz").write_bytes(b"cut short")
    assert training_cases(root, num_phantoms=3, spatial_size=(16, 16, 16)) == cases
    assert "a set left part-written" in caplog.text
    assert nib.load(folder / "IDM_Phantom_001" / "IDM_Phantom_001_t1.nii.gz").get_fdata().tolist() == written.tolist()
    # a run on a finer grid gets its own: the default 64³ run's 2 mm
    caplog.clear()
    training_cases(root, num_phantoms=3, spatial_size=(64, 64, 64))
    assert "of 3 cases at [6.0, 6.0, 6.0]" in caplog.text
    assert nib.load(folder / "IDM_Phantom_001" / "IDM_Phantom_001_t1.nii.gz").shape == (120, 120, 78)


def test_the_built_in_brains_have_each_sequences_contrasts_and_a_tumour_in_brats_labels():
    """T1: white > grey > CSF; T2: CSF > grey > white; FLAIR: CSF dark, oedema bright; T1ce: the enhancing rim
    brightest. Measured where one tissue fills the voxel, over cases of different seeds (which differ)."""
    tumours = 0
    for seed in range(4):
        fractions, _, labels = case_anatomy(4.0, seed)
        case = make_case(4.0, seed)
        healthy = labels == 0
        tissue = {name: (fractions[k] > 0.9) & healthy for k, name in enumerate(("csf", "grey", "white"))}

        def mean(modality: str, where, case=case) -> float:
            return float(case[modality][where.numpy()].mean())

        assert mean("t1", tissue["white"]) > mean("t1", tissue["grey"]) > mean("t1", tissue["csf"])
        assert mean("t2", tissue["csf"]) > mean("t2", tissue["grey"]) > mean("t2", tissue["white"])
        assert mean("flair", tissue["csf"]) < mean("flair", tissue["white"])
        assert set(np.unique(case["seg"]).tolist()) <= {0, 1, 2, 4}
        if labels.any():
            tumours += 1
            oedema, rim = labels == 2, labels == 4
            assert mean("flair", oedema) > mean("flair", tissue["white"] | tissue["grey"])
            assert mean("t1ce", rim) > max(mean("t1ce", tissue[name]) for name in tissue)
        assert (case["t1"][(fractions.sum(0) < 0.01).numpy() & (labels == 0).numpy()] == 0).all()  # skull-stripped
    assert tumours >= 2
    assert not np.array_equal(make_case(4.0, 0)["t1"], make_case(4.0, 1)["t1"])
    assert np.array_equal(make_case(4.0, 2, ["t2"])["t2"], make_case(4.0, 2)["t2"])  # each sequence its own stream


def test_the_tumour_labels_follow_their_case_onto_either_grid(tmp_path):
    """Where every case folder has a ``_seg`` file its record names it, and preprocessing with ``segmentation`` puts
    the labels on the image's grid by nearest neighbour: BraTS's labels only, the oedema where the FLAIR is bright;
    without ``segmentation`` the record's path is dropped. A folder without one leaves every record without."""
    write_anatomy_cases(tmp_path, 2, spacing=4.0, seed=0)  # both with a tumour (seeds 0 and 1)
    records = discover_cases(tmp_path, ["t1", "flair"])
    assert [Path(r["seg"]).name for r in records] == [f"IDM_Phantom_00{i}_seg.nii.gz" for i in (1, 2)]
    for spacing, size in ((None, (16, 16, 16)), (4.0, (40, 48, 40))):
        case = preprocessing(["t1", "flair"], size, spacing, segmentation=True)(records[0])
        seg, flair = case["seg"], case["image"][1]
        assert seg.shape == (1, *size) and seg.dtype == torch.uint8
        assert set(seg.unique().tolist()) <= {0, 1, 2, 4} and (seg == 2).any(), spacing
        np.testing.assert_allclose(seg.affine, case["image"].affine, atol=1e-5)
        head = flair > 0.05
        assert flair[seg[0] == 2].mean() > 1.5 * flair[head & (seg[0] == 0)].mean(), spacing
        assert "seg" not in preprocessing(["t1", "flair"], size, spacing)(records[0])
    (tmp_path / "IDM_Phantom_002" / "IDM_Phantom_002_seg.nii.gz").unlink()
    assert all("seg" not in r for r in discover_cases(tmp_path, ["t1", "flair"]))


def test_only_a_new_training_run_writes_phantoms(tmp_path):
    """Evaluation and a resumed run (write_phantoms false) never create data in a missing or empty dataset_dir."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(DatasetNotFoundError, match="Only a new training run writes the built-in") as info:
            training_cases(folder, num_phantoms=2, write_phantoms=False)
        assert str(folder) in str(info.value) and "--dataset_dir" in str(info.value)
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_a_resumed_run_with_a_missing_dataset_dir_writes_no_phantoms(tmp_path):
    recorded_checkpoint(tmp_path / "C", num_train_timesteps=100)  # the run the resume continues
    (tmp_path / "C" / "training_state.pt").write_bytes(b"")  # what the checkpoint-folder check asks of a resume
    result = run_bundle(
        "configs/train.json",
        SMALL_TRAINING
        | {
            "dataset_dir": tmp_path / "typo",
            "ckpt_dir": tmp_path / "C",
            "output_dir": tmp_path / "R",
            "resume": "true",
            "num_phantoms": "2",
        },
        "training",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "typo' does not exist" in result.stderr and "Only a new training run writes" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_phantoms_never_join_real_data(tmp_path, caplog):
    """A first run without data left phantoms (here named as before they had their own ids); BraTS was
    unpacked later: only the real cases are used, and the log says the phantoms are left out."""
    write_ellipsoid_phantoms(tmp_path / "IDM_phantoms", num_cases=3, shape=SHAPE)
    write_ellipsoid_phantoms(tmp_path / "made", num_cases=1, shape=SHAPE, prefix="IDM_Phantom")  # make_phantoms.py's
    write_ellipsoid_phantoms(tmp_path / "MICCAI_BraTS2020_TrainingData", num_cases=2, shape=SHAPE, seed=9)
    records = discover_cases(tmp_path, ["t1", "t2"])
    assert [r["case"] for r in records] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert all("MICCAI_BraTS2020_TrainingData" in r["t1"] for r in records)
    assert "left out" in caplog.text and "SYNTHETIC PHANTOMS" not in caplog.text
    assert str(tmp_path / "IDM_phantoms") in caplog.text and str(tmp_path / "made") in caplog.text
    cases = training_cases(tmp_path)
    assert len(cases["train"] + cases["validation"]) == 2


def test_unrecognised_dataset_dir_is_not_replaced_by_phantoms(tmp_path):
    data = tmp_path / "D"
    data.mkdir()
    for i in range(1, 5):
        for modality in ("t1", "t2"):
            _write(data / f"pat{i:03d}_{modality}.nii.gz", make_ellipsoid_phantom(SHAPE, seed=i)[modality])
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(DatasetNotFoundError, match="No dataset found") as info:
        training_cases(data)
    assert isinstance(info.value, BadInputError)
    assert "expected BraTS2020 case folders" in str(info.value) and "pat001_t1.nii.gz" in str(info.value)
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written into the user's folder
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(BadInputError, match=r"dataset_dir .*afile.* is a file"):
        training_cases(afile)
    assert afile.read_text() == "not a folder"


def test_training_on_an_unrecognised_dataset_dir_stops_with_the_discovery_message(tmp_path):
    data = tmp_path / "D"
    data.mkdir()
    _write(data / "pat001_t1.nii.gz", make_ellipsoid_phantom(SHAPE)["t1"])
    small = {
        "spatial_size": "[16,16,16]",
        "network_def#channels": "[8,16,32]",
        "attention_levels": "[false,true,true]",
        "num_train_timesteps": "100",
        "batch_size": "2",
        "num_workers": "0",
        "num_phantoms": "2",
        "train#trainer#max_epochs": "1",
    }
    result = run_bundle(
        "configs/train.json",
        small | {"dataset_dir": data, "ckpt_dir": tmp_path / "C", "output_dir": tmp_path / "R"},
        "training",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No dataset found" in result.stderr and "Traceback" not in result.stderr
    assert not (data / "IDM_phantoms").exists() and not (tmp_path / "C").exists()


def test_a_split_needs_two_cases():
    """(val_fraction is checked with the training settings, before any data is read or written:
    tests/test_settings.py.)"""
    records = [{"case": f"c{i}"} for i in range(4)]
    with pytest.raises(BadInputError, match="at least 2 usable cases"):
        split_cases(records[:1], val_fraction=0.2, seed=0)
    with pytest.raises(TypeError):  # keywords only: a fraction and a seed in the wrong order would go unnoticed
        split_cases(records, 0.2, 0)


def test_unknown_modality_names_the_modalities_the_data_has(brats_dir):
    with pytest.raises(BadInputError, match="modality 'pd'") as info:
        discover_cases(brats_dir, ["t1", "pd"])
    assert "flair, seg, t1, t1ce, t2" in str(info.value)
    with pytest.raises(BadInputError, match="modalities must be"):
        discover_cases(brats_dir, "t1")


def _make_phantoms(*args: str) -> subprocess.CompletedProcess:
    """``python scripts/make_phantoms.py ARGS`` as a user types it."""
    return run_python([ROOT / "scripts" / "make_phantoms.py", *args], cwd=Path.cwd(), timeout=300)


def test_make_phantoms_overwrite_false_keeps_existing_cases(tmp_path):
    """The command line delivers --overwrite false as the string 'false', which must refuse, not overwrite."""
    base = ["--output_dir", str(tmp_path), "--num_cases", "1", "--spacing", "12"]
    assert _make_phantoms(*base).returncode == 0
    t1 = tmp_path / "IDM_Phantom_001" / "IDM_Phantom_001_t1.nii.gz"
    t1.write_bytes(b"kept")
    refused = _make_phantoms(*base, "--seed", "3", "--overwrite", "false")
    assert refused.returncode == 1 and "Refusing to overwrite" in refused.stderr
    assert "--overwrite true" in refused.stderr
    assert t1.read_bytes() == b"kept"
    bad = _make_phantoms(*base, "--overwrite", "no")
    assert bad.returncode == 1 and "--overwrite must be true or false, got 'no'" in bad.stderr
    assert t1.read_bytes() == b"kept"
    assert _make_phantoms(*base, "--overwrite", "true").returncode == 0
    written = nib.load(t1)
    assert written.shape == (20, 20, 13) and written.get_data_dtype() == np.int16  # BraTS's 240×240×155 mm at 12 mm


def test_the_shipped_template_is_the_brain_mask_split_into_tissues_centred_on_the_frame():
    """bundle/data/mni152_tissue.npz (scripts/make_anatomy_template.py needs nilearn, so the file is checked instead):
    grey and white fractions inside the mask only, the brain box's centre at the origin, the ventricles' centre inside
    the brain where CSF is, and the template's intracranial volume at 1 mm (1.9 litres: MNI space is larger than the
    average head)."""
    fractions, affine, ventricles = load_template()
    csf, grey, white = fractions
    brain = fractions.sum(0)
    assert torch.all(brain <= 1 + 1e-6) and float(brain.sum()) / 1e6 == pytest.approx(1.9, rel=0.1)  # litres
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0)
    centre = affine[:3, :3] @ ((np.array(fractions.shape[1:]) - 1) / 2) + affine[:3, 3]
    np.testing.assert_allclose(centre, 0.0, atol=1e-6)
    index = np.round(np.linalg.solve(affine[:3, :3], ventricles - affine[:3, 3])).astype(int)
    window = csf[tuple(slice(i - 5, i + 6) for i in index)]
    assert float(window.mean()) > 0.3 and float(grey.max()) > 0.9 and float(white.max()) > 0.9
