"""The sampling study (scripts.benchmarking.sampling): every sampler of a trained ε model and of its rectified flow
twin against network evaluations, and a translation model's, tiny."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from scripts.benchmarking.quality import train_run
from scripts.benchmarking.sampling import (
    FULL_CHAIN,
    compare_sampling,
    goal_statement,
    sampler_points,
    write_sampling_report,
)

TINY = {
    "spatial_size": [16, 16, 16],
    "network_def#channels": [8, 16, 32],
    "attention_levels": [False, True, True],
    "num_train_timesteps": 20,
    "batch_size": 4,
    "num_phantoms": 12,
    "val_fraction": 0.34,
    "num_workers": 0,
    "train#trainer#max_epochs": 1,
    "preview_interval": 1000,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    train_run(root / "generation" / "idm", TINY | {"dataset_dir": str(root / "data")})
    translation = TINY | {"dataset_dir": str(root / "data"), "condition_modalities": ["t1"], "modalities": ["t2"]}
    train_run(root / "translation" / "idm", translation)
    result = compare_sampling(
        root / "work",
        root / "generation",
        root / "translation",
        num_samples=2,
        steps=(2, 4),
        flow_steps=(2, 5),
        translation_cases=3,
    )
    return root, result


def test_every_sampler_is_measured_at_its_evaluations(study):
    root, result = study
    epsilon, flow = result["generation"]["epsilon"], result["generation"]["rectified_flow"]
    assert [(p["sampler"], p["steps"]) for p in epsilon] == [
        (label, n or 20) for label, _, _, n in sampler_points("epsilon", (2, 4))
    ]
    full = next(p for p in epsilon if p["sampler"] == FULL_CHAIN)
    assert full["evaluations"] == 20  # T
    assert {p["evaluations"] for p in epsilon if p["sampler"].startswith(("DDIM", "DPM")) and p["steps"] == 4} == {4}
    assert [p["evaluations"] for p in flow] == [2, 5]
    for point in epsilon + flow:
        assert 0 <= point["within_spread"] <= 1 and point["seconds_per_sample"] > 0 and point["distance_ratio"] > 0
        assert len(point["comparison"]["measures"]) == 12
    translation = result["translation"]
    assert [p["evaluations"] for p in translation][:1] == [20]
    for point in translation:
        ssim = point["model"]["t2"]["head_ssim"]
        assert point["cases"] == ssim["cases"] == 3 and -1 <= ssim["mean"] <= 1  # the first 3 of 4
    assert result["flow_training_seconds"] > 0 and result["settings"]["flow_objective"] == "rectified_flow"
    flow_args = json.loads((root / "work" / "flow" / "args.json").read_text())
    generation_args = json.loads((root / "generation" / "idm" / "args.json").read_text())
    differ = {k for k in flow_args.keys() | generation_args.keys() if flow_args.get(k) != generation_args.get(k)}
    assert differ == {"objective", "ckpt_dir", "output_dir"}  # the twin differs in its objective alone


def test_the_flow_twin_is_reused_and_the_report_says_whether_the_goal_is_met(study, tmp_path):
    root, result = study
    again = compare_sampling(root / "work", root / "generation", None, num_samples=2, steps=(2,), flow_steps=(2,))
    assert again["flow_training_seconds"] == result["flow_training_seconds"] and again["translation"] is None
    path = write_sampling_report(result, "python scripts/benchmark.py sampling", tmp_path)
    text = path.read_text()
    assert text.startswith("# Sampling") and "`python scripts/benchmark.py sampling`" in text
    assert goal_statement(result["generation"]) in text and "## Translation" in text and "TFLOPs" in text
    for measure in result["generation"]["epsilon"][0]["comparison"]["measures"]:
        assert f"| {measure} |" in text
    with Image.open(tmp_path / "sampling.png") as image:
        assert image.format == "PNG" and image.width > 600
    assert json.loads((tmp_path / "sampling.json").read_text())["generation"].keys() == {"epsilon", "rectified_flow"}


def test_the_goal_statement_names_the_fewest_evaluations_or_the_closest():
    def point(sampler, evaluations, within, ratio):
        return {
            "sampler": sampler,
            "steps": evaluations,
            "evaluations": evaluations,
            "within_spread": within,
            "distance_ratio": ratio,
        }

    full = point(FULL_CHAIN, 1000, 0.75, 1.2)
    met = {
        "epsilon": [full, point("A", 10, 0.75, 1.3), point("A", 20, 0.75, 1.1), point("B", 20, 0.8, 1.0)],
        "rectified_flow": [],
    }
    assert goal_statement(met).startswith("**Goal met**: A at 20 steps") and "50× fewer" in goal_statement(met)
    missed = {
        "epsilon": [full, point("A", 20, 0.5, 1.5), point("A", 50, 0.75, 1.2)],
        "rectified_flow": [point("F", 10, 0.8, 1.4)],
    }
    text = goal_statement(missed)
    assert text.startswith("**Goal missed**") and "Closest within the budget: F at 10 steps, 80% within" in text
    assert "ratio 1.40 (1.17× the full chain's)" in text and "The fewest evaluations that reach it: A, 50" in text
