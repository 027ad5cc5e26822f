"""The synthesis study's report (scripts/benchmarking/synthesis.py) from a result of known figures: the goal verdict
(the IDM ahead of the L1 UNet on SSIM and on sharpness) follows the figures, and the tables carry them."""

from __future__ import annotations

import pytest

from scripts.benchmarking.synthesis import goal_statement, render_synthesis_markdown

METRICS = ("psnr", "ssim", "mae", "head_psnr", "head_ssim", "head_mae", "sharpness")
BRASYN = ("brasyn_psnr", "brasyn_ssim", "tumour_ssim", "healthy_ssim")


def _scores(ssim: float, sharpness: float) -> dict:
    """A translation's measures of one modality: every SSIM ``ssim``, the sharpness ratio ``sharpness``."""
    scores = {}
    for key in METRICS + BRASYN:
        value = sharpness if key == "sharpness" else ssim if "ssim" in key else 20.0 if "psnr" in key else 0.1
        scores[key] = {"mean": value, "std": 0.01, "best_of_batch": value, "cases": 4}
    return scores


def _direction(idm: tuple[float, float], unet: tuple[float, float]) -> dict:
    """T1 → T2 with the final (SSIM, sharpness) of each network, over two stages."""

    def stages(ssim: float, sharpness: float) -> list[dict]:
        return [
            {
                "step": step,
                "wall_seconds": 60.0 * step,
                "metrics": {
                    "cases": ["a", "b", "c", "d"],
                    "model": {"t2": _scores(ssim * step / 20, sharpness)},
                    "identity": {"t2": _scores(0.3, 1.1)},
                },
            }
            for step in (10, 20)
        ]

    return {
        "given": "t1",
        "generated": "t2",
        "networks": {
            "idm": {"label": "IDM (conditioned)", "parameters": 450_000, "stages": stages(*idm)},
            "unet": {"label": "MONAI UNet, L1 regression", "parameters": 440_000, "stages": stages(*unet)},
        },
    }


@pytest.mark.parametrize(
    ("idm", "unet", "verdict"),
    [
        ((0.75, 0.95), (0.70, 0.82), "met"),
        ((0.75, 1.30), (0.70, 0.82), "**missed**"),  # the IDM's samples noisier than the UNet's blur is far
        ((0.68, 0.97), (0.70, 0.82), "**missed**"),  # sharper, but behind on SSIM
    ],
)
def test_the_goal_verdict_follows_the_figures(idm, unet, verdict):
    statement = goal_statement(_direction(idm, unet))
    assert statement.startswith(f"Goal (the IDM ahead of the L1 UNet on SSIM and on sharpness): {verdict}.")
    assert f"Head SSIM IDM {idm[0]:.3f} against UNet {unet[0]:.3f}" in statement
    assert f"sharpness {idm[1]:.2f} against {unet[1]:.2f}" in statement


def test_the_report_gives_the_verdict_and_the_final_figures_of_each_direction():
    settings = {
        "spatial_size": [28, 32, 28],
        "spacing": 6.0,
        "batch_size": 8,
        "learning_rate": 5e-4,
        "ema_decay": 0.995,
        "num_train_timesteps": 1000,
        "num_phantoms": 16,
        "val_fraction": 0.25,
        "idm_channels": [16, 32, 64],
        "attention_levels": [False, False, True],
        "num_blocks": 2,
        "unet_channels": [16, 32, 64],
        "stage_epochs": [1, 2],
        "steps_per_epoch": 10,
        "seed": 0,
        "evaluation_sampler": "DDIM, η = 0, 50 steps",
    }
    result = {"settings": settings, "machine": "test", "directions": {"t1->t2": _direction((0.75, 0.95), (0.7, 0.82))}}
    text = render_synthesis_markdown(result, "python scripts/benchmark.py synthesis")
    assert "28×32×28 voxels of 6.0 mm (the native grid)" in text
    assert "## T1 → T2\n\nGoal (the IDM ahead of the L1 UNet on SSIM and on sharpness): met." in text
    assert "Final models (20 steps), 4 validation cases" in text
    assert "| IDM (conditioned) | 20.00 ± 0.01 | 0.750 ± 0.010 |" in text
    assert "| 10 | 20.00 | 0.375 | 0.100 | 20.00 | 0.350 | 0.100 |" in text  # the learning curve's first stage
