"""Quality at equal budget (scripts.benchmarking.quality): both networks trained by configs/train.json, small."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from scripts.benchmarking.quality import compare_quality, render_quality_markdown, write_quality_report

EPOCHS = 2
TRAIN_CASES = 3  # of 4 phantoms with val_fraction 0.2
BATCH = 2


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quality")
    return compare_quality(
        root / "work",
        output_dir=root / "docs",
        epochs=EPOCHS,
        size=16,
        channels=(8, 16, 32),
        attention_levels=(False, True, True),
        batch_size=BATCH,
        num_phantoms=4,
        num_threads=1,
    )


def test_both_networks_train_through_the_bundle_at_equal_budget(result):
    idm, monai = result["networks"]["idm"], result["networks"]["monai"]
    assert idm["network_def"]["_target_"] == "bundle.networks.InvertibleDiffusionUNet"
    assert monai["network_def"]["_target_"] == "monai.networks.nets.DiffusionModelUNet"
    assert idm["steps"] == monai["steps"] == EPOCHS * -(-TRAIN_CASES // BATCH)
    for run in (idm, monai):
        for tag, curve in run["curves"].items():
            assert [epoch for epoch, _ in curve] == list(range(1, EPOCHS + 1)), tag
        assert run["final"]["val_eps_mse"] > 0 and 0 < run["final"]["val_ssim"] <= 1
        assert run["wall_seconds"] > 0
    assert abs(monai["parameters"] / idm["parameters"] - 1) <= 0.1
    assert result["eps_mse_ratio"] == pytest.approx(idm["final"]["val_eps_mse"] / monai["final"]["val_eps_mse"])


def test_figure_is_a_png(result):
    with Image.open(result["figure"]) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200
        image.verify()


def test_markdown_reports_both_networks_final_numbers(result, tmp_path):
    text = render_quality_markdown(result, "python scripts/benchmark.py quality")
    assert text.startswith("## Quality at equal budget")
    assert "`python scripts/benchmark.py quality`" in text and "quality_vs_monai.png" in text
    for run in result["networks"].values():
        final = run["final"]
        for number in (f"{final['val_eps_mse']:.4f}", f"{final['val_psnr']:.2f}", f"{final['val_ssim']:.4f}"):
            assert f"| {number} |" in text
        assert run["label"] in text
    assert f"**{result['eps_mse_ratio']:.3f}**" in text
    path = write_quality_report(result, "cmd", tmp_path, variants=[result])
    assert path.read_text().startswith("# Quality at equal budget") and "## Other settings" in path.read_text()
    written = json.loads(path.with_suffix(".json").read_text())
    assert written["eps_mse_ratio"] == written["variants"][0]["eps_mse_ratio"] == result["eps_mse_ratio"]
