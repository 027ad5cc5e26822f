"""Quality at equal budget: IDM and MONAI's ``DiffusionModelUNet`` (matched parameter count) trained by the
bundle's own training config on the same built-in brains, with the same seed, steps and hyper-parameters.

Each network is trained by ``python -m monai.bundle run training --config_file configs/train.json`` in a
fresh process; the two runs differ only in ``network_def``. The per-epoch validation scalars
(``val_eps_mse``, ``val_psnr``, ``val_ssim``: EMA weights when EMA is on, fixed noise at fixed timesteps,
one-step x̂₀) are read back from the runs' TensorBoard event files.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch
from matplotlib.ticker import MaxNLocator
from monai.bundle import ConfigParser

from bundle.data import training_cases
from bundle.visualize import read_scalars

from .baselines import count_parameters
from .child_process import run_bundle_command
from .report import machine_description, markdown_table
from .workload import Workload, monai_arguments

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = [
    "NETWORKS",
    "TAGS",
    "compare_quality",
    "network_definitions",
    "plot_quality",
    "render_quality_markdown",
    "train_run",
    "write_quality_report",
]

TRAIN_CONFIG = "configs/train.json"
NETWORKS = {"idm": "IDM (InvertibleDiffusionUNet)", "monai": "MONAI DiffusionModelUNet"}
TAGS = ("val_eps_mse", "val_psnr", "val_ssim")
TAG_TITLES = {"val_eps_mse": "validation ε-MSE", "val_psnr": "one-step PSNR (dB)", "val_ssim": "one-step SSIM"}
STEP_TAG = "train/lr"  # written every iteration by bundle.handlers.StepStatsHandler: its last step = steps trained
FIGURE = "quality_vs_monai.png"


def parameter_count(network_def: Mapping) -> int:
    """Trainable parameters of a ``network_def`` config (instantiated on the meta device)."""
    with torch.device("meta"):
        return count_parameters(ConfigParser({"net": dict(network_def)}).get_parsed_content("net"))


def network_definitions(workload: Workload) -> dict[str, dict]:
    """``{"idm": network_def, "monai": network_def}``: bundle ``network_def`` configs of the memory-efficient
    IDM that ``workload`` describes and of the MONAI ``DiffusionModelUNet`` that the benchmarks match to it
    (:func:`~scripts.benchmarking.workload.monai_arguments`, ±10% parameters)."""
    idm = {
        "_target_": "bundle.networks.InvertibleDiffusionUNet",
        "spatial_dims": workload.spatial_dims,
        "in_channels": workload.in_channels,
        "out_channels": workload.in_channels,
        "channels": [int(c) for c in workload.channels],
        "num_blocks": workload.num_blocks,
        "attention_levels": [bool(a) for a in workload.attention_levels],
        "memory_efficient": True,
    }
    monai = {"_target_": "monai.networks.nets.DiffusionModelUNet"} | {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in monai_arguments(replace(workload, network="monai")).items()
    }
    return {"idm": idm, "monai": monai}


ATTEMPTS = "attempts.json"  # a run's training attempts: when each started and the seconds it counted


def train_run(run_dir: Path, overrides: Mapping[str, object], num_threads: int | None = None) -> float:
    """Runs ``python -m monai.bundle run training --config_file configs/train.json --args_file
    run_dir/args.json`` from the bundle root, with ``overrides`` (plus ``ckpt_dir`` and ``output_dir`` in
    ``run_dir``) in that args file and ``OMP_NUM_THREADS=num_threads`` when given (torch's intra-op threads);
    the log goes to ``run_dir/train.log``. Returns the wall seconds.

    A run that an earlier attempt started with the same overrides and that was stopped (a session ended) is resumed
    (``--resume true``: bitwise the run it would have been); its wall seconds add, over the attempts, each attempt's
    time up to its last checkpoint (the work after it is done again and counted once), kept in ``run_dir/``
    :data:`ATTEMPTS`.

    Raises:
        FileExistsError: ``run_dir`` holds a run of other overrides (a run never mixes its event files with another).
        RuntimeError: the training process failed (with the end of its log).
    """
    args = dict(overrides) | {"ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "runs")}
    attempts_file = run_dir / ATTEMPTS
    attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
    earlier = run_dir / "args.json"
    if run_dir.exists() and (not earlier.exists() or json.loads(earlier.read_text()) != args):
        raise FileExistsError(f"{run_dir} holds another run; choose another work_dir or remove it.")
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        (run_dir / "args.json").write_text(json.dumps(args, indent=1))
    state = run_dir / "models" / "training_state.pt"
    for attempt in attempts:  # those an ended session stopped: counted up to their last checkpoint
        if "seconds" not in attempt:
            attempt["seconds"] = max(0.0, (state.stat().st_mtime if state.exists() else 0.0) - attempt["start"])
    resume = state.exists()
    attempts.append({"start": time.time()})
    attempts_file.write_text(json.dumps(attempts))
    start = time.perf_counter()
    returncode = run_bundle_command(
        "training",
        TRAIN_CONFIG,
        run_dir / "args.json",
        run_dir / "train.log",
        {"resume": "true"} if resume else None,
        num_threads,
    )
    attempts[-1]["seconds"] = time.perf_counter() - start
    attempts_file.write_text(json.dumps(attempts))
    if returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"Training in {run_dir} exited with {returncode}:\n{tail}")
    return sum(attempt["seconds"] for attempt in attempts)


def run_summary(run_dir: Path, label: str, network_def: Mapping, seconds: float) -> dict:
    """Parameters, per-epoch validation curves, final values, training steps and wall time of one run."""
    scalars = read_scalars(run_dir / "runs", [*TAGS, STEP_TAG])
    missing = [tag for tag in (*TAGS, STEP_TAG) if tag not in scalars]
    if missing:
        raise RuntimeError(f"No {missing} scalars in the TensorBoard event files under {run_dir / 'runs'}.")
    return {
        "label": label,
        "network_def": dict(network_def),
        "parameters": parameter_count(network_def),
        "curves": {tag: scalars[tag] for tag in TAGS},
        "final": {tag: scalars[tag][-1][1] for tag in TAGS},
        "steps": scalars[STEP_TAG][-1][0],
        "wall_seconds": seconds,
    }


def plot_quality(result: dict, path: Path) -> None:
    """One panel per validation scalar, both networks' per-epoch curves overlaid."""
    fig, axes = plt.subplots(1, len(TAGS), figsize=(4.2 * len(TAGS), 3.4))
    for ax, tag in zip(axes, TAGS, strict=True):
        for run in result["networks"].values():
            epochs, values = zip(*run["curves"][tag], strict=True)
            ax.plot(epochs, values, marker="o", markersize=3, label=f"{run['label']}, {run['parameters'] / 1e6:.2f}M")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(TAG_TITLES[tag], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    settings = result["settings"]
    fig.suptitle(
        f"synthetic brains at {settings['size']}³, {result['networks']['idm']['steps']} steps of batch "
        f"{settings['batch_size']}, seed {settings['seed']}, EMA {settings['ema_decay'] or 'off'}, "
        f"lr {settings['learning_rate']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_quality(
    work_dir: str | Path | None = None,
    output_dir: str | Path = "docs",
    epochs: int = 16,
    size: int = 32,
    channels: Sequence[int] = (16, 32, 64),
    attention_levels: Sequence[bool] = (False, True, True),
    num_blocks: int = 2,
    batch_size: int = 2,
    seed: int = 0,
    num_phantoms: int = 16,
    learning_rate: float = 2e-4,
    ema_decay: float = 0.99,
    num_threads: int | None = None,
    overrides: Mapping[str, object] | None = None,
) -> dict:
    """Trains the IDM and its parameter-matched MONAI ``DiffusionModelUNet`` through ``configs/train.json``
    at equal budget and writes ``output_dir/quality_vs_monai.png``.

    Both runs share ``work_dir/data`` (the built-in phantoms, written there first when it is empty),
    the seed, batch size, epochs (hence steps), optimizer, learning-rate schedule and EMA; ``overrides``
    (config id → value) are applied to both. Data loading runs in the training process (``num_workers`` 0:
    the volumes are cached). ``work_dir`` None: a temporary directory, removed afterwards.
    ``num_threads``: torch threads of each training process (default: torch's choice; 1 keeps a shared
    CPU from oversubscription, whose stalls would make the wall times meaningless).

    Returns:
        ``{"settings", "machine", "networks": {"idm": run, "monai": run}, "eps_mse_ratio", "figure"}``, each
        run with ``label``, ``network_def``, ``parameters``, ``curves`` ({tag: [(epoch, value), …]}),
        ``final`` ({tag: value}), ``steps`` and ``wall_seconds``; ``eps_mse_ratio`` = IDM's final
        validation ε-MSE / MONAI's.
    """
    settings = {
        "size": size,
        "channels": list(channels),
        "attention_levels": list(attention_levels),
        "num_blocks": num_blocks,
        "batch_size": batch_size,
        "seed": seed,
        "epochs": epochs,
        "num_phantoms": num_phantoms,
        "learning_rate": learning_rate,
        "ema_decay": ema_decay,
        "num_threads": num_threads,
        "overrides": dict(overrides or {}),
    }
    shared = {
        "spatial_size": [size] * 3,
        "batch_size": batch_size,
        "seed": seed,
        "num_phantoms": num_phantoms,
        "learning_rate": learning_rate,
        "ema_decay": ema_decay,
        "train#trainer#max_epochs": epochs,
        "num_workers": 0,
    } | settings["overrides"]
    networks = {}
    with tempfile.TemporaryDirectory(prefix="idm_quality_") if work_dir is None else nullcontext(work_dir) as work:
        work = Path(work)
        # outside the timed runs, on the runs' grid (a set of another grid would be rewritten by the first run)
        training_cases(work / "data", seed=seed, num_phantoms=num_phantoms, spatial_size=[size] * 3)
        workload = Workload(
            "idm", size, channels=tuple(channels), num_blocks=num_blocks, attention_levels=tuple(attention_levels)
        )
        for name, network_def in network_definitions(workload).items():
            overrides_run = shared | {"dataset_dir": str(work / "data"), "network_def": network_def}
            seconds = train_run(work / name, overrides_run, num_threads)
            networks[name] = run_summary(work / name, NETWORKS[name], network_def, seconds)
    figure = Path(output_dir) / FIGURE
    result = {
        "settings": settings,
        "machine": machine_description(),
        "networks": networks,
        "eps_mse_ratio": networks["idm"]["final"]["val_eps_mse"] / networks["monai"]["final"]["val_eps_mse"],
        "figure": str(figure),
    }
    plot_quality(result, figure)
    return result


def _curve_rows(result: dict, columns: int = 8) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-epoch table: about ``columns`` epochs (always the first and the last)."""
    epochs = [e for e, _ in result["networks"]["idm"]["curves"]["val_eps_mse"]]
    stride = max(1, -(-len(epochs) // (columns - 1)))
    shown = sorted(set(epochs[::stride]) | {epochs[-1]})
    rows = []
    for run in result["networks"].values():
        for tag, fmt in (("val_eps_mse", "{:.3f}"), ("val_psnr", "{:.2f}"), ("val_ssim", "{:.3f}")):
            values = dict(run["curves"][tag])
            rows.append([f"{run['label']}: {TAG_TITLES[tag]}"] + [fmt.format(values[e]) for e in shown])
    return ["epoch", *[str(e) for e in shown]], rows


def _variant_row(result: dict) -> list[str]:
    """Settings and final numbers of one :func:`compare_quality` result, for the table of variants."""
    s, runs = result["settings"], result["networks"]
    finals = [f"{runs[n]['final']['val_eps_mse']:.4f}" for n in NETWORKS]
    images = [f"{runs[n]['final']['val_psnr']:.2f} / {runs[n]['final']['val_ssim']:.3f}" for n in NETWORKS]
    overrides = ", ".join(f"`{k}` {v}" for k, v in s["overrides"].items()) or "–"
    return [
        s["epochs"],
        runs["idm"]["steps"],
        s["learning_rate"],
        s["ema_decay"] or "off",
        overrides,
        *finals,
        f"{result['eps_mse_ratio']:.3f}",
        *images,
    ]


def render_quality_markdown(
    result: dict, command: str, level: int = 2, tolerance: float = 0.1, variants: Sequence[dict] = ()
) -> str:
    """A markdown section (heading at ``level``) of a :func:`compare_quality` result: settings, the figure
    (linked by file name, so the markdown belongs beside it), final numbers, the ε-MSE ratio against
    ``1 + tolerance`` and the per-epoch table, with ``command`` as the way to reproduce it. ``variants``:
    further :func:`compare_quality` results (other epochs or hyper-parameters, each at equal budget for both
    networks), tabulated with ``result`` as the first row."""
    s, runs, ratio = result["settings"], result["networks"], result["eps_mse_ratio"]
    heading = "#" * level
    verdict = "within" if ratio <= 1 + tolerance else "not within"
    finals = [
        [
            run["label"],
            f"{run['parameters'] / 1e6:.3f}M",
            run["steps"],
            f"{run['final']['val_eps_mse']:.4f}",
            f"{run['final']['val_psnr']:.2f}",
            f"{run['final']['val_ssim']:.4f}",
            f"{run['wall_seconds'] / 60:.1f}",
        ]
        for run in runs.values()
    ]
    monai = runs["monai"]["network_def"]
    overrides = f" Further config overrides for both: `{json.dumps(s['overrides'])}`." if s["overrides"] else ""
    threads = (
        f"; each training process ran with {s['num_threads']} torch thread(s) (`OMP_NUM_THREADS`)"
        if s["num_threads"]
        else ""
    )
    sections = [
        f"{heading} Quality at equal budget: IDM vs MONAI DiffusionModelUNet",
        f"Command: `{command}`  \nMachine: {result['machine']} (the calling process{threads})",
        (
            f"Both networks trained by `configs/train.json` (`monai.bundle run training`, one fresh process each) on "
            f"the same {s['num_phantoms']} built-in synthetic brains at {s['size']}³, seed {s['seed']}, batch "
            f"{s['batch_size']}, {s['epochs']} epochs, AdamW lr {s['learning_rate']} with cosine annealing, EMA decay "
            f"{s['ema_decay'] or 'off'}; only `network_def` differs.{overrides} IDM: channels {tuple(s['channels'])}, "
            f"{s['num_blocks']} blocks per level, attention {tuple(s['attention_levels'])}. MONAI: "
            f"`DiffusionModelUNet` channels {tuple(monai['channels'])}, {monai['num_res_blocks']} res block(s) per "
            "level, same attention levels, the leanest within ±10% of the IDM's parameter count "
            "(`scripts.benchmarking.matched_monai_unet`). Validation after every epoch (with the EMA weights when "
            "EMA is on): ε-MSE at fixed noise and timesteps (`val_timestep_fractions`), PSNR/SSIM of the one-step "
            "estimate x̂₀. Wall time = the whole training process, start-up included."
        ),
        f"![validation curves]({Path(result['figure']).name})",
        markdown_table(["network", "params", "steps", "final ε-MSE", "PSNR (dB)", "SSIM", "wall min"], finals),
        f"IDM / MONAI final validation ε-MSE: **{ratio:.3f}**, {verdict} the {1 + tolerance:.2f} goal.",
        f"{heading}# Per epoch",
        markdown_table(*_curve_rows(result)),
    ]
    if variants:
        sections += [
            f"{heading}# Other settings, each at equal budget for both networks (first row: the run above)",
            markdown_table(
                [
                    "epochs",
                    "steps",
                    "lr",
                    "EMA",
                    "overrides",
                    "IDM ε-MSE",
                    "MONAI ε-MSE",
                    "IDM / MONAI",
                    "IDM PSNR / SSIM",
                    "MONAI PSNR / SSIM",
                ],
                [_variant_row(r) for r in (result, *variants)],
            ),
        ]
    return "\n\n".join(sections) + "\n"


def write_quality_report(
    result: dict,
    command: str,
    output_dir: str | Path = "docs",
    name: str = "benchmark_quality",
    variants: Sequence[dict] = (),
) -> Path:
    """Writes ``output_dir/name.md`` (:func:`render_quality_markdown` as a top-level document; keep it beside
    the figure it links) and ``output_dir/name.json`` (``result`` with ``variants`` under that key). Returns
    the markdown path."""
    path = Path(output_dir) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_quality_markdown(result, command, level=1, variants=variants))
    path.with_suffix(".json").write_text(json.dumps(result | {"variants": list(variants)}, indent=1))
    return path
