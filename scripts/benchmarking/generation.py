"""Does a trained model generate volumes like its data? IDM and MONAI's ``DiffusionModelUNet`` (matched parameter
count, the quality benchmark's pairing) trained by ``configs/train.json`` on the built-in phantoms with the generation
monitor on (:class:`bundle.handlers.GenerationMonitor`): the generation measures against the validation volumes over
training, samples of the final models beside real volumes, and the measures side by side at equal steps.

Both trainings run at once, one torch thread each (two cores), so their wall times compare. Optionally the IDM run
is then trained on, as a resume of a copy of it, to a longer schedule (the cosine learning rate continued over the new
length): what more steps buy.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDIMScheduler
from PIL import Image

from bundle.checkpoint import load_checkpoint
from bundle.data import training_cases
from bundle.diffusion import DiffusionSampler, GridDDIMScheduler, noise_schedule
from bundle.sample_quality import compare_to_real, distance_ratio
from bundle.visualize import read_scalars

from .child_process import BUNDLE_ROOT
from .quality import ATTEMPTS, NETWORKS, STEP_TAG, TRAIN_CONFIG, network_definitions, parameter_count, train_run
from .report import machine_description, markdown_table
from .workload import Workload

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["compare_generation", "recipe", "render_generation_markdown", "write_generation_report"]

CURVES_FIGURE = "generation_curves.png"
SAMPLES_FIGURE = "generation_samples.png"
PROGRESS_FIGURE = "generation_progress.png"
CURVE_MEASURES = ("autocorrelation/t1", "histogram/t1", "power_spectrum/t2", "correlation/t1_t2", "mmd")
CONTINUED = "idm_continued"  # the IDM run trained on to a longer schedule
SHORT = {"idm": "IDM", "monai": "MONAI", CONTINUED: "IDM, longer"}  # labels in the figures
DONE = "done.json"  # written beside a finished run: its wall seconds (a rerun with the same work_dir reuses it)
TEMPLATE_POPULATION = (
    "The built-in brains are one template, the MNI ICBM152 2009 average of 152 healthy young adults, deformed "
    "smoothly per case, with a synthetic tumour and this bundle's own contrasts, bias field and noise "
    "(`bundle.data.anatomy`). A model that comes close to them has learned that family: the template's anatomy under "
    "deformation and the contrast and tumour models, at the study's grid (at 6 mm the cortex is a voxel or two "
    "thick). It has not seen what separates patients: age and atrophy, real tumours' shapes, mass effect and "
    "enhancement, scanners, protocols and artefacts. These figures therefore show that training, sampling and the "
    "measures work on brain-shaped data and how the two networks compare at an equal budget; they are not figures "
    "of quality on BraTS, where both the data and its real-vs-real spread are wider."
)


def run_config(run_dir: Path) -> ConfigParser:
    """``configs/train.json`` with the overrides that trained ``run_dir``, as a resume of it reads them (its recorded
    validation cases, no phantoms written)."""
    parser = ConfigParser()
    parser.read_config(BUNDLE_ROOT / TRAIN_CONFIG)
    parser.update(json.loads((run_dir / "args.json").read_text()) | {"resume": True})
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


def validation_volumes(run_dir: Path) -> torch.Tensor:
    """(N, C, *S) validation volumes in [0, 1] of the run in ``run_dir``, preprocessed as its training read them."""
    dataset = run_config(run_dir).get_parsed_content("validate#dataset")
    return torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(len(dataset))]).float()


SAMPLERS = {  # the final models are sampled by each: (scheduler class, steps), on the run's T and schedule (the
    # full DDPM chain and the few-step samplers: the sampling study, docs/sampling.md)
    "bundle DDIM η = 1, 200 steps (the monitor's)": (partial(GridDDIMScheduler, eta=1.0), 200),
    "bundle DDIM η = 0, 50 steps": (GridDDIMScheduler, 50),
    "MONAI DDIMScheduler η = 0, 50 steps": (DDIMScheduler, 50),
}
FINAL_SAMPLER = next(iter(SAMPLERS))  # the one of the figures and the final measures: the generation monitor's


def final_model(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The run's ``model.pt`` (its EMA weights) in its network, and ``{"num_train_timesteps", "schedule", "shape"}``
    (shape: (C, *S)) of the run."""
    parser = run_config(run_dir)
    network = load_checkpoint(parser.get_parsed_content("network_def"), run_dir / "models" / "model.pt").eval()
    return network, {
        "num_train_timesteps": parser.get_parsed_content("num_train_timesteps"),
        "schedule": noise_schedule(parser.get_parsed_content("schedule")),
        "shape": (len(parser.get_parsed_content("modalities")), *parser.get_parsed_content("spatial_size")),
    }


def final_samples(
    model: tuple[torch.nn.Module, dict], num_samples: int, seed: int, sampler: str = FINAL_SAMPLER
) -> torch.Tensor:
    """(num_samples, C, *S) samples in [0, 1] of a :func:`final_model` by ``sampler`` (a key of :data:`SAMPLERS`; at
    most T steps) on the run's T and schedule, four at a time."""
    network, run = model
    total = run["num_train_timesteps"]
    scheduler_class, steps = SAMPLERS[sampler]
    scheduler = scheduler_class(num_train_timesteps=total, schedule=run["schedule"])
    chain = DiffusionSampler(scheduler, min(steps or total, total), seed=seed, progress=False)
    return chain.draw(network, num_samples, run["shape"], batch_size=4)


def _curves(run_dir: Path, steps_per_epoch: int, measures: Sequence[str]) -> dict:
    """The run's generation scalars of ``measures`` (each with its real spread), the fraction within the spread, the
    validation ε-MSE, and the :func:`~bundle.sample_quality.distance_ratio` of ``measures`` at each check that has
    them all, against training steps: ``{tag: [(step, value), …]}``."""
    tags = ["generation/within_spread", "val_eps_mse"]
    tags += [f"generation/{m}{suffix}" for m in measures for suffix in ("", "_real_spread")]
    curves = {
        tag: [(epoch * steps_per_epoch, value) for epoch, value in values]
        for tag, values in read_scalars(run_dir / "runs", tags).items()
    }
    at = {tag: dict(curve) for tag, curve in curves.items()}
    checked = set.intersection(
        *[set(at.get(f"generation/{m}{suffix}", ())) for m in measures for suffix in ("", "_real_spread")]
    )
    curves["generation/distance_ratio"] = [
        (
            step,
            distance_ratio(
                {
                    m: {
                        "generated_vs_real": at[f"generation/{m}"][step],
                        "real_vs_real_max": at[f"generation/{m}_real_spread"][step],
                    }
                    for m in measures
                }
            ),
        )
        for step in sorted(checked)
    ]
    return curves


def monitor_images(run_dir: Path, steps_per_epoch: int) -> dict[int, np.ndarray]:
    """``{step: image}``: the generation monitor's ``generation_samples`` images of the run (rows T1 and T2, a column
    per sample: the same noise at every check), as grey-scale arrays in [0, 1]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for events in sorted((run_dir / "runs").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        if "generation_samples" in accumulator.Tags()["images"]:
            for event in accumulator.Images("generation_samples"):
                with Image.open(io.BytesIO(event.encoded_image_string)) as image:
                    images[event.step * steps_per_epoch] = np.asarray(image.convert("L"), dtype=np.float32) / 255
    return images


def first_step_within(curves: Mapping, fraction: float = 1.0) -> int | None:
    """The first checked step at which at least ``fraction`` of the measures were within the real-vs-real spread."""
    return next((step for step, value in curves["generation/within_spread"] if value >= fraction - 1e-9), None)


def train_once(run_dir: Path, overrides: Mapping, num_threads: int | None = None) -> float:
    """:func:`~scripts.benchmarking.quality.train_run` of ``overrides`` in ``run_dir`` unless it finished earlier
    (its :data:`DONE` marker, written here); the run's wall seconds."""
    if (run_dir / DONE).exists():
        return json.loads((run_dir / DONE).read_text())["wall_seconds"]
    seconds = train_run(run_dir, overrides, num_threads)
    (run_dir / DONE).write_text(json.dumps({"wall_seconds": seconds}))
    return seconds


def continue_run(source: Path, target: Path, epochs: int) -> float:
    """Trains the finished run in ``source`` on to ``epochs`` epochs: a copy of it in ``target`` (made once, without its
    wall times), resumed by :func:`train_once` on one torch thread. An interrupted continuation resumes again, and a
    finished one asked for more epochs goes on to them (the cosine learning rate continued over the new length).
    Returns the continuation's wall seconds, over all its attempts."""
    if not target.exists():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(DONE, ATTEMPTS))
    args = json.loads((target / "args.json").read_text())
    if args["train#trainer#max_epochs"] < epochs:
        (target / DONE).unlink(missing_ok=True)
    overrides = {k: v for k, v in args.items() if k not in ("ckpt_dir", "output_dir")}
    overrides["train#trainer#max_epochs"] = max(epochs, args["train#trainer#max_epochs"])
    # the folders train_run gives it: the copy's own
    dirs = {"ckpt_dir": str(target / "models"), "output_dir": str(target / "runs")}
    (target / "args.json").write_text(json.dumps(overrides | dirs, indent=1))
    return train_once(target, overrides, num_threads=1)


def _summary(
    run_dir: Path,
    label: str,
    parameters: int,
    wall_seconds: float,
    real: torch.Tensor,
    num_samples: int,
    final_samples_count: int,
    seed: int,
    steps_per_epoch: int,
) -> tuple[dict, torch.Tensor]:
    """One network's entry of :func:`compare_generation`'s ``networks`` and its final samples."""
    model = final_model(run_dir)
    samples = final_samples(model, final_samples_count, seed)
    final = compare_to_real(samples, real, ["t1", "t2"], seed=seed)
    by_sampler = {
        sampler: compare_to_real(final_samples(model, num_samples, seed, sampler), real, ["t1", "t2"], seed=seed)
        for sampler in list(SAMPLERS)[1:]
    }
    curves = _curves(run_dir, steps_per_epoch, list(final["measures"]))
    trained = read_scalars(run_dir / "runs", [STEP_TAG])[STEP_TAG][-1][0]
    return {
        "label": label,
        "parameters": parameters,
        "wall_seconds": wall_seconds,
        "steps": trained,
        "seconds_per_step": wall_seconds / trained,
        "curves": curves,
        "first_within": first_step_within(curves),
        "first_within_90": first_step_within(curves, 0.9),
        "final": final,
        "samplers": {FINAL_SAMPLER: final} | by_sampler,
    }, samples


def recipe(
    steps: int = 1200,
    check_every: int = 400,
    spatial_size: int | Sequence[int] = (28, 32, 28),
    spacing: float | None = 6.0,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    ema_decay: float = 0.995,
    num_train_timesteps: int = 1000,
    num_phantoms: int = 256,
    val_fraction: float = 0.25,
    num_samples: int = 8,
    seed: int = 0,
) -> tuple[dict, dict]:
    """The ``configs/train.json`` overrides of the README's recipe (with these defaults), less the network: the grid
    (``spatial_size``, one size or three; ``spacing`` in mm for the native grid, None to resize each case's box),
    epochs of whole ``steps_per_epoch`` as near ``steps`` as whole checks allow, a validation and a generation check
    every ``epochs_per_check`` epochs (≈ ``check_every`` steps). Returns the overrides and ``{"epochs",
    "steps_per_epoch", "epochs_per_check"}``."""
    num_train = num_phantoms - max(1, round(num_phantoms * val_fraction))
    steps_per_epoch = math.ceil(num_train / batch_size)
    epochs_per_check = max(1, round(check_every / steps_per_epoch))
    epochs = max(epochs_per_check, round(steps / steps_per_epoch / epochs_per_check) * epochs_per_check)
    overrides = {
        "spatial_size": [spatial_size] * 3 if isinstance(spatial_size, int) else list(spatial_size),
        "spacing": spacing,
        "batch_size": batch_size,
        "seed": seed,
        "num_phantoms": num_phantoms,
        "val_fraction": val_fraction,
        "learning_rate": learning_rate,
        "ema_decay": ema_decay,
        "num_train_timesteps": num_train_timesteps,
        "train#trainer#max_epochs": epochs,
        "val_interval": epochs_per_check,
        "generation_interval": epochs_per_check,
        "generation_samples": num_samples,
    }
    return overrides, {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "epochs_per_check": epochs_per_check}


def compare_generation(
    work_dir: str | Path,
    channels: Sequence[int] = (16, 32, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_blocks: int = 2,
    final_samples_count: int = 16,
    continue_steps: int = 0,
    **recipe_settings,
) -> dict:
    """Trains both networks (concurrently, one torch thread each; a network whose run in ``work_dir`` finished
    earlier is reused) by :func:`recipe` of ``recipe_settings`` (its keyword arguments: ``steps``, ``check_every``,
    ``spatial_size``, ``spacing``, ``num_samples`` …; its defaults are README.md's recipe), with the generation
    monitor's ``num_samples`` samples every ``check_every`` steps, then samples ``final_samples_count`` volumes from
    each final model with the monitor's sampler and ``num_samples`` with each other sampler of :data:`SAMPLERS`, and
    compares them with the validation volumes. With ``continue_steps`` (more than ``steps``) the IDM run is then
    trained on to :func:`recipe`'s epochs for that many steps (:func:`continue_run`, in ``work_dir/idm_continued``)
    and measured the same way (``networks["idm_continued"]``, whose wall seconds include the first run's).

    Returns:
        ``{"settings", "machine", "networks": {name: {"label", "parameters", "wall_seconds", "steps",
        "seconds_per_step", "curves", "first_within", "first_within_90", "final", "samplers"}}, "figures",
        "num_real"}`` and, for :func:`write_generation_report`, ``_samples``, ``_real`` and ``_images``; ``final`` and
        each of ``samplers`` is :func:`~bundle.sample_quality.compare_to_real` of the final model's samples.
    """
    work = Path(work_dir)
    overrides, schedule = recipe(**recipe_settings)
    seed, num_samples = overrides["seed"], overrides["generation_samples"]
    settings = {
        "spatial_size": overrides["spatial_size"],
        "spacing": overrides["spacing"],
        "channels": list(channels),
        "attention_levels": list(attention_levels),
        "num_blocks": num_blocks,
        **{
            key: overrides[key]
            for key in (
                "batch_size",
                "learning_rate",
                "ema_decay",
                "num_train_timesteps",
                "num_phantoms",
                "val_fraction",
            )
        },
        "num_samples": num_samples,
        "final_samples": final_samples_count,
        "seed": seed,
        **schedule,
    }
    steps_per_epoch = schedule["steps_per_epoch"]
    shared = overrides | {"num_workers": 0, "preview_interval": 1000, "dataset_dir": str(work / "data")}
    # the built-in brains, written once outside the timed runs
    training_cases(
        work / "data",
        seed=seed,
        num_phantoms=overrides["num_phantoms"],
        spatial_size=overrides["spatial_size"],
        spacing=overrides["spacing"],
    )
    workload = Workload(
        "idm",
        max(overrides["spatial_size"]),
        channels=tuple(channels),
        num_blocks=num_blocks,
        attention_levels=tuple(attention_levels),
    )
    definitions = network_definitions(workload)

    def train(name: str) -> float:
        return train_once(work / name, shared | {"network_def": definitions[name]}, num_threads=1)

    with ThreadPoolExecutor(len(definitions)) as pool:
        walls = dict(zip(definitions, pool.map(train, definitions), strict=True))
    real = validation_volumes(work / "idm")
    networks, samples, images = {}, {}, {}
    for name, definition in definitions.items():
        networks[name], samples[name] = _summary(
            work / name,
            NETWORKS[name],
            parameter_count(definition),
            walls[name],
            real,
            num_samples,
            final_samples_count,
            seed,
            steps_per_epoch,
        )
        images[name] = monitor_images(work / name, steps_per_epoch)
    if continue_steps:
        epochs = recipe(**(recipe_settings | {"steps": continue_steps}))[1]["epochs"]
        if epochs <= schedule["epochs"]:
            raise ValueError(
                f"continue_steps={continue_steps} gives {epochs} epochs, not more than the "
                f"{schedule['epochs']} of steps={recipe_settings.get('steps')}."
            )
        seconds = continue_run(work / "idm", work / CONTINUED, epochs)
        networks[CONTINUED], samples[CONTINUED] = _summary(
            work / CONTINUED,
            f"{NETWORKS['idm']}, trained on to {epochs} epochs",
            parameter_count(definitions["idm"]),
            walls["idm"] + seconds,
            real,
            num_samples,
            final_samples_count,
            seed,
            steps_per_epoch,
        )
        settings["continued_epochs"] = epochs
    figures = {"curves": CURVES_FIGURE, "samples": SAMPLES_FIGURE, "progress": PROGRESS_FIGURE}
    result = {
        "settings": settings,
        "machine": machine_description(),
        "networks": networks,
        "figures": figures,
        "num_real": len(real),
    }
    return result | {"_samples": samples, "_real": real, "_images": images}


def grid_in_words(settings: Mapping) -> str:
    """The study's training grid in words: ``28×32×28 voxels of 6.0 mm (the native grid)`` or ``16×16×16 (each
    case's head box resized)``."""
    size = "×".join(map(str, settings["spatial_size"]))
    if settings.get("spacing"):
        return f"{size} voxels of {settings['spacing']} mm (the native grid)"
    return f"{size} (each case's head box resized)"


def _views(volume: torch.Tensor) -> np.ndarray:
    """The axial, coronal and sagittal mid-slices of ``volume`` (X, Y, Z, RAS) side by side, each shown with the
    patient's head up and padded to a common height."""
    x, y, z = (n // 2 for n in volume.shape)
    slices = [volume[:, :, z].T.flip(0), volume[:, y, :].T.flip(0), volume[x, :, :].T.flip(0)]
    height = max(s.shape[0] for s in slices)
    padded = [torch.nn.functional.pad(s, (0, 1, 0, height - s.shape[0])) for s in slices]
    return torch.cat(padded, dim=1).numpy()


def plot_samples(real: torch.Tensor, samples: Mapping[str, torch.Tensor], path: Path, columns: int = 4) -> None:
    """Axial, coronal and sagittal mid-slices (:func:`_views`): rows real T1, real T2, then each network's T1 and T2
    (labelled by :data:`SHORT`, or by the key of ``samples``); ``columns`` volumes per row."""
    sets = {"real": real, **{SHORT.get(name, name): s for name, s in samples.items()}}
    columns = min(columns, *[len(volumes) for volumes in sets.values()])
    fig, axes = plt.subplots(2 * len(sets), columns, figsize=(2.6 * columns, 1.1 * 2 * len(sets)), squeeze=False)
    for r, (label, volumes) in enumerate(sets.items()):
        for c, modality in enumerate(("T1", "T2")):
            row = 2 * r + c
            for col in range(columns):
                image = _views(volumes[col, c])
                axes[row][col].imshow(image, cmap="gray", vmin=0, vmax=1)
                axes[row][col].set_xticks([])
                axes[row][col].set_yticks([])
            axes[row][0].set_ylabel(f"{label}\n{modality}", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_progress(images: Mapping[str, Mapping[int, np.ndarray]], path: Path, rows: int = 6) -> None:
    """The monitor's samples at ``rows`` checks spread over training (the same noise at each), one column per
    network: in each cell the first samples' axial mid-slices, T1 above T2."""
    steps = sorted(set.intersection(*[set(i) for i in images.values()]))
    chosen = (
        steps if len(steps) <= rows else sorted({steps[round(k * (len(steps) - 1) / (rows - 1))] for k in range(rows)})
    )
    fig, axes = plt.subplots(len(chosen), len(images), figsize=(3.3 * len(images), 1.75 * len(chosen)), squeeze=False)
    for col, (name, per_step) in enumerate(images.items()):
        for row, step in enumerate(chosen):
            axes[row][col].imshow(per_step[step], cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
            axes[row][0].set_ylabel(f"step {step}", fontsize=8)
        axes[0][col].set_title(SHORT[name], fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(result: dict, path: Path) -> None:
    """Fraction of measures within the spread, the distance ratio (1: the spread's edge), validation ε-MSE and a few
    measures (with the real spread) vs steps."""
    panels = [
        "generation/within_spread",
        "generation/distance_ratio",
        "val_eps_mse",
        *[f"generation/{m}" for m in CURVE_MEASURES],
    ]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(3.6 * cols, 2.9 * 2), squeeze=False)
    for ax, tag in zip(axes.flat, panels, strict=False):  # the grid may have more cells than panels
        for name, run in result["networks"].items():
            if tag in run["curves"]:
                x, y = zip(*run["curves"][tag], strict=True)
                ax.plot(x, y, marker="o", markersize=2, label=SHORT[name])
            spread = run["curves"].get(f"{tag}_real_spread")
            if spread and name == "idm":
                x, y = zip(*spread, strict=True)
                ax.plot(x, y, color="grey", linestyle="--", label="real vs real (max)")
        if tag == "generation/distance_ratio":
            ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_title(tag.removeprefix("generation/"), fontsize=9)
        ax.set_xlabel("training steps", fontsize=8)
        ax.grid(alpha=0.3)
        if tag == "generation/within_spread":
            ax.set_ylim(-0.05, 1.05)
        elif tag not in ("val_eps_mse", "generation/correlation/t1_t2", "generation/mmd"):  # MMD can dip below 0
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    axes.flat[3].legend(fontsize=7)  # a panel with the real-vs-real line
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _at_step(curve: Sequence, step: int) -> float | None:
    return dict(curve).get(step)


def _sampler_rows(runs: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sampler table: per sampler, each network's fraction within the spread, distance ratio
    and T1 autocorrelation."""
    header = ["sampler", *[f"{SHORT[n]} within" for n in runs], *[f"{SHORT[n]} dist. ratio" for n in runs]]
    header += [f"{SHORT[n]} autocorr. T1" for n in runs]
    rows = []
    for sampler in runs["idm"]["samplers"]:
        results = [run["samplers"][sampler] for run in runs.values()]
        rows.append(
            [
                sampler,
                *[f"{r['within_spread']:.2f}" for r in results],
                *[f"{r['distance_ratio']:.2f}" for r in results],
                *[f"{r['statistics']['autocorrelation/t1']['generated']:.3f}" for r in results],
            ]
        )
    return header, rows


def render_generation_markdown(result: dict, command: str) -> str:
    """``docs/generation.md``: the settings, the samples figure, the curves, steps to data-like and the tables."""
    s, runs = result["settings"], result["networks"]
    idm, monai = runs["idm"], runs["monai"]
    rows = []
    for name, m in idm["final"]["measures"].items():
        other = monai["final"]["measures"][name]
        rows.append(
            [
                name,
                f"{m['generated_vs_real']:.4g}",
                f"{other['generated_vs_real']:.4g}",
                f"{m['real_vs_real_mean']:.4g}",
                f"{m['real_vs_real_max']:.4g}",
                ("✓" if m["within_spread"] else "✗") + " / " + ("✓" if other["within_spread"] else "✗"),
            ]
        )
    monai_statistics = monai["final"]["statistics"]
    stats = [
        [name, f"{v['real']:.3f}", f"{v['generated']:.3f}", f"{monai_statistics[name]['generated']:.3f}"]
        for name, v in idm["final"]["statistics"].items()
    ]
    checks = sorted(dict(idm["curves"]["generation/within_spread"]))
    shown = sorted(set(checks[:: max(1, len(checks) // 8)]) | {checks[-1]})
    per_step = [
        [step]
        + [f"{_at_step(runs[n]['curves']['generation/within_spread'], step):.2f}" for n in NETWORKS]
        + [f"{_at_step(runs[n]['curves']['generation/distance_ratio'], step):.2f}" for n in NETWORKS]
        + [f"{_at_step(runs[n]['curves']['generation/autocorrelation/t1'], step):.3f}" for n in NETWORKS]
        + [f"{_at_step(runs[n]['curves']['val_eps_mse'], step) or float('nan'):.3f}" for n in NETWORKS]
        for step in shown
    ]
    spread = idm["curves"]["generation/autocorrelation/t1_real_spread"][-1][1]

    def reached(run: dict, key: str) -> str:
        step = run[key]
        return "not reached" if step is None else f"{step} steps ({step * run['seconds_per_step'] / 60:.0f} min)"

    timing = [
        [
            r["label"],
            f"{r['parameters'] / 1e6:.3f}M",
            r["steps"],
            f"{r['wall_seconds'] / 60:.1f}",
            f"{r['seconds_per_step']:.2f}",
            reached(r, "first_within_90"),
            reached(r, "first_within"),
        ]
        for r in runs.values()
    ]
    last = min(idm["steps"], monai["steps"])
    last_check = max(step for step, _ in idm["curves"]["generation/within_spread"] if step <= last)
    at_last = {n: _at_step(runs[n]["curves"]["generation/within_spread"], last_check) for n in NETWORKS}

    def milestone(name: str) -> str:
        curve = runs[name]["curves"]["generation/within_spread"]
        best = max(value for _, value in curve)
        first = next(step for step, value in curve if value == best)
        minutes = first * runs[name]["seconds_per_step"] / 60
        parts = (
            [f"at best {best:.0%} of the measures within the spread, first at step {first} ({minutes:.0f} min)"]
            if best > 0
            else ["no measure within the spread at any check"]
        )
        parts += [
            f"{share} within: {reached(runs[name], key)}"
            for share, key in (("90%", "first_within_90"), ("all", "first_within"))
        ]
        return f"{SHORT[name]}: " + "; ".join(parts)

    findings = (
        f"**Findings.** {milestone('idm')}. {milestone('monai')}. At step {last_check}, the last check of "
        f"both, {at_last['idm']:.0%} of the measures are within the spread for IDM and "
        f"{at_last['monai']:.0%} for MONAI's network; the final IDM samples have "
        f"{idm['final']['within_spread']:.0%} within, MONAI's {monai['final']['within_spread']:.0%}, at distance "
        f"ratios {idm['final']['distance_ratio']:.2f} and {monai['final']['distance_ratio']:.2f} (1: the spread's "
        "edge; lower is closer to the data)."
    )
    if CONTINUED in runs:
        longer = runs[CONTINUED]
        findings += (
            f" Trained on to {longer['steps']} steps, IDM: {milestone(CONTINUED).split(': ', 1)[1]}; its "
            f"final samples have {longer['final']['within_spread']:.0%} within."
        )
    return (
        "\n\n".join(
            [
                "# Generation: does a trained model generate volumes like its data?",
                findings,
                (
                    f"Command: `{command}`  \nMachine: {result['machine']}; both trainings ran at once, one torch "
                    "thread each."
                ),
                (
                    f"Both networks trained by `configs/train.json` on {s['num_phantoms']} built-in synthetic brains "
                    f"(`bundle.data.anatomy`) at {grid_in_words(s)} "
                    f"({round(s['num_phantoms'] * s['val_fraction'])} held out for validation), batch "
                    f"{s['batch_size']}, AdamW lr "
                    f"{s['learning_rate']} with cosine annealing over {s['epochs']} epochs ({s['steps_per_epoch']} "
                    "steps each), "
                    f"T = {s['num_train_timesteps']} (cosine schedule), EMA {s['ema_decay']}, seed {s['seed']}; only "
                    f"`network_def` differs (IDM channels {tuple(s['channels'])}, {s['num_blocks']} blocks per "
                    "level, attention "
                    f"{tuple(s['attention_levels'])}; MONAI's `DiffusionModelUNet` the leanest within ±10% of its "
                    "parameters). "
                    f"Every {s['epochs_per_check'] * s['steps_per_epoch']} steps the generation monitor "
                    f"(`--generation_interval {s['epochs_per_check']}`) drew {s['num_samples']} samples (DDIM with η "
                    "= 1, 200 "
                    "steps, the same noise each time, EMA weights) and compared them with the validation volumes "
                    "(`bundle.sample_quality.compare_to_real`: each measure against the largest distance between two "
                    "random "
                    "halves of the real volumes over 10 splits)."
                ),
                "## What these figures can show",
                TEMPLATE_POPULATION,
                "## Samples of the final models beside real volumes",
                (
                    "Axial, coronal and sagittal mid-slices of each volume; first rows: validation volumes; then the "
                    f"first samples of {s['final_samples']} per network (seed 0)."
                ),
                f"![samples]({SAMPLES_FIGURE})",
                "## Samples over training",
                (
                    "The generation monitor's first samples at checks spread over training, each from the same noise "
                    "(axial "
                    "mid-slices, T1 above T2):"
                ),
                f"![samples over training]({PROGRESS_FIGURE})",
                "## Steps to data-like",
                (
                    "*Data-like* here: all 12 measures within the real-vs-real spread at a check (also given: "
                    "90%, i.e. 11 of "
                    "12). Minutes are steps × the run's mean wall seconds per step (validation and monitor included)."
                ),
                markdown_table(
                    ["network", "params", "steps", "wall min", "s/step", "≥ 90% within", "all within"], timing
                ),
                "## Over training",
                f"![curves]({CURVES_FIGURE})",
                (
                    "Fraction of the measures within the spread, distance ratio (each measure's distance over its "
                    "real-vs-real max, geometric mean: `bundle.sample_quality.distance_ratio`; 1 is the spread's "
                    "edge), T1 lag-1 autocorrelation distance (real-vs-real max at the end "
                    f"{spread:.3f}) and validation ε-MSE, at equal steps:"
                ),
                markdown_table(
                    [
                        "step",
                        "IDM within",
                        "MONAI within",
                        "IDM dist. ratio",
                        "MONAI dist. ratio",
                        "IDM autocorr. dist.",
                        "MONAI autocorr. dist.",
                        "IDM ε-MSE",
                        "MONAI ε-MSE",
                    ],
                    per_step,
                ),
                (
                    f"## Final measures ({s['final_samples']} samples per network against {result['num_real']} "
                    "validation volumes)"
                ),
                (
                    "Distance generated-vs-real (mean over 10 splits into sets of "
                    f"{idm['final']['set_size']}) beside the real-vs-real distance (mean and max over the same "
                    "splits); "
                    "✓: within the spread (IDM / MONAI)."
                ),
                markdown_table(["measure", "IDM", "MONAI", "real vs real mean", "real vs real max", "within"], rows),
                "Set means of the interpretable statistics:",
                markdown_table(["statistic", "real", "IDM", "MONAI"], stats),
                "## The same final models, other samplers",
                (
                    "The measures within the spread and the T1 lag-1 autocorrelation (real: "
                    f"{idm['final']['statistics']['autocorrelation/t1']['real']:.3f}) of the final models' samples, "
                    "the same "
                    "noise, by each sampler. MONAI's DDIM steps with ε̂ beside the clipped x̂₀; the bundle's with "
                    "the noise "
                    "that the clipped x̂₀ implies (`GridDDIMScheduler`'s docstring: near zero signal-to-noise the first "
                    "diverges). The full DDPM chain and the few-step solvers: [sampling.md](sampling.md)."
                ),
                markdown_table(*_sampler_rows(runs)),
                *(_continued_section(result) if CONTINUED in runs else []),
            ]
        )
        + "\n"
    )


def _continued_section(result: dict) -> list[str]:
    """The markdown blocks of the IDM run trained on (:func:`continue_run`)."""
    s, idm, longer = result["settings"], result["networks"]["idm"], result["networks"][CONTINUED]
    curves = longer["curves"]
    after = [step for step, _ in curves["generation/within_spread"] if step > idm["steps"]]
    shown = sorted(set(after[:: max(1, len(after) // 8)]) | {after[-1]})
    measure = "generation/histogram/t2"
    per_step = [
        [
            step,
            f"{_at_step(curves['generation/within_spread'], step):.2f}",
            f"{_at_step(curves[measure], step):.4f}",
            f"{_at_step(curves[measure + '_real_spread'], step):.4f}",
            f"{_at_step(curves['val_eps_mse'], step) or float('nan'):.4f}",
        ]
        for step in shown
    ]
    rows = [
        [
            name,
            f"{m['generated_vs_real']:.4g}",
            f"{idm['final']['measures'][name]['generated_vs_real']:.4g}",
            f"{m['real_vs_real_max']:.4g}",
            ("✓" if m["within_spread"] else "✗")
            + " / "
            + ("✓" if idm["final"]["measures"][name]["within_spread"] else "✗"),
        ]
        for name, m in longer["final"]["measures"].items()
    ]
    stats = [
        [name, f"{v['real']:.3f}", f"{idm['final']['statistics'][name]['generated']:.3f}", f"{v['generated']:.3f}"]
        for name, v in longer["final"]["statistics"].items()
    ]
    return [
        f"## IDM trained on to {longer['steps']} steps",
        (
            f"The IDM run above resumed from its last checkpoint with `--train#trainer#max_epochs "
            f"{s['continued_epochs']} --resume true`: the cosine learning rate continues over the new length (it "
            f"restarts at half its initial value), the data, the monitor and every other setting unchanged (the "
            "same noise for the monitor's samples). Its curves in the figure above are the line that goes on. Wall "
            f"time of both parts: {longer['wall_seconds'] / 60:.0f} min, on a machine running other jobs as well."
        ),
        markdown_table(["step", "within", "histogram/t2", "its real-vs-real max", "val ε-MSE"], per_step),
        (
            f"Final measures ({s['final_samples']} samples by the monitor's sampler, against {result['num_real']} "
            f"validation volumes), beside those of the run at {idm['steps']} steps; ✓: within the spread (longer / "
            f"{idm['steps']} steps):"
        ),
        markdown_table(
            ["measure", f"IDM {longer['steps']} steps", f"IDM {idm['steps']} steps", "real vs real max", "within"], rows
        ),
        markdown_table(["statistic", "real", f"IDM {idm['steps']} steps", f"IDM {longer['steps']} steps"], stats),
    ]


def write_generation_report(result: dict, command: str, output_dir: str | Path = "docs") -> Path:
    """Writes ``generation.md``, ``generation.json`` and the two figures to ``output_dir``; returns the markdown."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_samples(result["_real"], result["_samples"], out / SAMPLES_FIGURE)
    plot_curves(result, out / CURVES_FIGURE)
    plot_progress(result["_images"], out / PROGRESS_FIGURE)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    (out / "generation.json").write_text(json.dumps(public, indent=1))
    path = out / "generation.md"
    path.write_text(render_generation_markdown(public, command))
    return path
