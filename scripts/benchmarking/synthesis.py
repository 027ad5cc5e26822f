"""Missing-modality synthesis on the built-in brains: the conditioned IDM against the classic baseline, MONAI's
``UNet`` trained as a deterministic L1 regression (``configs/regression.json``) with the same data, steps and
parameter budget, for each direction (T1→T2 and T1→FLAIR by default). Each run trains by the bundle's own configs in
stages (a resume at each, the cosine learning rate over the whole length) and is evaluated after each stage by
``configs/evaluate.json``: the learning curve of the translation's PSNR, SSIM and MAE against training steps, the
BraSyn challenge's measures (SSIM in the tumour and in the healthy head), with the identity baseline that the same
command measures.

Runs go two at a time, one torch thread each (two cores).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import torch
from monai.bundle import ConfigParser

from bundle.checkpoint import load_checkpoint
from bundle.data import training_cases
from bundle.diffusion import DiffusionSampler, GridDDIMScheduler
from bundle.synthesis import RegressionInferer, mean_std

from .child_process import BUNDLE_ROOT, run_bundle_command
from .generation import TEMPLATE_POPULATION, grid_in_words
from .quality import parameter_count
from .report import machine_description, markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["compare_synthesis", "goal_statement", "render_synthesis_markdown", "write_synthesis_report"]

DIRECTIONS = (("t1", "t2"), ("t1", "flair"))  # (given, generated)
CONFIGS = {  # the training configs of each network, and what evaluation adds
    "idm": (["configs/train.json"], ["configs/train.json", "configs/evaluate.json"]),
    "unet": (
        ["configs/train.json", "configs/regression.json"],
        ["configs/train.json", "configs/evaluate.json", "configs/regression.json"],
    ),
}
LABELS = {"idm": "IDM (conditioned)", "unet": "MONAI UNet, L1 regression", "identity": "identity (the input)"}
CURVE_FIGURE = "synthesis_curves.png"
EXAMPLES_FIGURE = "synthesis_examples.png"
STAGE = "stage.json"  # beside each stage's evaluation: the cumulative training wall seconds
PENDING = "training_started.json"  # while a stage trains: when it started
EVALUATION_SAMPLING = {"sampler": "ddim", "num_inference_steps": 50}  # the IDM's translations (η = 0)
ANCHORS = (
    "SelfRDB (2D slices of BraTS, its own protocol): T1→T2 27.6 dB PSNR / 0.930 SSIM, T2→T1 28.9 dB / 0.937.",
    (
        "The seed paper's Table 1 (IDM, 3D BraTS2020 at 64³, one-step reconstruction measures, best of batch 2): T1 "
        "25.01 dB / SSIM 0.485 / MAE 0.409, T2 25.54 dB / 0.488 / 0.335."
    ),
)


def idm_definition(channels: Sequence[int], attention_levels: Sequence[bool], num_blocks: int) -> dict:
    """The conditioned IDM's ``network_def`` of one direction: one generated and one given channel."""
    return {
        "_target_": "bundle.networks.InvertibleDiffusionUNet",
        "spatial_dims": 3,
        "in_channels": 2,
        "out_channels": 1,
        "channels": list(channels),
        "num_blocks": num_blocks,
        "attention_levels": list(attention_levels),
        "memory_efficient": True,
    }


def matched_unet_channels(parameters: int, levels: int = 3, num_res_units: int = 2) -> list[int]:
    """The widths ``(c, 2c, 4c, …)`` of MONAI's ``UNet`` (one input and one output channel) whose parameter count is
    nearest ``parameters``."""

    def count(width: int) -> int:
        channels = [width * 2**k for k in range(levels)]
        return parameter_count(
            {
                "_target_": "monai.networks.nets.UNet",
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 1,
                "channels": channels,
                "strides": [2] * (levels - 1),
                "num_res_units": num_res_units,
            }
        )

    best = min(range(2, 65), key=lambda width: abs(count(width) - parameters))
    return [best * 2**k for k in range(levels)]


def _bundle(run_id: str, configs: Sequence[str], args_file: Path, log: Path, **extra) -> float:
    """``python -m monai.bundle run RUN_ID --config_file CONFIGS --args_file ARGS --key value …`` on one torch
    thread, its log appended to ``log``; the wall seconds.

    Raises:
        RuntimeError: the process failed (with the end of its log).
    """
    start = time.perf_counter()
    returncode = run_bundle_command(run_id, configs, args_file, log, extra, num_threads=1)
    if returncode != 0:
        raise RuntimeError(f"{run_id} of {args_file.parent} exited with {returncode}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def _trained_epochs(run_dir: Path) -> int:
    """The epochs of the run's last checkpoint (0 without one)."""
    state = run_dir / "models" / "training_state.pt"
    return torch.load(state, map_location="cpu", weights_only=False)["trainer"]["epoch"] if state.exists() else 0


def staged_run(
    run_dir: Path, network: str, overrides: Mapping, stage_epochs: Sequence[int], steps_per_epoch: int
) -> list[dict]:
    """Trains one network in ``run_dir`` to each of ``stage_epochs`` in turn (the first a new run, the others resumes;
    the cosine schedule is over the last) and evaluates the checkpoint after each stage into
    ``run_dir/eval_<epochs>``; a stage evaluated earlier is reused, and a stage that an ended session stopped goes on
    from its last checkpoint (its time up to that checkpoint counted, kept in ``run_dir/`` :data:`PENDING`). Returns
    per stage ``{"step", "wall_seconds" (training so far), "metrics"}`` (``metrics``: the evaluation's
    ``translation``)."""
    train_configs, evaluate_configs = CONFIGS[network]
    run_dir.mkdir(parents=True, exist_ok=True)
    args = dict(overrides) | {
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "runs"),
        "lr_scheduler#T_max": stage_epochs[-1],
    }
    (run_dir / "args.json").write_text(json.dumps(args, indent=1))
    stages, wall, pending = [], 0.0, run_dir / PENDING
    for epochs in stage_epochs:
        folder = run_dir / f"eval_{epochs}"
        if (folder / STAGE).exists():
            wall = json.loads((folder / STAGE).read_text())["wall_seconds"]
        else:
            state = run_dir / "models" / "training_state.pt"
            if pending.exists() and state.exists():  # stopped by an ended session: counted to its last checkpoint
                wall += max(0.0, state.stat().st_mtime - json.loads(pending.read_text())["start"])
            trained = _trained_epochs(run_dir)
            if trained < epochs:
                pending.write_text(json.dumps({"start": time.time()}))
                wall += _bundle(
                    "training",
                    train_configs,
                    run_dir / "args.json",
                    run_dir / "train.log",
                    **{"train#trainer#max_epochs": epochs, "resume": str(trained > 0).lower()},
                )
            pending.unlink(missing_ok=True)
            _bundle(
                "evaluating",
                evaluate_configs,
                run_dir / "args.json",
                run_dir / "evaluate.log",
                output_dir=folder,
                overwrite="true",
                **EVALUATION_SAMPLING,
            )
            (folder / STAGE).write_text(json.dumps({"wall_seconds": wall}))
        metrics = json.loads((folder / "metrics.json").read_text())["translation"]
        stages.append({"step": epochs * steps_per_epoch, "wall_seconds": wall, "metrics": metrics})
    return stages


def _middle(volume) -> np.ndarray:
    """The axial mid-slice of a (*S) volume, rotated for display."""
    return np.rot90(volume[:, :, volume.shape[2] // 2].numpy())


def _examples(run_dirs: Mapping[str, Path], given: str, generated: str, count: int) -> dict[str, np.ndarray]:
    """Axial mid-slices of the first ``count`` validation cases: the input, each final model's translation and the
    real volume (``{"input", network…, "real"}``, each (count, H, W))."""
    slices: dict[str, list[np.ndarray]] = {}
    for network, run_dir in run_dirs.items():
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / c) for c in CONFIGS[network][0]])
        parser.update(json.loads((run_dir / "args.json").read_text()) | {"resume": True})
        parser["bundle_root"] = str(BUNDLE_ROOT)
        model = load_checkpoint(parser.get_parsed_content("network_def"), run_dir / "models" / "model.pt").eval()
        if network == "idm":
            scheduler = GridDDIMScheduler(
                num_train_timesteps=parser["num_train_timesteps"], schedule=parser["schedule"]
            )
            inferer = DiffusionSampler(scheduler, 50, seed=0, progress=False, num_channels=1, conditioned=True)
        else:
            inferer = RegressionInferer()
        data = parser.get_parsed_content("validate#dataset")
        for i in range(min(count, len(data))):
            case = data[i]
            condition, real = case["condition"][None], case["image"][None]
            output = inferer(condition, model)[0, 0]
            if network == next(iter(run_dirs)):
                slices.setdefault("input", []).append(_middle(condition[0, 0]))
                slices.setdefault("real", []).append(_middle(real[0, 0]))
            slices.setdefault(network, []).append(_middle(output))
    return {k: np.stack(v) for k, v in slices.items()}


def compare_synthesis(
    work_dir: str | Path,
    steps: Sequence[int] = (250, 500),
    spatial_size: Sequence[int] = (28, 32, 28),
    spacing: float | None = 6.0,
    directions: Sequence[Sequence[str]] = DIRECTIONS,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    ema_decay: float = 0.995,
    num_train_timesteps: int = 1000,
    num_phantoms: int = 128,
    val_fraction: float = 0.25,
    channels: Sequence[int] = (16, 32, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_blocks: int = 2,
    seed: int = 0,
    examples: int = 4,
) -> dict:
    """Trains and evaluates IDM and the matched L1 ``UNet`` for each of ``directions`` (``(given, generated)``;
    :func:`staged_run`, two runs at a time) on ``num_phantoms`` built-in brains, on ``spatial_size`` of each case's
    resized head box or, with ``spacing``, on the native grid of that many mm; returns ``{"settings", "machine",
    "directions": {"t1->t2": {"networks": {name: {"label", "parameters", "stages"}}, "_examples"}}}``."""
    work = Path(work_dir)
    num_train = num_phantoms - max(1, round(num_phantoms * val_fraction))
    steps_per_epoch = math.ceil(num_train / batch_size)
    stage_epochs = sorted({max(1, round(s / steps_per_epoch)) for s in steps})
    idm = idm_definition(channels, attention_levels, num_blocks)
    unet_channels = matched_unet_channels(parameter_count(idm))
    shared = {
        "spatial_size": list(spatial_size),
        "spacing": spacing,
        "batch_size": batch_size,
        "seed": seed,
        "num_phantoms": num_phantoms,
        "val_fraction": val_fraction,
        "learning_rate": learning_rate,
        "num_train_timesteps": num_train_timesteps,
        "num_workers": 0,
        "preview_interval": 1000,
        "val_interval": stage_epochs[0],
        "dataset_dir": str(work / "data"),
    }
    modalities = sorted({m for direction in directions for m in direction})
    training_cases(
        work / "data",
        seed=seed,
        num_phantoms=num_phantoms,
        modalities=modalities,
        spatial_size=spatial_size,
        spacing=spacing,
    )
    jobs = {}
    for given, generated in directions:
        direction = {"condition_modalities": [given], "modalities": [generated]}
        jobs[(given, generated, "idm")] = shared | direction | {"network_def": idm, "ema_decay": ema_decay}
        jobs[(given, generated, "unet")] = shared | direction | {"regression_channels": unet_channels}
    with ThreadPoolExecutor(2) as pool:
        futures = {
            key: pool.submit(
                staged_run, work / f"{key[0]}_to_{key[1]}" / key[2], key[2], overrides, stage_epochs, steps_per_epoch
            )
            for key, overrides in jobs.items()
        }
        stages = {key: future.result() for key, future in futures.items()}
    unet_parameters = parameter_count(
        {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": unet_channels,
            "strides": [2, 2],
            "num_res_units": 2,
        }
    )
    results = {}
    for given, generated in directions:
        name = f"{given}->{generated}"
        results[name] = {
            "given": given,
            "generated": generated,
            "networks": {
                "idm": {
                    "label": LABELS["idm"],
                    "parameters": parameter_count(idm),
                    "stages": stages[(given, generated, "idm")],
                },
                "unet": {
                    "label": LABELS["unet"],
                    "parameters": unet_parameters,
                    "channels": unet_channels,
                    "stages": stages[(given, generated, "unet")],
                },
            },
            "_examples": _examples(
                {n: work / f"{given}_to_{generated}" / n for n in ("idm", "unet")}, given, generated, examples
            ),
        }
    settings = {
        "spatial_size": list(spatial_size),
        "spacing": spacing,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "ema_decay": ema_decay,
        "num_train_timesteps": num_train_timesteps,
        "num_phantoms": num_phantoms,
        "val_fraction": val_fraction,
        "idm_channels": list(channels),
        "attention_levels": list(attention_levels),
        "num_blocks": num_blocks,
        "unet_channels": unet_channels,
        "stage_epochs": stage_epochs,
        "steps_per_epoch": steps_per_epoch,
        "seed": seed,
        "evaluation_sampler": "DDIM, η = 0, 50 steps",
    }
    return {"settings": settings, "machine": machine_description(), "directions": results}


def _value(metrics: Mapping, run: str, modality: str, metric: str) -> dict:
    return metrics[run][modality][metric]


def plot_curves(result: Mapping, path: Path) -> None:
    """Validation PSNR, SSIM and MAE of the translation against training steps, per direction; the identity baseline
    dashed."""
    metrics = ("psnr", "ssim", "mae")
    directions = result["directions"]
    figure, axes = plt.subplots(len(directions), len(metrics), figsize=(12, 3.2 * len(directions)), squeeze=False)
    for row, (name, direction) in enumerate(directions.items()):
        generated = direction["generated"]
        for col, metric in enumerate(metrics):
            axis = axes[row][col]
            for entry in direction["networks"].values():
                steps = [s["step"] for s in entry["stages"]]
                values = [_value(s["metrics"], "model", generated, metric)["mean"] for s in entry["stages"]]
                axis.plot(steps, values, marker="o", label=entry["label"])
            identity = _value(direction["networks"]["idm"]["stages"][-1]["metrics"], "identity", generated, metric)
            axis.axhline(identity["mean"], linestyle="--", color="grey", label=LABELS["identity"])
            axis.set_xscale("log")
            axis.set_xlabel("training steps")
            axis.set_title(f"{name.replace('->', ' → ')}: {metric.upper()}")
            if row == 0 and col == 0:
                axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_examples(result: Mapping, path: Path) -> None:
    """Axial mid-slices per direction: rows input, IDM, UNet, real; one column per validation case."""
    directions = result["directions"]
    rows = [(name, key) for name in directions for key in ("input", "idm", "unet", "real")]
    count = len(next(iter(directions.values()))["_examples"]["input"])
    figure, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.6 * len(rows)), squeeze=False)
    for r, (name, key) in enumerate(rows):
        for c in range(count):
            axes[r][c].imshow(directions[name]["_examples"][key][c], cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        label = {
            "input": f"input {directions[name]['given']}",
            "idm": "IDM",
            "unet": "UNet L1",
            "real": f"real {directions[name]['generated']}",
        }[key]
        axes[r][0].set_ylabel(label, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


BRASYN_COLUMNS = (("brasyn_psnr", 2), ("brasyn_ssim", 3), ("tumour_ssim", 3), ("healthy_ssim", 3))


def goal_statement(direction: Mapping) -> str:
    """Whether the final IDM is ahead of the final L1 UNet of ``direction`` on SSIM (in the head and by BraSyn's
    measure) and on sharpness (nearer the real volume's: the smaller ``|ratio − 1|``, since a regression's blur
    lowers the ratio and sampling noise raises it), with the figures."""
    generated = direction["generated"]
    final = {n: e["stages"][-1]["metrics"]["model"][generated] for n, e in direction["networks"].items()}
    idm, unet = final["idm"], final["unet"]

    def mean(metrics: Mapping, key: str) -> float:
        return metrics[key]["mean"]

    ssim = all(mean(idm, k) > mean(unet, k) for k in ("head_ssim", "brasyn_ssim"))
    sharpness = abs(mean(idm, "sharpness") - 1) < abs(mean(unet, "sharpness") - 1)
    verdict = "met" if ssim and sharpness else "**missed**"
    return (
        f"Goal (the IDM ahead of the L1 UNet on SSIM and on sharpness): {verdict}. Head SSIM IDM "
        f"{mean(idm, 'head_ssim'):.3f} against UNet {mean(unet, 'head_ssim'):.3f}, BraSyn SSIM "
        f"{mean(idm, 'brasyn_ssim'):.3f} against {mean(unet, 'brasyn_ssim'):.3f} (in the tumour "
        f"{mean(idm, 'tumour_ssim'):.3f} against {mean(unet, 'tumour_ssim'):.3f}), sharpness "
        f"{mean(idm, 'sharpness'):.2f} against {mean(unet, 'sharpness'):.2f} (1: as sharp as the real volume)."
    )


def render_synthesis_markdown(result: Mapping, command: str) -> str:
    s = result["settings"]
    names = [f"{d['given'].upper()} → {d['generated'].upper()}" for d in result["directions"].values()]
    lines = [
        f"# Missing-modality synthesis on the built-in brains: {', '.join(names)}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}; two runs at a time, one torch thread each.",
        "",
        (
            f"On {s['num_phantoms']} built-in brains (`bundle.data.anatomy`: the MNI ICBM152 template, deformed, with "
            f"a tumour in most cases) at {grid_in_words(s)} ({round(s['num_phantoms'] * s['val_fraction'])} "
            f"held out for validation), batch {s['batch_size']}, AdamW lr {s['learning_rate']} with cosine annealing "
            f"over the last stage, seed {s['seed']}, both networks trained by the bundle's configs on the same data "
            f"and steps: the conditioned IDM (`configs/train.json --condition_modalities`, channels "
            f"{tuple(s['idm_channels'])}, {s['num_blocks']} blocks per level, attention "
            f"{tuple(s['attention_levels'])}, "
            f"T = {s['num_train_timesteps']}, EMA {s['ema_decay']}) and MONAI's `UNet` as an L1 regression "
            f"(`configs/regression.json`, channels {tuple(s['unet_channels'])}, 2 residual units, no EMA), the widths "
            f"nearest IDM's parameter count. After each stage `configs/evaluate.json` measures every validation case's "
            f"translation (IDM: {s['evaluation_sampler']}) against its real volume: PSNR, SSIM and MAE in [0, 1] "
            "intensities over the whole volume and inside the head (the real volume's foreground), and sharpness (mean "
            "gradient magnitude in the head, generated over real: 1 is as sharp as the data), and the BraSyn "
            "challenge's: both volumes clipped to the real one's 0.5th–99.5th percentiles in the head and scaled to "
            "[0, 1], PSNR and SSIM in the head, SSIM in the tumour (the cases' `seg` labels) and in the rest of the "
            "head. The identity baseline is the input volume itself after the same scaling."
        ),
        "",
        (
            f"{TEMPLATE_POPULATION} For synthesis in particular: every sequence of a built-in case is made from the "
            "same tissue maps, so the given volume fixes the generated one up to the case's contrast, bias field and "
            "noise, a closer link than real T1 and T2 have."
        ),
        "",
    ]
    for direction in result["directions"].values():
        generated = direction["generated"]
        final = {n: e["stages"][-1]["metrics"] for n, e in direction["networks"].items()}
        runs = [("idm", "model"), ("unet", "model"), ("idm", "identity")]
        header = [
            "run",
            "PSNR",
            "SSIM",
            "MAE",
            "head PSNR",
            "head SSIM",
            "head MAE",
            "PSNR best-of-2",
            "SSIM best-of-2",
            "sharpness",
        ]
        table = []
        for network, run in runs:
            m = final[network][run][generated]
            label = LABELS["identity"] if run == "identity" else direction["networks"][network]["label"]
            table.append(
                [label]
                + [
                    mean_std(m[k], p)
                    for k, p in (
                        ("psnr", 2),
                        ("ssim", 3),
                        ("mae", 3),
                        ("head_psnr", 2),
                        ("head_ssim", 3),
                        ("head_mae", 3),
                    )
                ]
                + [
                    f"{m['psnr']['best_of_batch']:.2f}",
                    f"{m['ssim']['best_of_batch']:.3f}",
                    f"{m['sharpness']['mean']:.2f}",
                ]
            )
        brasyn = [
            [
                LABELS["identity"] if run == "identity" else direction["networks"][network]["label"],
                *(mean_std(final[network][run][generated][k], p) for k, p in BRASYN_COLUMNS),
            ]
            for network, run in runs
        ]
        tumours = final["idm"]["model"][generated]["tumour_ssim"]["cases"]
        lines += [
            f"## {direction['given'].upper()} → {generated.upper()}",
            "",
            goal_statement(direction),
            "",
            (
                f"Final models ({direction['networks']['idm']['stages'][-1]['step']} steps), "
                f"{len(final['idm']['cases'])} validation cases, mean ± std over the cases; parameters: IDM "
                f"{direction['networks']['idm']['parameters'] / 1e6:.3f}M, UNet "
                f"{direction['networks']['unet']['parameters'] / 1e6:.3f}M:"
            ),
            "",
            markdown_table(header, table),
            "",
            f"BraSyn's measures (the tumour SSIM over the {tumours} validation cases with a tumour):",
            "",
            markdown_table(["run", "PSNR", "SSIM", "SSIM tumour", "SSIM healthy"], brasyn),
            "",
            "Learning curve (validation, mean over the cases):",
            "",
        ]
        curve_header = ["steps"] + [f"{n} {k}" for n in ("IDM", "UNet") for k in ("PSNR", "SSIM", "MAE")]
        curve_rows = []
        for k, stage in enumerate(direction["networks"]["idm"]["stages"]):
            unet = direction["networks"]["unet"]["stages"][k]
            curve_rows.append(
                [stage["step"]]
                + [
                    f"{_value(st['metrics'], 'model', generated, metric)['mean']:.{p}f}"
                    for st in (stage, unet)
                    for metric, p in (("psnr", 2), ("ssim", 3), ("mae", 3))
                ]
            )
        lines += [markdown_table(curve_header, curve_rows), ""]
        walls = {n: e["stages"][-1]["wall_seconds"] / 60 for n, e in direction["networks"].items()}
        lines += [f"Training wall time: IDM {walls['idm']:.1f} min, UNet {walls['unet']:.1f} min.", ""]
    lines += [
        "## Over training",
        "",
        f"![curves]({CURVE_FIGURE})",
        "",
        "## Examples",
        "",
        "Axial mid-slices of the first validation cases: input, IDM, UNet, real, per direction.",
        "",
        f"![examples]({EXAMPLES_FIGURE})",
        "",
        "## Anchors (other data, other protocols: not comparable figure for figure)",
        "",
        *[f"- {a}" for a in ANCHORS],
        "",
    ]
    return "\n".join(lines)


def write_synthesis_report(result: dict, command: str, output_dir: str | Path = "docs") -> Path:
    """Writes ``synthesis.md``, ``synthesis.json`` and the two figures to ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(result, out / CURVE_FIGURE)
    plot_examples(result, out / EXAMPLES_FIGURE)
    public = json.loads(
        json.dumps(
            {k: v for k, v in result.items() if k != "directions"}
            | {
                "directions": {
                    name: {k: v for k, v in d.items() if not k.startswith("_")}
                    for name, d in result["directions"].items()
                }
            }
        )
    )
    for direction in public["directions"].values():
        for entry in direction["networks"].values():
            for stage in entry["stages"]:
                stage["metrics"] = {k: v for k, v in stage["metrics"].items() if k != "per_case"}
    (out / "synthesis.json").write_text(json.dumps(public, indent=1))
    path = out / "synthesis.md"
    path.write_text(render_synthesis_markdown(result, command))
    return path
