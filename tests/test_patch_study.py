"""The patch-training study's pieces: the quarter data set (a quarter of the training cases, every validation case,
the same files) and the wall time to a quality."""

from __future__ import annotations

import pytest

from scripts.benchmarking.patch_training import quarter_dataset, time_to_quality


def test_the_quarter_data_set_links_a_quarter_of_the_training_cases_and_every_validation_case(tmp_path):
    def case(name: str) -> dict:
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for modality in ("t1", "t2"):
            (folder / f"{name}_{modality}.nii.gz").write_bytes(name.encode())
        return {"case": name, "t1": str(folder / f"{name}_t1.nii.gz")}

    cases = {"train": [case(f"train_{i}") for i in range(8)], "validation": [case("val_0"), case("val_1")]}
    validation, num_train = quarter_dataset(cases, tmp_path / "quarter", seed=0)
    assert validation == ["val_0", "val_1"] and num_train == 2
    folders = sorted(p.name for p in (tmp_path / "quarter" / "MICCAI_BraTS2020_TrainingData").iterdir())
    assert len(folders) == 4 and {"val_0", "val_1"} <= set(folders)
    linked = tmp_path / "quarter" / "MICCAI_BraTS2020_TrainingData" / "val_0" / "val_0_t2.nii.gz"
    assert linked.read_bytes() == b"val_0" and linked.stat().st_nlink == 2  # the same file, not a copy
    assert quarter_dataset(cases, tmp_path / "quarter", seed=0) == (validation, num_train)  # a rerun adds nothing


@pytest.mark.parametrize("target, expected", [(5.0, 200 * 1.5), (9.0, 100 * 1.5), (2.0, None)])
def test_wall_time_to_quality_is_the_first_check_at_the_target_times_the_seconds_per_step(target, expected):
    run = {"curves": {"generation/distance_ratio": [(100, 8.0), (200, 4.5), (300, 5.5)]}, "seconds_per_step": 1.5}
    assert time_to_quality(run, target) == expected
