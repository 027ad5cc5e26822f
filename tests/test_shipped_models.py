"""The small trained models in models/ (the anatomy studies' final IDMs, 6 mm) load with today's code and do what
README.md says, through the commands a user types: the generation model writes brains on BraTS's grid whose T1 and
T2 contrasts are opposed as in the data, and the T1 → T2 model translates a held-out brain closer to its real T2 than
the T1 itself is."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, run_bundle

from bundle.data.anatomy import write_anatomy_cases
from bundle.data.transforms import foreground
from bundle.synthesis import translation_scores

GENERATION = ROOT / "models" / "brains_6mm" / "model.pt"
TRANSLATION = ROOT / "models" / "brains_6mm_t1_to_t2" / "model.pt"
FEW_STEPS = {"sampler": "ddim", "num_inference_steps": "20"}


def _head_correlation(t1: np.ndarray, t2: np.ndarray) -> float:
    """Pearson correlation of T1 and T2 over the head (T1's foreground)."""
    mask = foreground(torch.as_tensor(t1)[None])[0].numpy()
    return float(np.corrcoef(t1[mask], t2[mask])[0, 1])


def _unit(volume: np.ndarray) -> np.ndarray:
    return (volume - volume.min()) / max(float(np.ptp(volume)), 1e-12)


def test_the_generation_model_writes_brains_with_the_datas_contrast(tmp_path):
    record = json.loads((GENERATION.parent / "run.json").read_text())
    assert record["task"] == "generation" and record["spatial_size"] == [28, 32, 28] and record["spacing"] == [6.0] * 3
    result = run_bundle(
        "configs/inference.json", FEW_STEPS | {"ckpt_path": GENERATION, "output_dir": tmp_path, "num_samples": "2"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    real = write_anatomy_cases(tmp_path / "real", 1, 6.0, seed=int(record["validation_cases"][0].rsplit("_", 1)[1]))[0]
    for i in range(2):
        t1, t2 = (nib.load(tmp_path / f"sample_{i:03d}_{m}.nii.gz") for m in ("t1", "t2"))
        grid = record["original_grid"]
        assert list(t1.shape) == grid["spatial_size"]  # written back on BraTS's frame at 6 mm
        np.testing.assert_allclose(t1.affine, grid["affine"])
        assert _head_correlation(t1.get_fdata(), t2.get_fdata()) < -0.3  # CSF dark in T1 and bright in T2
    t1, t2 = (nib.load(real / f"{real.name}_{m}.nii.gz").get_fdata() for m in ("t1", "t2"))
    assert _head_correlation(t1, t2) < -0.3  # as in a real case of the set


def test_the_translation_model_brings_a_held_out_t1_closer_to_its_t2(tmp_path):
    record = json.loads((TRANSLATION.parent / "run.json").read_text())
    assert record["task"] == "translation" and record["condition_modalities"] == ["t1"]
    held_out = record["validation_cases"][0]
    case = write_anatomy_cases(tmp_path / "data", 1, 6.0, seed=int(held_out.rsplit("_", 1)[1]))[0]
    given = case / f"{case.name}_t1.nii.gz"
    overrides = FEW_STEPS | {
        "ckpt_path": TRANSLATION,
        "output_dir": tmp_path / "out",
        "input_files": f"{{'t1': '{given}'}}",
    }
    result = run_bundle("configs/inference.json", overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    output = nib.load(next((tmp_path / "out").glob("*_t2.nii.gz")))
    real_t2 = nib.load(case / f"{case.name}_t2.nii.gz")
    assert output.shape == real_t2.shape
    np.testing.assert_allclose(output.affine, real_t2.affine)
    target = torch.as_tensor(_unit(real_t2.get_fdata()), dtype=torch.float32)[None]
    seg = torch.as_tensor(nib.load(case / f"{case.name}_seg.nii.gz").get_fdata())[None]
    scores = {
        name: translation_scores(torch.as_tensor(_unit(volume), dtype=torch.float32)[None], target, seg)
        for name, volume in (("model", output.get_fdata()), ("identity", nib.load(given).get_fdata()))
    }
    assert scores["model"]["brasyn_ssim"] > scores["identity"]["brasyn_ssim"] + 0.1, scores
    assert scores["model"]["brasyn_psnr"] > scores["identity"]["brasyn_psnr"], scores


@pytest.mark.parametrize("checkpoint", [GENERATION, TRANSLATION])
def test_a_shipped_model_is_small(checkpoint):
    """Each holds the EMA weights only (no optimizer state): a few MB in the repository."""
    assert checkpoint.stat().st_size < 3 * 2**20
    state = torch.load(checkpoint, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
