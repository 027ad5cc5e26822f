"""The generation study (scripts.benchmarking.generation): both networks trained by configs/train.json with the
generation monitor on, tiny."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import shlex

import pytest
from conftest import ROOT
from PIL import Image

from bundle.visualize import read_scalars
from scripts.benchmarking.generation import compare_generation, continue_run, recipe, write_generation_report

SETTINGS = {
    "steps": 8,
    "check_every": 4,
    "spatial_size": 16,
    "channels": (8, 16, 32),
    "batch_size": 4,
    "num_phantoms": 12,
    "val_fraction": 0.34,
    "num_samples": 2,
    "final_samples_count": 4,  # 8 training cases: 2 steps an epoch
    "num_train_timesteps": 20,
}


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
        assert run["final"]["num_generated"] == 4 and run["final"]["set_size"] == 2
        assert run["first_within"] is None or run["first_within"] in (4, 8)


def test_report_figures_and_tables(study, tmp_path):
    _, result = study
    path = write_generation_report(result, "python scripts/benchmark.py generation", tmp_path)
    text = path.read_text()
    assert text.startswith("# Generation") and "`python scripts/benchmark.py generation`" in text
    for measure in result["networks"]["idm"]["final"]["measures"]:
        assert f"| {measure} |" in text
    assert "## Steps to data-like" in text and "generation_samples.png" in text and "generation_curves.png" in text
    assert "generation_progress.png" in text
    for name in ("generation_samples.png", "generation_curves.png", "generation_progress.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400
    written = json.loads((tmp_path / "generation.json").read_text())
    assert written["networks"]["monai"]["steps"] == 8 and "_samples" not in written


def test_the_idm_run_is_trained_on_as_a_resume_of_a_copy(study, tmp_path):
    """continue_steps: the finished runs are reused, not trained again (the same wall time, event files and final
    measures); the IDM run is copied and resumed to the longer schedule, the copy's curves go on from where they
    stopped, and the report has a section; asked for more steps, the copy trains on again."""
    root, result = study
    events = sorted((root / "work" / "idm" / "runs").glob("events.out.tfevents.*"))
    longer = compare_generation(root / "work", **SETTINGS, continue_steps=12)
    assert sorted((root / "work" / "idm" / "runs").glob("events.out.tfevents.*")) == events
    for name in ("idm", "monai"):
        assert longer["networks"][name]["wall_seconds"] == result["networks"][name]["wall_seconds"]
    assert longer["networks"]["idm"]["final"]["measures"] == result["networks"]["idm"]["final"]["measures"]
    run = longer["networks"]["idm_continued"]
    assert longer["settings"]["continued_epochs"] == 6 and run["steps"] == 12
    assert [step for step, _ in run["curves"]["generation/within_spread"]] == [4, 8, 12]
    assert (
        run["curves"]["generation/within_spread"][:2] == result["networks"]["idm"]["curves"]["generation/within_spread"]
    )
    assert run["wall_seconds"] > result["networks"]["idm"]["wall_seconds"]
    text = write_generation_report(longer, "python scripts/benchmark.py generation", tmp_path).read_text()
    assert "## IDM trained on to 12 steps" in text and "--train#trainer#max_epochs 6 --resume true" in text
    with pytest.raises(ValueError, match="continue_steps=8 gives 4 epochs, not more than the 4"):
        compare_generation(root / "work", **SETTINGS, continue_steps=8)
    # a finished continuation asked for more goes on, keeping its curves and adding to its wall time
    seconds = continue_run(root / "work" / "idm", root / "work" / "idm_continued", epochs=8)
    steps = read_scalars(root / "work" / "idm_continued" / "runs", ["generation/within_spread"])
    assert [epoch for epoch, _ in steps["generation/within_spread"]] == [2, 4, 6, 8]
    assert seconds > run["wall_seconds"] - result["networks"]["idm"]["wall_seconds"]


def test_the_readmes_anatomy_recipe_is_the_studys():
    """README.md's training command with --generation_interval trains what `scripts/benchmark.py generation` trains
    for IDM (its default settings), so the recipe's samples are those docs/generation.md shows."""
    overrides, _ = recipe()
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    commands = [shlex.split(block.replace("\\\n", " ")) for block in blocks if "--generation_interval" in block]
    assert len(commands) == 1, "README.md should have one anatomy recipe"
    starts = [i for i, token in enumerate(commands[0]) if token == "python"] + [len(commands[0])]
    training = commands[0][starts[0] : starts[1]]  # the block's first command
    assert "training" in training
    flags = {key[2:]: value for key, value in itertools.pairwise(training) if key.startswith("--")}
    for key, value in overrides.items():
        if key not in ("seed", "generation_samples"):  # train.json's defaults, not passed
            assert json.loads(flags.get(key, "null")) == value, key
    assert json.loads(flags["network_def#channels"]) == list(
        inspect.signature(compare_generation).parameters["channels"].default
    )
    assert json.loads(flags["attention_levels"]) == list(
        inspect.signature(compare_generation).parameters["attention_levels"].default
    )
