"""Generation through configs/inference.json: outputs, the training run's record, samplers, reproducibility and every
bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_TRAINING, run_bundle
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from bundle.data import write_ellipsoid_phantoms
from bundle.diffusion import DiffusionSampler, DPMSolverScheduler, GridDDIMScheduler, seeded_generator
from bundle.errors import BadInputError
from bundle.inference import SampleWriter
from bundle.networks import InvertibleDiffusionUNet
from bundle.run_record import RUN_RECORD, TrainedModel, run_record
from bundle.settings import InferenceSettings

# the model describes itself (run.json): a command line names only what to sample
CLI = {"sampler": "ddim", "num_inference_steps": "3"}
AFFINE = [[-2.0, 0, 0, 10.0], [0, 2.0, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1.0]]


def small_network(in_channels: int = 2) -> InvertibleDiffusionUNet:
    torch.manual_seed(0)
    return InvertibleDiffusionUNet(3, in_channels, 2, channels=(8, 16, 32), attention_levels=(False, True, True))


def record_of(schedule: str = "cosine", num_train_timesteps: int = 50, **scheduler_arguments) -> dict:
    """The run.json of a training run of :func:`small_network` on 16³ t1/t2 volumes of grid ``AFFINE`` with this
    noise scheduler."""
    image = MetaTensor(torch.zeros(2, 16, 16, 16), affine=torch.tensor(AFFINE, dtype=torch.float64))
    scheduler = DDPMScheduler(num_train_timesteps, schedule=schedule, **scheduler_arguments)
    return run_record(
        case={"image": image},
        modalities=["t1", "t2"],
        noise_scheduler=scheduler,
        schedule=schedule,
        network=small_network(),
        validation_cases=["BraTS20_Training_001"],
    )


RECORD = record_of()


def infer(overrides: dict) -> subprocess.CompletedProcess:
    return run_bundle("configs/inference.json", overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(small_network().state_dict(), folder / "model.pt")
    (folder / RUN_RECORD).write_text(json.dumps(RECORD))
    return folder / "model.pt"


def test_the_network_is_built_from_the_record_beside_the_checkpoint(checkpoint):
    """inference.json's network_def (what MONAI Label builds) is the recorded one: the run's channels and attention,
    none of the config's paper defaults."""
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/inference.json")
    parser["ckpt_path"] = str(checkpoint)
    network = parser.get_parsed_content("network_def")
    assert {"_target_": "bundle.networks.idm.InvertibleDiffusionUNet", **network.config} == RECORD["network"]
    assert network.trunk.channels == (8, 16, 32)
    assert network.trunk.attention_levels == (False, True, True)
    network.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert parser.get_parsed_content("spatial_size") == [16, 16, 16]


def test_samples_are_written_per_modality_on_the_training_voxel_grid(checkpoint, tmp_path):
    result = infer(CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path / "O", "num_samples": 3, "batch_size": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "O").iterdir())
    assert names == [f"sample_{i:03d}{s}" for i in range(3) for s in (".png", "_t1.nii.gz", "_t2.nii.gz")]
    image = nib.load(tmp_path / "O" / "sample_002_t2.nii.gz")
    assert image.shape == (16, 16, 16)
    np.testing.assert_allclose(image.affine, AFFINE)
    data = image.get_fdata()
    assert data.min() >= 0 and data.max() <= 1 and data.std() > 0
    assert "3/3" in result.stderr  # the progress bar over DDIM steps


def test_seed_makes_samples_reproducible(checkpoint, tmp_path):
    for name in ("A", "B"):
        assert infer(CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path / name, "num_samples": 1}).returncode == 0
    other = infer(CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path / "C", "num_samples": 1, "seed": 5})
    assert other.returncode == 0
    load = lambda d: nib.load(tmp_path / d / "sample_000_t1.nii.gz").get_fdata()
    assert np.array_equal(load("A"), load("B"))
    assert not np.array_equal(load("A"), load("C"))


class _Damped(torch.nn.Module):
    """A stand-in noise predictor that acts on each sample on its own, so that batching changes no rounding."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.001 * timesteps.float().view(-1, *([1] * (x.dim() - 1)))


SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler(20, schedule="cosine"),
    "ddim": lambda: GridDDIMScheduler(20, schedule="cosine"),
    "pndm": lambda: PNDMScheduler(20, schedule="cosine", skip_prk_steps=True),
    "dpm_solver": lambda: DPMSolverScheduler(20, schedule="cosine"),
}


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_sample_i_depends_on_the_seed_and_i_only(sampler):
    """The initial noise (and DDPM's step noise) of sample i comes from (seed, i): batches of 3 and 1 give the samples
    that four batches of 1 give (the seed was per call, so a sample depended on the batch size); other seeds differ,
    also from this seed's later samples (seed + i would repeat them). PNDM and DPM-Solver, whose steps draw no noise,
    step the batch; their history is reset at each call."""
    steps = 20 if sampler == "ddpm" else 4  # DDPM: the full chain of T steps

    def samples(seed: int, batch_sizes: list[int]) -> torch.Tensor:
        inferer = DiffusionSampler(SCHEDULERS[sampler](), num_inference_steps=steps, seed=seed, progress=False)
        return torch.cat([inferer(torch.zeros(b, 2, 4, 4, 4), _Damped()) for b in batch_sizes])

    together, alone = samples(3, [3, 1]), samples(3, [1, 1, 1, 1])
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(samples(4, [1])[0], together[1])


def test_seeded_streams_are_fixed_by_their_keys_alone():
    """(0, 1) and (1, 0) get different streams (seed + index would not), and so do the key tuples that share
    SeedSequence's words when handed to it directly; equal keys get the same stream, and a negative key is taken
    modulo 2⁶⁴ as torch's manual_seed takes it."""
    draw = lambda *keys: torch.randn(8, generator=seeded_generator(*keys))
    assert torch.equal(draw(0, 1), draw(0, 1)) and not torch.equal(draw(0, 1), draw(1, 0))
    assert not torch.equal(draw(0, 1), draw(0, 1, 0)) and not torch.equal(draw(2**32, 1), draw(0, 2**32 + 1))
    assert torch.equal(draw(-1, 3), draw(2**64 - 1, 3))


@pytest.mark.parametrize("num_inference_steps", [3, 5, 7])
def test_each_ddim_step_lands_on_the_next_timestep_of_the_grid(num_inference_steps):
    """With ε̂ = 0 a DDIM step multiplies x_t by √(ᾱ_t′ / ᾱ_t), so the chain from t₀ = T − 1 to x₀ (ᾱ = 1) gives
    x_T / √ᾱ_t₀ exactly when every step goes to the timestep the next step is evaluated at. MONAI's step goes
    ⌊T / n⌋ down while its grid is (T − 1) / (n − 1) apart, which makes the product 26–32 % smaller here."""

    def chain(scheduler: DDIMScheduler) -> torch.Tensor:
        scheduler.set_timesteps(num_inference_steps)
        x = x_start = torch.linspace(-1, 1, 10, dtype=torch.float64)
        for t in scheduler.timesteps.tolist():
            x, _ = scheduler.step(torch.zeros_like(x), t, x)
        return x / (x_start / scheduler.alphas_cumprod[scheduler.timesteps[0]].double().sqrt())

    settings = {"num_train_timesteps": 1000, "schedule": "cosine", "clip_sample": False}
    torch.testing.assert_close(chain(GridDDIMScheduler(**settings)), torch.ones(10, dtype=torch.float64))
    assert (chain(DDIMScheduler(**settings)) - 1).abs().min() > 0.1  # the test tells the two apart


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("num_inference_steps", [1, 40])
def test_the_grid_ddim_step_is_monais_where_monais_step_lands_on_its_grid(eta, num_inference_steps):
    """With n = 1 or n = T MONAI's step lands on its own grid: there the two schedulers' steps (x̂₀ not clamped, η's
    noise drawn from the same generator) agree at every timestep."""
    ours, monais = (
        cls(num_train_timesteps=40, schedule="cosine", clip_sample=False) for cls in (GridDDIMScheduler, DDIMScheduler)
    )
    for scheduler in (ours, monais):
        scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(0)
    for t in ours.timesteps.tolist():
        eps, x = torch.randn(2, 1, 4, 4, generator=generator), 2 * torch.randn(2, 1, 4, 4, generator=generator)
        expected = monais.step(eps, t, x, eta, torch.Generator().manual_seed(t))
        for got, want in zip(ours.step(eps, t, x, eta, torch.Generator().manual_seed(t)), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_the_schedulers_eta_is_that_of_its_steps():
    scheduler = GridDDIMScheduler(num_train_timesteps=40, schedule="cosine", eta=0.6)
    scheduler.set_timesteps(5)
    eps, x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    t = int(scheduler.timesteps[1])
    draw = lambda: torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        scheduler.step(eps, t, x, generator=draw())[0], scheduler.step(eps, t, x, eta=0.6, generator=draw())[0]
    )
    assert not torch.allclose(
        scheduler.step(eps, t, x, generator=draw())[0], scheduler.step(eps, t, x, eta=0.0, generator=draw())[0]
    )
    for eta in (-0.1, 1.5, "1", True):
        with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
            GridDDIMScheduler(num_train_timesteps=40, eta=eta)


@pytest.mark.parametrize("error", [0.98, 1.02])
@pytest.mark.parametrize("num_inference_steps", [50, 1000])
def test_ddim_stays_on_the_data_with_a_slightly_wrong_noise_estimate(error, num_inference_steps):
    """Data of one volume c, and ε̂ the exact noise of x_t given c times ``error``: every chain must end at c. Where
    ᾱ is near 0 (cosine schedule, T = 1000: 2.4·10⁻⁹ at t = 999) a step with ε̂ beside the clamped x̂₀ (MONAI's)
    multiplies the sample by ``error`` and, with 1000 steps, ends 0.57 away from c; ε̃, the noise that the clamped
    x̂₀ implies, keeps it on c."""
    c = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    x = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    scheduler = GridDDIMScheduler(num_train_timesteps=1000, schedule="cosine")
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps.tolist():
        alpha = scheduler.alphas_cumprod[t]
        x, _ = scheduler.step(error * (x - alpha.sqrt() * c) / (1 - alpha).sqrt(), t, x)
    assert (x - c).abs().max() < 2e-3


def test_samples_are_the_same_whatever_the_batch_size(checkpoint, tmp_path):
    for name, batch_size in (("A", 1), ("B", 2)):
        result = infer(
            CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path / name, "num_samples": 2, "batch_size": batch_size}
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for sample in ("sample_000_t1.nii.gz", "sample_001_t2.nii.gz"):
        a, b = (nib.load(tmp_path / name / sample).get_fdata() for name in ("A", "B"))
        np.testing.assert_allclose(a, b, atol=1e-5)  # up to rounding: batch 1 convolves in halves (SameConv3d)


def test_existing_outputs_are_refused_unless_overwrite(checkpoint, tmp_path):
    base = CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path, "num_samples": 1}
    assert infer(base).returncode == 0
    before = (tmp_path / "sample_000_t1.nii.gz").read_bytes()
    again = infer(base | {"seed": 3})
    assert again.returncode == 1 and "already exist" in again.stderr and "--overwrite true" in again.stderr
    assert (tmp_path / "sample_000_t1.nii.gz").read_bytes() == before
    assert infer(base | {"seed": 3, "overwrite": "true"}).returncode == 0
    assert (tmp_path / "sample_000_t1.nii.gz").read_bytes() != before


def test_overwrite_replaces_every_sample_of_the_earlier_run(checkpoint, tmp_path):
    """An overwriting run with fewer samples leaves none of the earlier run's beside its own."""
    base = CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path, "batch_size": 3}
    assert infer(base | {"num_samples": 3}).returncode == 0
    (tmp_path / "notes.txt").write_text("not a sample")
    again = infer(base | {"num_samples": 1, "overwrite": "true"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "sample_000.png",
        "sample_000_t1.nii.gz",
        "sample_000_t2.nii.gz",
    ]
    assert "--overwrite true: removed 9 sample files of an earlier run" in again.stdout + again.stderr


def test_the_sample_writer_names_the_samples_and_refuses_earlier_ones_without_overwrite(checkpoint, tmp_path):
    model = TrainedModel(checkpoint)
    out = tmp_path / "samples"

    def writer(overwrite: bool) -> SampleWriter:
        settings = InferenceSettings(output_dir=out, num_samples=2, batch_size=1, device="cpu", overwrite=overwrite)
        return SampleWriter(settings, model)

    assert writer(False).earlier_samples() == []  # output_dir need not exist
    assert writer(False).sample_paths() == [
        {
            "t1": out / f"sample_{i:03d}_t1.nii.gz",
            "t2": out / f"sample_{i:03d}_t2.nii.gz",
            "png": out / f"sample_{i:03d}.png",
        }
        for i in range(2)
    ]
    out.mkdir()
    # an earlier run's samples of any number and modality, not other files
    for name in ("sample_007_flair.nii.gz", "sample_1234.png", "notes.txt", "sample_x_t1.nii.gz"):
        (out / name).write_text("")
    with pytest.raises(
        BadInputError, match=r"2 output files of an earlier run .*sample_007_flair.nii.gz.*--overwrite true"
    ):
        writer(False)
    assert [p.name for p in writer(True).earlier_samples()] == ["sample_007_flair.nii.gz", "sample_1234.png"]


def test_earlier_samples_that_this_run_would_not_rewrite_are_refused_too(checkpoint, tmp_path):
    (tmp_path / "sample_005_t1.nii.gz").write_bytes(b"earlier")
    result = infer(CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path, "num_samples": 1})
    assert result.returncode == 1 and "sample_005_t1.nii.gz" in result.stderr and "--overwrite true" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_005_t1.nii.gz"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ckpt_path": "/nonexistent/model.pt"}, "The checkpoint '/nonexistent/model.pt' does not exist"),
        (
            {"modalities": "[t1]"},
            (
                "trained with modalities=\"['t1','t2']\", but this run gives modalities=\"['t1']\"; "
                "pass --modalities \"['t1','t2']\""
            ),
        ),
        ({"spatial_size": "[32,32,32]"}, 'pass --spatial_size "[16,16,16]"'),
        (
            {"num_train_timesteps": "100"},
            (
                "trained with num_train_timesteps=50, but this run gives num_train_timesteps=100; pass "
                "--num_train_timesteps 50"
            ),
        ),
        ({"num_inference_steps": "0"}, "num_inference_steps must be an integer between 1 and num_train_timesteps=50"),
        ({"num_inference_steps": "51"}, "num_inference_steps must be an integer between 1"),
        ({"sampler": "heun"}, "sampler must be one of ['ddim', 'ddpm', 'dpm_solver', 'pndm']; got 'heun'"),
        ({"sampler": "pndm", "eta": "0.5"}, "the pndm sampler takes none, got eta=0.5: drop --eta"),
        (
            {"schedule": "linear_beta"},
            ("trained with schedule=cosine, but this run gives schedule=linear_beta; pass --schedule cosine"),
        ),
        ({"overwrite": "maybe"}, "overwrite must be true or false, got 'maybe'"),
    ],
)
def test_bad_inputs_fail_before_sampling(checkpoint, tmp_path, overrides, message):
    result = infer(CLI | {"ckpt_path": checkpoint, "output_dir": tmp_path / "O", "num_samples": 1} | overrides)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("ERROR: ") == 1
    assert not (tmp_path / "O").exists()


def test_mismatched_channel_count_is_named(checkpoint, tmp_path):
    folder = tmp_path / "one_channel"
    folder.mkdir()
    torch.save(small_network(in_channels=1).state_dict(), folder / "model.pt")
    (folder / RUN_RECORD).write_text(json.dumps(RECORD))
    result = infer(CLI | {"ckpt_path": folder / "model.pt", "output_dir": tmp_path / "O", "num_samples": 1})
    assert result.returncode == 1
    assert "stem.weight: checkpoint (8, 1, 3, 3, 3) vs network (8, 2, 3, 3, 3)" in result.stderr


def _checkpoint_with_record(checkpoint: Path, folder: Path, record: dict | None) -> Path:
    """A copy of ``checkpoint``'s weights in ``folder``, with ``record`` as its run.json (none when None)."""
    folder.mkdir()
    (folder / "model.pt").write_bytes(checkpoint.read_bytes())
    if record is not None:
        (folder / RUN_RECORD).write_text(json.dumps(record))
    return folder / "model.pt"


@pytest.mark.parametrize(
    "record, message",
    [
        (record_of(s=0.05), "The noise schedule differs from the one"),
        (
            RECORD | {"noise_scheduler": RECORD["noise_scheduler"] | {"prediction_type": "v_prediction"}},
            "says the model predicts 'v_prediction', but the scheduler's prediction_type is epsilon",
        ),
        (None, "There is no run.json beside"),
        (RECORD | {"network": None}, "does not record its network's constructor arguments"),
    ],
)
def test_a_checkpoint_whose_record_cannot_rebuild_it_is_refused(checkpoint, tmp_path, record, message):
    """The sampler built from the record is checked against its prediction type and ᾱ (a schedule whose arguments the
    training run overrode), and a checkpoint without a record, or a record without the network, is refused, all
    before any work."""
    ckpt = _checkpoint_with_record(checkpoint, tmp_path / "other", record)
    result = infer(CLI | {"ckpt_path": ckpt, "output_dir": tmp_path / "O", "num_samples": 1})
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "O").exists()


@pytest.mark.parametrize("sampler, steps", [("pndm", "3/3"), ("dpm_solver", "3/3"), ("ddpm", "50/50")])
def test_every_configured_sampler_samples(checkpoint, tmp_path, sampler, steps):
    """--sampler picks an entry of inference.json's samplers; DDPM runs the full chain of T steps by default."""
    overrides = {k: v for k, v in CLI.items() if not (sampler == "ddpm" and k == "num_inference_steps")}
    result = infer(
        overrides | {"ckpt_path": checkpoint, "output_dir": tmp_path / "O", "num_samples": 1, "sampler": sampler}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps in result.stderr  # the progress bar over the chain's steps
    data = nib.load(tmp_path / "O" / "sample_000_t2.nii.gz").get_fdata()
    assert data.min() >= 0 and data.max() <= 1 and data.std() > 0


@pytest.fixture(scope="module")
def linear_beta_run(tmp_path_factory) -> Path:
    """The ckpt_dir of a one-epoch training run on ``--schedule linear_beta`` (T = 50)."""
    root = tmp_path_factory.mktemp("linear_beta")
    write_ellipsoid_phantoms(root / "D", num_cases=2, shape=(20, 20, 16))
    result = run_bundle(
        "configs/train.json",
        SMALL_TRAINING
        | {
            "dataset_dir": root / "D",
            "ckpt_dir": root / "C",
            "output_dir": root / "R",
            "schedule": "linear_beta",
            "num_train_timesteps": "50",
            "train#trainer#max_epochs": "1",
        },
        "training",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "C"


def test_a_model_trained_on_another_schedule_samples_with_it_and_only_with_it(linear_beta_run, tmp_path):
    """No flag names the schedule: the record does; naming another is refused."""
    record = json.loads((linear_beta_run / RUN_RECORD).read_text())
    assert record["noise_scheduler"]["schedule"] == "linear_beta"
    base = CLI | {"ckpt_path": linear_beta_run / "model.pt", "num_samples": 1}
    refused = infer(base | {"output_dir": tmp_path / "P", "schedule": "cosine"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "pass --schedule linear_beta" in refused.stderr and not (tmp_path / "P").exists()
    for sampler in ("ddim", "pndm"):
        result = infer(base | {"output_dir": tmp_path / sampler, "sampler": sampler})
        assert result.returncode == 0, result.stderr[-3000:]
        image = nib.load(tmp_path / sampler / "sample_000_t1.nii.gz")
        np.testing.assert_allclose(image.affine, record["affine"])
        assert image.get_fdata().min() >= 0 and image.get_fdata().max() <= 1


def test_an_output_dir_that_is_a_file_is_refused_before_the_checkpoint_is_read(tmp_path):
    afile = tmp_path / "samples"
    afile.write_text("notes")
    refusals = ((afile, "output_dir '" + str(afile) + "' is a file"), (afile / "x", "cannot be created"))
    for output_dir, message in refusals:
        result = infer(CLI | {"ckpt_path": tmp_path / "missing.pt", "output_dir": output_dir, "num_samples": 1})
        assert result.returncode == 1 and message in result.stderr
        assert "does not exist" not in result.stderr  # the checkpoint was not looked at
    assert afile.read_text() == "notes"
