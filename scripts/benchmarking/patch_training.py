"""Patch training against whole volumes (Patch Diffusion, Wang et al. 2023, in 3D): the README's generation recipe
trained by ``configs/train.json`` on whole volumes and with ``patch_training``, the same IDM and seed, both runs at once
on one torch thread each so that their wall times compare; then the same on a quarter of the training cases (the same
validation cases). The generation monitor's measures against steps and wall time, and the wall time each run needs
to reach the quality the whole-volume run ends at.

Quality is the monitor's ``distance_ratio`` (each measure's distance to the validation volumes over the real-vs-real
spread, geometric mean; 1 is the spread's edge) as well as the fraction of measures within the spread: while no
measure is within it, the fraction cannot tell two runs apart, the ratio can.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch

from bundle.data import training_cases
from bundle.diffusion import PatchSampler
from bundle.visualize import read_scalars

from .generation import (
    final_model,
    final_samples,
    grid_in_words,
    plot_samples,
    recipe,
    train_once,
    validation_volumes,
)
from .quality import STEP_TAG, network_definitions
from .report import machine_description, markdown_table
from .workload import Workload

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = [
    "compare_patch_training",
    "paper_patch_costs",
    "quarter_dataset",
    "render_patch_markdown",
    "write_patch_report",
]

ARMS = {"whole": "whole volumes", "patches": "patches"}
QUARTER = "_quarter"  # the arms trained on a quarter of the training cases
TAGS = ("generation/distance_ratio", "generation/within_spread", "val_eps_mse")
FIGURE = "patch_training.png"
SAMPLES_FIGURE = "patch_training_samples.png"
GOAL = 2.0  # at least this many times less wall time to the whole-volume run's final quality


def quarter_dataset(cases: Mapping[str, list[dict]], target: Path, seed: int) -> tuple[list[str], int]:
    """A dataset folder ``target`` in BraTS's layout that links the files of a quarter of the ``cases["train"]`` cases
    (drawn by ``seed``) and of every ``cases["validation"]`` one; returns the validation case ids, which the runs on it
    take as their split (``cases#validation_cases``), so that they are measured against the same volumes, and the
    number of training cases."""
    train = cases["train"]
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: max(1, len(train) // 4)]
    folder = target / "MICCAI_BraTS2020_TrainingData"
    folder.mkdir(parents=True, exist_ok=True)
    for record in [train[int(i)] for i in chosen] + cases["validation"]:
        source = Path(record["t1"]).parent
        (folder / source.name).mkdir(exist_ok=True)
        for file in source.iterdir():  # hard links: the same files, found as case folders (symlinks are not followed)
            if not (folder / source.name / file.name).exists():
                (folder / source.name / file.name).hardlink_to(file)
    return [record["case"] for record in cases["validation"]], len(chosen)


def _arm_summary(run_dir: Path, wall_seconds: float, num_samples: int, seed: int) -> dict:
    """One run's curves against steps, its steps, wall seconds and seconds per step, and ``num_samples`` samples of
    its final model (``_samples``)."""
    steps = int(read_scalars(run_dir / "runs", [STEP_TAG])[STEP_TAG][-1][0])
    epochs = int(json.loads((run_dir / "args.json").read_text())["train#trainer#max_epochs"])
    per_epoch = steps // epochs
    curves = {
        tag: [(epoch * per_epoch, value) for epoch, value in values]
        for tag, values in read_scalars(run_dir / "runs", TAGS).items()
    }
    samples = final_samples(final_model(run_dir), num_samples, seed)
    return {
        "wall_seconds": wall_seconds,
        "steps": steps,
        "seconds_per_step": wall_seconds / steps,
        "curves": curves,
        "_samples": samples,
    }


def time_to_quality(run: Mapping, target: float) -> float | None:
    """Wall seconds of ``run`` to its first check with a distance ratio at or below ``target`` (steps × seconds per
    step: the checks' time spread over the steps), None if it never got there."""
    step = next((s for s, value in run["curves"]["generation/distance_ratio"] if value <= target + 1e-9), None)
    return None if step is None else step * run["seconds_per_step"]


def compare_patch_training(
    work_dir: str | Path,
    fractions: Sequence[float] = (0.25, 0.5, 1.0),
    probabilities: Sequence[float] = (0.2, 0.3, 0.5),
    quarter: bool = True,
    channels: Sequence[int] = (16, 32, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_samples: int = 4,
    **recipe_settings,
) -> dict:
    """Trains the whole-volume and the patch run of :func:`~scripts.benchmarking.generation.recipe` of
    ``recipe_settings`` at once (one torch thread each; a run finished earlier in ``work_dir`` is reused, one a
    session left unfinished resumes), then, with ``quarter``, the two again on a quarter of the training cases
    (:func:`quarter_dataset`), and measures each.

    Returns:
        ``{"settings", "machine", "runs": {name: {"wall_seconds", "steps", "seconds_per_step", "curves",
        "_samples"}}, "goal", "_real"}``: ``goal`` gives, per data set, the whole run's final distance ratio, each run's
        wall seconds to it (:func:`time_to_quality`) and their ratio; ``_real``: the validation volumes the figure
        shows.
    """
    work = Path(work_dir)
    overrides, schedule = recipe(**recipe_settings)
    seed = overrides["seed"]
    workload = Workload(
        "idm", max(overrides["spatial_size"]), channels=tuple(channels), attention_levels=tuple(attention_levels)
    )
    shared = overrides | {
        "num_workers": 0,
        "preview_interval": 1000,
        "dataset_dir": str(work / "data"),
        "network_def": network_definitions(workload)["idm"],
    }
    patches = {"patch_training": True, "patch_fractions": list(fractions), "patch_probabilities": list(probabilities)}
    cases = training_cases(  # the built-in brains, written once outside the timed runs
        work / "data",
        seed=seed,
        num_phantoms=overrides["num_phantoms"],
        spatial_size=overrides["spatial_size"],
        spacing=overrides["spacing"],
        val_fraction=overrides["val_fraction"],
    )
    patches["network_def"] = shared["network_def"] | {"coordinates": True}
    arms = {"whole": shared, "patches": shared | patches}
    if quarter:
        validation, num_train = quarter_dataset(cases, work / "data_quarter", seed)
        # the same steps and checks as the runs on every case: epochs of fewer steps, more of them
        scale = schedule["steps_per_epoch"] / math.ceil(num_train / overrides["batch_size"])
        subset = shared | {
            "dataset_dir": str(work / "data_quarter"),
            "cases#validation_cases": validation,
            **{
                key: round(overrides[key] * scale)
                for key in ("train#trainer#max_epochs", "val_interval", "generation_interval")
            },
        }
        arms |= {"whole" + QUARTER: subset, "patches" + QUARTER: subset | patches}
    names = list(arms)
    walls = {}
    for pair in (names[:2], names[2:]):
        with ThreadPoolExecutor(2) as pool:
            runs = pool.map(lambda name: train_once(work / name, arms[name], num_threads=1), pair)
            walls |= dict(zip(pair, runs, strict=True))
    real = validation_volumes(work / "whole")
    results = {name: _arm_summary(work / name, walls[name], num_samples, seed) for name in names}
    goal = {}
    for suffix in ("", QUARTER) if quarter else ("",):
        whole, patched = results["whole" + suffix], results["patches" + suffix]
        target = whole["curves"]["generation/distance_ratio"][-1][1]
        times = {name: time_to_quality(results[name + suffix], target) for name in ARMS}
        goal[suffix or "all"] = {
            "target_distance_ratio": target,
            "seconds": times,
            "speed_up": None if times["patches"] is None else times["whole"] / times["patches"],
            "patches_final_distance_ratio": patched["curves"]["generation/distance_ratio"][-1][1],
        }
    settings = {
        **{k: overrides[k] for k in ("spatial_size", "spacing", "batch_size", "learning_rate", "num_phantoms", "seed")},
        "channels": list(channels),
        "attention_levels": list(attention_levels),
        "patch_fractions": list(fractions),
        "patch_probabilities": list(probabilities),
        "num_train": len(cases["train"]),
        "num_validation": len(cases["validation"]),
        **schedule,
    }
    return {"settings": settings, "machine": machine_description(), "runs": results, "goal": goal, "_real": real}


def paper_patch_costs(
    fractions: Sequence[float] = (0.25, 0.5, 1.0), batch_size: int = 4, num_cases: int = 369
) -> list[dict]:
    """The paper's network on the 1 mm box (192³, recompute_norms, micro-batches of 1, EMA) trained on patches of each
    fraction alone: the patch (rounded to the network's multiple of 64), patches per step, the planned GPU peak of the
    step (``bundle.memory_plan``, FakeTensors: a prediction) and its FLOPs (``FlopCounterMode`` on the meta device),
    and the FLOPs of an epoch of ``num_cases`` cases (BraTS2020's training set) at ``batch_size`` volumes a step."""
    from .flops import training_step_flops
    from .native_resolution import BOX, PAPER, PAPER_WORKLOAD, STEP, _plan

    rows = []
    for fraction in fractions:
        sampler = PatchSampler(BOX, (fraction,), (1.0,), size_divisor=64)
        (count, size) = sampler.batches(batch_size)[0]
        patches = {"patch_training": True, "patch_fractions": [fraction], "patch_probabilities": [1.0]}
        plan = _plan(PAPER | STEP | {"spatial_size": BOX, "recompute_norms": True} | patches)
        # (the stem's three coordinate channels are left out of the FLOPs: one 3³ convolution of 3 channels)
        flops = training_step_flops(replace(PAPER_WORKLOAD, size=size[0], batch_size=count))
        rows.append(
            {
                "fraction": fraction,
                "patch": size,
                "patches_per_step": count,
                "planned_peak_bytes": plan["peak_bytes"],
                "step_flops": flops,
                "epoch_flops": flops * math.ceil(num_cases / batch_size),
            }
        )
    return rows


def _label(name: str) -> str:
    base = name.removesuffix(QUARTER)
    return ARMS[base] + (", ¼ of the cases" if name.endswith(QUARTER) else "")


def plot_patch_curves(result: dict, path: Path) -> None:
    """Distance ratio against steps and against wall minutes, and validation ε-MSE against steps, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, run in result["runs"].items():
        style = "--" if name.endswith(QUARTER) else "-"
        ratio = run["curves"]["generation/distance_ratio"]
        steps, values = zip(*ratio, strict=True)
        axes[0].plot(steps, values, style, marker="o", markersize=3, label=_label(name))
        axes[1].plot([s * run["seconds_per_step"] / 60 for s in steps], values, style, marker="o", markersize=3)
        if "val_eps_mse" in run["curves"]:
            x, y = zip(*run["curves"]["val_eps_mse"], strict=True)
            axes[2].plot(x, y, style, marker="o", markersize=3)
    for ax, (title, xlabel) in zip(
        axes,
        [("distance ratio", "training steps"), ("distance ratio", "wall minutes"), ("validation ε-MSE", "steps")],
        strict=True,
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_patch_markdown(result: dict, command: str) -> str:
    """``docs/patch_training.md``: the settings, the figures, the curves' table and the goal's verdict."""
    s, runs = result["settings"], result["runs"]
    checks = sorted({step for run in runs.values() for step, _ in run["curves"]["generation/distance_ratio"]})

    def cell(run: Mapping, step: int) -> str:
        ratio = dict(run["curves"]["generation/distance_ratio"]).get(step)
        within = dict(run["curves"]["generation/within_spread"]).get(step)
        return "—" if ratio is None else f"{ratio:.2f} / {within:.2f}"

    table = [[step] + [cell(run, step) for run in runs.values()] for step in checks]
    walls = [
        [_label(n), r["steps"], f"{r['wall_seconds'] / 60:.0f}", f"{r['seconds_per_step']:.2f}"]
        for n, r in runs.items()
    ]
    verdicts = []
    for data, g in result["goal"].items():
        times = {k: ("not reached" if v is None else f"{v / 60:.0f} min") for k, v in g["seconds"].items()}
        speed = "—" if g["speed_up"] is None else f"{g['speed_up']:.2f}×"
        met = g["speed_up"] is not None and g["speed_up"] >= GOAL
        verdicts.append(
            [
                "all cases" if data == "all" else "¼ of the cases",
                f"{g['target_distance_ratio']:.2f}",
                times["whole"],
                times["patches"],
                speed,
                "met" if met else "missed",
            ]
        )
    lines = [
        "# Patch training: wall time to the same quality",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}",
        "",
        (
            f"The README's generation recipe on the built-in brains ({grid_in_words(s)}, "
            f"{s['num_train']} training and {s['num_validation']} validation cases, batch {s['batch_size']}, "
            f"learning rate {s['learning_rate']}, seed {s['seed']}), IDM channels {s['channels']}, attention at "
            f"{s['attention_levels']}, trained on whole volumes and with `patch_training` (fractions "
            f"{s['patch_fractions']} of each side with probabilities {s['patch_probabilities']}, as many patches per "
            "volume as keep the batch's voxels, placed uniformly; the network reads each voxel's coordinates). The two "
            "runs of a data set train at once on one torch thread each, so their wall times compare; the ¼ runs see a "
            "quarter of the training cases and are measured against the same validation cases. Quality: the generation "
            "monitor's distance ratio (1 is the real-vs-real spread's edge; lower is better) and, after the slash, the "
            "fraction of its 12 measures within the spread, at each check (8 samples, DDIM η = 1, 200 steps)."
        ),
        "",
        f"![distance ratio against steps and wall time]({FIGURE})",
        "",
        "## Goal: at least 2× less wall time to the whole-volume run's final quality",
        "",
        markdown_table(
            ["data", "target distance ratio", "whole volumes", "patches", "speed-up", "goal"],
            verdicts,
        ),
        "",
        (
            "Wall time to quality = the first check at or below the target × the run's seconds per step (its checks' "
            "time spread over its steps)."
        ),
        "",
        "## Each check: distance ratio / fraction within the spread",
        "",
        markdown_table(["step", *[_label(n) for n in runs]], table),
        "",
        "## Runs",
        "",
        markdown_table(["run", "steps", "wall min", "s per step"], walls),
        "",
        f"![final samples of each run beside real brains]({SAMPLES_FIGURE})",
        "",
    ]
    return "\n".join(lines)


def write_patch_report(result: dict, command: str, output_dir: str | Path = "docs") -> Path:
    """Writes ``patch_training.md``, ``.json`` and the two figures to ``output_dir``; returns the markdown's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    plot_patch_curves(result, out / FIGURE)
    plot_samples(result["_real"], {name: run["_samples"] for name, run in runs.items()}, out / SAMPLES_FIGURE)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["runs"] = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in runs.items()}
    (out / "patch_training.json").write_text(json.dumps(public, indent=1))
    path = out / "patch_training.md"
    path.write_text(render_patch_markdown(public, command))
    return path
