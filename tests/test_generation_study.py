"""The generation study (scripts.benchmarking.generation): both networks trained by configs/train.json with the
generation monitor on, tiny."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from scripts.benchmarking.generation import compare_generation, write_generation_report

SETTINGS = {"steps": 8, "check_every": 4, "size": 16, "channels": (8, 16, 32), "batch_size": 4, "num_phantoms": 12,
            "val_fraction": 0.34, "num_samples": 2, "final_samples_count": 6}  # 8 training cases: 2 steps per epoch


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    return root, compare_generation(root / "work", **SETTINGS)


def test_both_networks_are_checked_at_the_same_steps(study):
    _, result = study
    assert result["settings"]["epochs"] == 4 and result["settings"]["epochs_per_check"] == 2
    assert result["num_real"] == 4
    for run in result["networks"].values():
        assert run["steps"] == 8
        within = run["curves"]["generation/within_spread"]
        assert [step for step, _ in within] == [4, 8] and all(0 <= value <= 1 for _, value in within)
        assert [step for step, _ in run["curves"]["generation/autocorrelation/t1_real_spread"]] == [4, 8]
        assert run["final"]["num_generated"] == 6 and run["final"]["set_size"] == 2
        assert run["first_within"] is None or run["first_within"] in (4, 8)


def test_report_figures_and_tables(study, tmp_path):
    _, result = study
    path = write_generation_report(result, "python scripts/benchmark.py generation", tmp_path)
    text = path.read_text()
    assert text.startswith("# Generation") and "`python scripts/benchmark.py generation`" in text
    for measure in result["networks"]["idm"]["final"]["measures"]:
        assert f"| {measure} |" in text
    assert "## Steps to phantom-like" in text and "generation_samples.png" in text and "generation_curves.png" in text
    for name in ("generation_samples.png", "generation_curves.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400
    written = json.loads((tmp_path / "generation.json").read_text())
    assert written["networks"]["monai"]["steps"] == 8 and "_samples" not in written


def test_a_rerun_reuses_the_finished_runs(study):
    root, result = study
    events = sorted((root / "work" / "idm" / "runs").glob("events.out.tfevents.*"))
    again = compare_generation(root / "work", **SETTINGS)
    assert again["networks"]["idm"]["wall_seconds"] == result["networks"]["idm"]["wall_seconds"]
    assert sorted((root / "work" / "idm" / "runs").glob("events.out.tfevents.*")) == events
    assert again["networks"]["idm"]["final"]["measures"] == result["networks"]["idm"]["final"]["measures"]
