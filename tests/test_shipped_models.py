"""The small trained model in models/ (the synthesis study's final T1 → T2 IDM, 6 mm) loads with today's code and
does what README.md says, through the command a user types: it translates a held-out brain closer to its real T2 than
the T1 itself is."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from conftest import ROOT, run_bundle

from bundle.data.anatomy import write_anatomy_cases
from bundle.synthesis import translation_scores

TRANSLATION = ROOT / "models" / "brains_6mm_t1_to_t2" / "model.pt"
FEW_STEPS = {"sampler": "ddim", "num_inference_steps": "20"}


def _unit(volume: np.ndarray) -> np.ndarray:
    return (volume - volume.min()) / max(float(np.ptp(volume)), 1e-12)


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


def test_the_shipped_model_is_small():
    """It holds the EMA weights only (no optimizer state): a few MB in the repository."""
    assert TRANSLATION.stat().st_size < 3 * 2**20
    state = torch.load(TRANSLATION, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
