"""Missing-modality synthesis: conditioned training, resume and refusals, inference on real inputs onto their own grid,
evaluation against ground truth with both baselines, and the MONAI Label image-in/image-out task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_TRAINING, recorded_checkpoint, redraw_zero_init_, relative_error, run_bundle
from monai.bundle import ConfigParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle.data import preprocessing, write_ellipsoid_phantoms
from bundle.diffusion import DiffusionSampler, GridDDIMScheduler, idm_loss_backward, with_condition
from bundle.errors import BadInputError
from bundle.memory_plan import plan_training_step
from bundle.networks import InvertibleDiffusionUNet
from bundle.settings import check_modalities
from bundle.synthesis import RegressionInferer, translation_scores
from bundle.translation import OntoInputGridd, input_cases

T1_TO_T2 = {"condition_modalities": "['t1']", "modalities": "['t2']"}
SAMPLING = {"sampler": "ddim", "num_inference_steps": "3"}


REGRESSION = {k: v for k, v in SMALL_TRAINING.items() if k != "network_def#channels"} | {"regression_channels": "[4,8]"}


def _train(folder: Path, configs: str = "configs/train.json", **overrides) -> object:
    small = REGRESSION if "regression" in configs else SMALL_TRAINING
    return run_bundle(
        configs,
        small
        | T1_TO_T2
        | {
            "dataset_dir": folder / "data",
            "ckpt_dir": folder / "models",
            "output_dir": folder / "runs",
            "num_phantoms": 6,
            "train#trainer#max_epochs": 1,
        }
        | overrides,
    )


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory) -> Path:
    """A T1→T2 IDM trained one epoch on 6 phantoms at 16³, then resumed for a second."""
    folder = tmp_path_factory.mktemp("conditioned")
    first = _train(folder)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(folder, **{"train#trainer#max_epochs": 2, "resume": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    return folder


def _inference(folder: Path, output: Path, config: str = "configs/inference.json", **overrides) -> object:
    run = {"ckpt_path": folder / "models" / "model.pt", "output_dir": output}
    return run_bundle(config, SAMPLING | run | overrides)


def test_the_run_record_names_the_condition_and_the_network_reads_it(conditioned):
    record = json.loads((conditioned / "models" / "run.json").read_text())
    assert record["task"] == "translation"
    assert record["modalities"] == ["t2"] and record["condition_modalities"] == ["t1"]
    assert record["network"]["in_channels"] == 2 and record["network"]["out_channels"] == 1
    weights = torch.load(conditioned / "models" / "model.pt", weights_only=True)
    assert weights["stem.weight"].shape[1] == 2 and weights["head.weight"].shape[0] == 1


@pytest.mark.parametrize(
    ("condition", "named"), [("[]", 'condition_modalities="[]"'), ("['flair']", "condition_modalities=\"['flair']\"")]
)
def test_a_resume_with_another_condition_is_refused_by_name(conditioned, condition, named):
    result = _train(conditioned, **{"condition_modalities": condition, "train#trainer#max_epochs": 3, "resume": "true"})
    assert result.returncode == 1
    message = result.stderr.replace("\n", " ")
    assert "trained with condition_modalities=\"['t1']\"" in message and named in message
    assert "pass --condition_modalities \"['t1']\"" in message


def test_inference_with_another_condition_is_refused_by_name(conditioned, tmp_path):
    result = _inference(
        conditioned, tmp_path / "out", condition_modalities="['t1ce']", input_files="{'t1ce': 'x.nii.gz'}"
    )
    assert result.returncode == 1 and "pass --condition_modalities \"['t1']\"" in result.stderr
    assert not (tmp_path / "out").exists()


def test_inference_runs_a_translation_model_by_its_record_alone(conditioned, tmp_path):
    """The command a user runs in a bundle folder, which names no model setting: inference.json reads the checkpoint's
    record, sees a translation model and translates each study of the dataset folder into the generated modalities."""
    shutil.copytree(conditioned / "models", tmp_path / "models")
    write_ellipsoid_phantoms(tmp_path / "data", num_cases=2, shape=(20, 24, 18), spacing=2.0, seed=5, prefix="Study")
    result = run_bundle("configs/inference.json", SAMPLING | {"bundle_root": tmp_path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "Study_001.png",
        "Study_001_t2.nii.gz",
        "Study_002.png",
        "Study_002_t2.nii.gz",
    ]


def _study(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> Path:
    """A T1 file of ``shape`` and ``affine`` that is not on any training grid: a bright ellipsoid in noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    volume = (np.sqrt((grid**2).sum(0)) < 0.7) * 300.0 + np.random.default_rng(0).random(shape) * 10
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
    return path


def test_inference_from_input_files_writes_on_the_inputs_grid(conditioned, tmp_path):
    affine = np.array([[0.0, -1.2, 0, 30], [0.9, 0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    study = _study(tmp_path / "patient7_t1.nii.gz", (30, 22, 17), affine)
    result = _inference(conditioned, tmp_path / "out", input_files=f"{{'t1': '{study}'}}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = nib.load(tmp_path / "out" / "patient7_t2.nii.gz")
    assert written.shape == (30, 22, 17)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    values = written.get_fdata()
    assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    assert (tmp_path / "out" / "patient7.png").stat().st_size > 0
    again = _inference(conditioned, tmp_path / "out", input_files=f"{{'t1': '{study}'}}")
    assert again.returncode == 1 and "--overwrite true" in again.stderr
    assert nib.load(tmp_path / "out" / "patient7_t2.nii.gz").get_fdata().tolist() == values.tolist()


def test_inference_from_a_dataset_folder_writes_each_case_on_its_own_grid(conditioned, tmp_path):
    data = tmp_path / "studies"
    write_ellipsoid_phantoms(data, num_cases=2, shape=(20, 24, 18), spacing=2.0, seed=5, prefix="Study")
    (data / "Study_002" / "Study_002_t2.nii.gz").unlink()  # the missing sequence: not needed
    result = _inference(conditioned, tmp_path / "out", dataset_dir=data)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in ("Study_001", "Study_002"):
        source = nib.load(data / case / f"{case}_t1.nii.gz")
        written = nib.load(tmp_path / "out" / f"{case}_t2.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)


def test_a_case_whose_given_modality_is_unreadable_is_named_and_skipped_only_when_asked(conditioned, tmp_path):
    data = tmp_path / "studies"
    write_ellipsoid_phantoms(data, num_cases=2, shape=(20, 24, 18), spacing=2.0, seed=5, prefix="Study")
    (data / "Study_002" / "Study_002_t1.nii.gz").write_bytes(b"not a volume")
    refused = _inference(conditioned, tmp_path / "out", dataset_dir=data)
    assert refused.returncode == 1 and "Study_002" in refused.stderr and "skip_invalid" in refused.stderr
    assert not (tmp_path / "out").exists()
    skipped = _inference(conditioned, tmp_path / "out", dataset_dir=data, skip_invalid="true")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Study_001.png", "Study_001_t2.nii.gz"]


def test_input_files_must_give_every_given_modality():
    with pytest.raises(BadInputError, match="one file for each of the model's given modalities"):
        input_cases(None, {"t2": "x.nii.gz"}, ["t1"])
    with pytest.raises(BadInputError, match=r"case x, t1: /nonexistent/x_t1.nii.gz: file missing"):
        input_cases(None, {"t1": "/nonexistent/x_t1.nii.gz"}, ["t1"])


def test_evaluation_measures_the_translation_against_the_real_volume_and_the_identity(conditioned, tmp_path):
    result = run_bundle(
        "['configs/train.json','configs/evaluate.json']",
        {
            "dataset_dir": conditioned / "data",
            "ckpt_dir": conditioned / "models",
            "output_dir": tmp_path / "eval",
            "num_inference_steps": 3,
            "num_workers": 0,
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    translation = metrics["translation"]
    assert translation["given"] == ["t1"] and translation["cases"] == metrics["cases"]
    for run in ("model", "identity"):
        assert set(translation[run]["t2"]) == {
            *("psnr", "ssim", "mae", "head_psnr", "head_ssim", "head_mae", "sharpness"),
            *("brasyn_psnr", "brasyn_ssim", "tumour_ssim", "healthy_ssim"),
        }
        # the built-in cases have tumour labels: evaluation reads them, and a case without a tumour has no tumour SSIM
        assert translation[run]["t2"]["healthy_ssim"]["cases"] == len(translation["cases"])
        tumours = [value is not None for value in translation["per_case"][run]["t2"]["tumour_ssim"]]
        assert translation[run]["t2"]["tumour_ssim"]["cases"] == sum(tumours) > 0
    # the identity baseline is the given T1 itself against the real T2: recompute it from the preprocessed volumes
    record = next(r for r in _validation_records(conditioned) if r["case"] == translation["cases"][0])
    case = preprocessing(["t2"], [16, 16, 16], condition_modalities=["t1"], segmentation=True)(record)
    expected = translation_scores(case["condition"].as_tensor(), case["image"].as_tensor(), case["seg"].as_tensor())
    for metric in ("psnr", "healthy_ssim"):
        assert translation["per_case"]["identity"]["t2"][metric][0] == pytest.approx(expected[metric], rel=1e-5)
    markdown = (tmp_path / "eval" / "metrics.md").read_text()
    assert "## Translation from t1 to t2" in markdown and "| identity | t2 |" in markdown
    assert "| run | modality | PSNR | SSIM | SSIM tumour | SSIM healthy |" in markdown


def _validation_records(folder: Path) -> list[dict]:
    from bundle.data import training_cases

    recorded = json.loads((folder / "models" / "run.json").read_text())["validation_cases"]
    return training_cases(folder / "data", modalities=["t1", "t2"], validation_cases=recorded, write_phantoms=False)[
        "validation"
    ]


def test_the_l1_regression_baseline_trains_and_evaluates_by_the_bundles_configs(conditioned, tmp_path):
    trained = _train(
        tmp_path,
        "['configs/train.json','configs/regression.json']",
        dataset_dir=conditioned / "data",
        **{"train#trainer#max_epochs": 2, "preview_interval": 1},
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "val_l1" in trained.stderr + trained.stdout
    # its previews: the target and the prediction of each validation case's mid-slices, once a validation
    events = EventAccumulator(str(next((tmp_path / "runs").glob("events.out.tfevents.*"))), {"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("validation_preview")] == [1, 2]
    evaluated = run_bundle(
        "['configs/train.json','configs/evaluate.json','configs/regression.json']",
        REGRESSION
        | T1_TO_T2
        | {"dataset_dir": conditioned / "data", "ckpt_dir": tmp_path / "models", "output_dir": tmp_path / "eval"},
        run_id="evaluating",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    translation = json.loads((tmp_path / "eval" / "metrics.json").read_text())["translation"]
    assert translation["cases"] == _validation_cases(conditioned)
    assert translation["model"]["t2"]["psnr"]["mean"] != translation["identity"]["t2"]["psnr"]["mean"]


def _validation_cases(folder: Path) -> list[str]:
    return json.loads((folder / "models" / "run.json").read_text())["validation_cases"]


def test_a_regression_without_given_modalities_is_refused(tmp_path):
    result = _train(
        tmp_path,
        "['configs/train.json','configs/regression.json']",
        condition_modalities="[]",
        modalities="['t1','t2']",
    )
    assert result.returncode == 1 and "condition_modalities is empty" in result.stderr.replace("\n", " ")


@pytest.mark.parametrize(
    ("modalities", "condition", "message"),
    [
        (["t2"], ["t2"], "in both modalities"),
        ([], ["t1"], "modalities must be a list of distinct names"),
        (["t2"], "t1", "condition_modalities must be a list"),
    ],
)
def test_bad_modality_lists_are_named(modalities, condition, message):
    with pytest.raises(BadInputError, match=message):
        check_modalities(modalities, condition)


def test_the_generation_monitor_is_refused_for_a_conditioned_model(tmp_path):
    result = _train(tmp_path, generation_interval="1")
    assert result.returncode == 1 and "--generation_interval 0" in result.stderr
    assert not (tmp_path / "data").exists()


def test_conditioned_gradients_of_the_memory_efficient_backward_equal_plain_autograds():
    torch.manual_seed(0)
    network = redraw_zero_init_(InvertibleDiffusionUNet(3, 2, 1, (4, 8), 1, (False, True)).double(), seed=1)
    noisy, noise, condition = (torch.randn(2, 1, 8, 8, 8, dtype=torch.float64) for _ in range(3))
    timesteps = torch.tensor([3, 40])

    def stem_gradient(memory_efficient: bool, given: torch.Tensor) -> list[torch.Tensor]:
        network.memory_efficient = memory_efficient
        network.zero_grad()
        idm_loss_backward(network, noisy, timesteps, noise, lambda_rec=0.1, micro_batch_size=1, condition=given)
        return [p.grad.clone() for p in network.parameters()]

    efficient, plain = stem_gradient(True, condition), stem_gradient(False, condition)
    for a, b in zip(efficient, plain, strict=True):
        assert relative_error(a, b) < 1e-9
    other = stem_gradient(True, torch.zeros_like(condition))
    assert relative_error(other[0], efficient[0]) > 1e-3  # the condition reaches the loss


def test_the_sampler_reads_its_inputs_as_the_condition_when_conditioned():
    seen = []

    def network(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x[:, :1])

    network.training, network.train, network.eval = False, lambda mode=True: None, lambda: None
    condition = torch.rand(2, 1, 4, 4, 4)
    sampler = DiffusionSampler(
        GridDDIMScheduler(num_train_timesteps=10), 2, num_channels=1, conditioned=True, progress=False
    )
    out = sampler(condition, network)
    assert out.shape == (2, 1, 4, 4, 4)
    assert all(x.shape[1] == 2 and torch.allclose(x[:, 1:], condition * 2 - 1) for x in seen)
    assert torch.equal(with_condition(out, None), out)


def test_translation_scores_separate_a_perfect_a_blurred_and_an_unrelated_volume():
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    real = ((grid.norm(dim=0) < 0.7).float() * (0.5 + 0.3 * torch.sin(6 * grid[0])))[None]
    blurred = torch.nn.functional.avg_pool3d(real[None], 3, 1, 1)[0]
    perfect, soft, noise = (translation_scores(v, real) for v in (real, blurred, torch.rand_like(real)))
    assert perfect["psnr"] > 100 and perfect["ssim"] == pytest.approx(1) and perfect["head_mae"] == 0
    assert perfect["sharpness"] == pytest.approx(1)
    assert noise["psnr"] < soft["psnr"] < perfect["psnr"] and soft["sharpness"] < 0.9
    assert soft["head_mae"] > soft["mae"]  # the blur's errors are at the head's edges and inside, not in the air
    assert all(np.isnan(perfect[k]) for k in ("tumour_ssim", "healthy_ssim"))  # no labels, no tumour measures


def test_the_brasyn_measures_see_the_tumour_apart_and_ignore_the_intensity_scale():
    """BraSyn's percentile normalisation takes the real volume's percentiles for both: a generated volume at twice the
    intensity is not perfect, one equal to the real volume is, whatever the real one's scale. An error confined to
    the tumour lowers its SSIM, not the healthy head's; a case without a tumour has no tumour SSIM."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 24)] * 3, indexing="ij"))
    real = ((grid.norm(dim=0) < 0.8).float() * (0.5 + 0.3 * torch.sin(6 * grid[0])))[None]
    seg = ((grid - torch.tensor([0.3, 0.0, 0.0])[:, None, None, None]).norm(dim=0) < 0.3)[None].to(torch.uint8) * 2
    same = translation_scores(real, real, seg)
    assert same["brasyn_psnr"] > 100 and same["brasyn_ssim"] == pytest.approx(1)
    assert same["tumour_ssim"] == pytest.approx(1) and same["healthy_ssim"] == pytest.approx(1)
    assert translation_scores(real * 0.5, real * 0.5, seg)["brasyn_ssim"] == pytest.approx(1)
    assert translation_scores((real * 2).clamp(0, 1), real, seg)["brasyn_ssim"] < 0.99
    wrong = real.clone()
    wrong[seg.bool()] = torch.rand(int(seg.bool().sum()), generator=torch.Generator().manual_seed(0))
    scores = translation_scores(wrong, real, seg)
    assert scores["tumour_ssim"] < 0.5 and scores["healthy_ssim"] > 0.9, scores
    assert scores["tumour_ssim"] < scores["brasyn_ssim"] < scores["healthy_ssim"]
    assert np.isnan(translation_scores(real, real, torch.zeros_like(seg))["tumour_ssim"])


def test_the_preprocessed_input_put_back_on_its_grid_overlays_the_file(tmp_path):
    affine = np.array([[0.0, -1.2, 0, 30], [0.9, 0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    path = _study(tmp_path / "x_t1.nii.gz", (30, 22, 17), affine)
    for spacing in (None, 2.0):
        data = preprocessing(["image"], [16, 16, 16], spacing)({"image": str(path)})
        back = OntoInputGridd(keys="pred")({"image": data["image"], "pred": data["image"].clone()})["pred"]
        original = nib.load(path).get_fdata()
        assert tuple(back.shape[1:]) == original.shape
        np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-5)
        correlation = np.corrcoef(back[0].numpy().ravel(), original.ravel())[0, 1]
        assert correlation > 0.9, (spacing, correlation)


def test_monai_label_style_image_in_image_out(conditioned, tmp_path):
    """MONAI Label's BundleInferTask: inference.json's network_def, weights, preprocessing of one T1 file, the
    inferer as inferer(inputs, network), postprocessing: a T2 of the T1's shape and affine."""
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/inference.json")
    overrides = {"sampler": "ddim", "num_inference_steps": 2, "ckpt_path": str(conditioned / "models" / "model.pt")}
    for key, value in overrides.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def", lazy=False)
    network.load_state_dict(torch.load(conditioned / "models" / "model.pt", weights_only=True))
    affine = np.diag([1.1, 0.9, 1.6, 1.0])
    path = _study(tmp_path / "t1.nii.gz", (20, 26, 14), affine)
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    data["pred"] = parser.get_parsed_content("inferer")(inputs=data["image"][None], network=network)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    assert tuple(data["pred"].shape) == (1, 20, 26, 14)
    np.testing.assert_allclose(data["pred"].affine.numpy(), affine, atol=1e-6)
    assert data["pred"].min() >= 0 and data["pred"].max() <= 1


def test_the_regression_inferer_maps_the_condition_through_the_model_range():
    network = torch.nn.Identity()
    condition = torch.rand(1, 1, 4, 4, 4)
    assert torch.allclose(RegressionInferer()(condition, network), condition, atol=1e-6)


def test_the_planner_counts_the_given_channels():
    network = InvertibleDiffusionUNet(3, 2, 1, (4, 8), 1, (False, True))
    optimizer = torch.optim.AdamW(network.parameters())
    from monai.networks.schedulers import DDPMScheduler

    from bundle.diffusion import NoiseSampler

    plan = plan_training_step(
        network,
        optimizer,
        DDPMScheduler(100),
        NoiseSampler(100),
        batch_size=2,
        image_shape=[1, 16, 16, 16],
        condition_channels=1,
    )
    assert any("conditioned on 1 given channel" in note for note in plan.notes)
    assert plan.peak_bytes > 0


def test_the_conditional_network_matches_its_metadata(tmp_path):
    """``conditional_network_data_format`` of metadata.json, checked as MONAI's ``verify_net_in_out`` checks the
    unconditional one, on the network of a T1 → T2 model."""
    from monai.bundle import verify_net_in_out

    metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
    conditional = metadata["conditional_network_data_format"]
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(
        json.dumps(metadata | {"network_data_format": {k: conditional[k] for k in ("inputs", "outputs")}})
    )
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=str(ROOT / "configs/inference.json"),
        extra_forward_args={"timesteps": torch.tensor([10])},
        ckpt_path=str(recorded_checkpoint(tmp_path / "t1_to_t2", ("t2",), ("t1",))),
    )
    assert conditional["task_inputs"]["image"]["num_channels"] == 1
    assert conditional["task_outputs"]["pred"]["num_channels"] == 1
