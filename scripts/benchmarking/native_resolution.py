"""The paper's network on the BraTS 1 mm grid (``docs/native_resolution.md``): the planned peak of its training step
under each memory option and on each grid, MONAI's matched ``DiffusionModelUNet`` on the same grid, the largest grid
each benchmark configuration fits in 24 GiB, one training step and one sampling step measured on this machine, and a
figure of what the resized grid does to anatomy."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bundle.data import case_grid, discover_cases, preprocessing, write_anatomy_cases
from bundle.diffusion import DiffusionSampler, GridDDIMScheduler
from bundle.memory_plan import plan_config, plan_sampling_step

from .child_process import FreshProcess, measuring_device
from .peak_memory import PeakMeter
from .plan_accuracy import CONFIG, measure_configured_step
from .quality import network_definitions
from .report import markdown_table
from .workload import Workload

__all__ = ["native_resolution", "plot_aspect_ratio", "render_native_resolution"]

BOX = [192, 192, 192]  # 1 mm voxels: BraTS's 240×240×155 frame cropped by 24 mm on each side in x and y, padded in z
DEVICE_GB = 24  # the paper's RTX A5000
GOAL_BYTES = 20e9
PAPER_WORKLOAD = Workload(
    "idm", 64, channels=(64, 128, 256, 512, 1024, 2048), attention_levels=(False, False, False, False, True, True)
)
PAPER = {
    "network_def#channels": list(PAPER_WORKLOAD.channels),
    "attention_levels": list(PAPER_WORKLOAD.attention_levels),
}
STEP = {"batch_size": 4, "micro_batch_size": 1}  # the paper's batch, back-propagated one sample at a time
OPTIONS: dict[str, dict] = {  # the paper's network on BOX: train.json overrides of each memory option
    "float32, EMA (the default run)": {},
    "float32, no EMA (as the paper trains)": {"ema_decay": 0},
    "recompute_norms, EMA": {"recompute_norms": True},
    "recompute_norms, no EMA": {"recompute_norms": True, "ema_decay": 0},
    "amp (bfloat16 autocast), EMA": {"amp": True},
    "amp, no EMA": {"amp": True, "ema_decay": 0},
}
GRIDS: dict[str, list[int]] = {  # with recompute_norms and EMA
    "192×192×192": BOX,
    "192×224×160 (the network pads it to 192×256×192)": [192, 224, 160],
    "240×240×155, the whole frame (padded to 256×256×192)": [240, 240, 155],
}
MEASURED_STEP = {"recompute_norms": True, "ema_decay": 0, "batch_size": 1}  # one micro-batch; fits this machine


def _benchmark_networks() -> dict[str, tuple[dict, int]]:
    """The benchmark suite's configurations whose largest grid is searched: ``{name: (train.json overrides, the
    multiple its sides must be)}`` (2^(levels−1), ×2 for an IDM's bottom attention: the IDM pads other sizes,
    MONAI's network refuses them)."""
    small = network_definitions(Workload("idm", 64))
    paper = network_definitions(PAPER_WORKLOAD)
    checkpointed = {"_target_": "scripts.benchmarking.baselines.enable_activation_checkpointing"}
    return {
        "IDM 16–128 (the benchmark's), batch 1": ({"network_def": small["idm"], "batch_size": 1}, 16),
        "MONAI DiffusionModelUNet matched to it, batch 1": ({"network_def": small["monai"], "batch_size": 1}, 16),
        "the same + activation checkpointing, batch 1": (
            {"network_def": checkpointed | {"model": small["monai"]}, "batch_size": 1},
            16,
        ),
        "paper's IDM, batch 4 in micro-batches of 1, recompute_norms, EMA": (
            PAPER | STEP | {"recompute_norms": True},
            64,
        ),
        "paper's IDM, batch 4 in micro-batches of 1, amp, EMA": (PAPER | STEP | {"amp": True}, 64),
        "MONAI matched to the paper's IDM, batch 4 in micro-batches of 1": ({"network_def": paper["monai"]} | STEP, 32),
    }


def _plan(overrides: Mapping) -> dict:
    """The plan at memory_budget 0: the least each configuration needs (``auto`` would spend the rest)."""
    return plan_config(
        CONFIG, {"device": "cuda", "device_memory_gb": DEVICE_GB, "memory_budget": 0, **overrides}
    ).plan.to_json()


def largest_cube(overrides: Mapping, step: int, limit: int = 512) -> dict:
    """The largest cube (a multiple of ``step`` voxels per side, at most ``limit``) whose planned training step
    fits ``DEVICE_GB`` GiB: ``{"size", "plan"}`` (``size`` None when not even ``step``³ fits): the size doubles
    until a plan does not fit, then is bisected."""

    def fits(size: int) -> dict | None:
        plan = _plan({**overrides, "spatial_size": [size] * 3})
        return plan if plan["fits"] else None

    low, high, best = 0, None, None
    size = step
    while high is None and size <= limit:
        plan = fits(size)
        if plan is None:
            high = size
        else:
            low, best = size, plan
            size *= 2
    high = high or limit + step
    while high - low > step:
        middle = (low + high) // (2 * step) * step
        plan = fits(middle)
        low, high, best = (middle, high, plan) if plan else (low, middle, best)
    return {"size": low or None, "plan": best}


def _measure_sampling_step(config_file: str, overrides: Mapping) -> dict:
    """One DDIM step (one network evaluation without gradients, and the step's update) of the configured network
    on one sample of the configured grid, in this (fresh) process: its peak above the memory before the network was
    built, and its seconds."""
    from monai.bundle import ConfigParser

    device = measuring_device()
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(dict(overrides))
    shape = [len(parser.get_parsed_content("modalities")), *parser.get_parsed_content("spatial_size")]
    meter = PeakMeter(device)
    before = meter.allocated()
    network = parser.get_parsed_content("network_def").to(device).eval()
    meter.reset()
    sampler = DiffusionSampler(
        GridDDIMScheduler(num_train_timesteps=parser.get_parsed_content("num_train_timesteps")), 1, progress=False
    )
    start = time.perf_counter()
    sampler(torch.zeros(1, *shape, device=device), network)
    seconds = time.perf_counter() - start
    return {"peak_bytes": meter.peak() - before, "seconds": seconds, "device": device.type}


def _sampling_plan(overrides: Mapping) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update(dict(overrides))
    parser.get_parsed_content("settings")  # real: the noise schedule it checks reads values
    with FakeTensorMode():  # no memory: the plan reads shapes only
        network = parser.get_parsed_content("network_def")
    shape = [len(parser.get_parsed_content("modalities")), *parser.get_parsed_content("spatial_size")]
    return plan_sampling_step(network, 1, shape, device=overrides.get("device", "cpu")).to_json()


def native_resolution(measure: bool = True, progress: Callable[[str], None] = print) -> dict:
    """Every figure of ``docs/native_resolution.md`` (see the module docstring); ``measure`` False: the plans
    only (minutes instead of about an hour)."""
    result: dict = {"box": BOX, "device_gb": DEVICE_GB, "options": {}, "grids": {}, "monai": {}, "largest": {}}
    for name, overrides in OPTIONS.items():
        progress(f"plan: {name}")
        result["options"][name] = _plan(PAPER | STEP | {"spatial_size": BOX} | overrides)
    for name, size in GRIDS.items():
        progress(f"plan: {name}")
        result["grids"][name] = _plan(PAPER | STEP | {"spatial_size": size, "recompute_norms": True})
    monai = network_definitions(PAPER_WORKLOAD)["monai"]
    result["monai_network"] = monai
    checkpointed = {"_target_": "scripts.benchmarking.baselines.enable_activation_checkpointing", "model": monai}
    for name, definition in (("plain", monai), ("activation checkpointing", checkpointed)):
        progress(f"plan: MONAI {name}")
        result["monai"][name] = _plan({"network_def": definition, "spatial_size": BOX} | STEP)
    for name, (overrides, step) in _benchmark_networks().items():
        progress(f"largest cube: {name}")
        result["largest"][name] = largest_cube(overrides, step)
    sampling = PAPER | {"spatial_size": BOX}
    result["sampling"] = {
        "plan_cuda": _sampling_plan(sampling | {"device": "cuda"}),
        "plan_cpu": _sampling_plan(sampling),
    }
    step = PAPER | {"spatial_size": BOX} | MEASURED_STEP
    result["measured_step"] = {"overrides": step, "plan_cpu": plan_config(CONFIG, step).plan.to_json()}
    if measure:
        progress("measure: one sampling step")
        result["sampling"]["measured"] = FreshProcess(_measure_sampling_step, CONFIG, sampling).result(7200)
        progress("measure: one training step")
        result["measured_step"]["measured"] = measure_configured_step(step, timeout=14400, real_first_step=False)
    return result


def plot_aspect_ratio(path: Path, work_dir: Path) -> dict:
    """Mid-slices of one phantom on the BraTS grid: its files (1 mm), the resized grid (its head's box resized to
    64³, shown with square voxels as the network sees it) and the native grid (1 mm, :data:`BOX`); returns the
    resized grid's voxel size in mm."""
    root = work_dir / "aspect_ratio"
    if not root.is_dir():
        write_anatomy_cases(root, num_cases=1, spacing=1.0)
    [case] = discover_cases(root, ["t1"])
    grids = {
        "its file: 240×240×155 at 1 mm": preprocessing(["t1"], case_grid(1.0)[0], spacing=1.0)(case)["image"],
        "resized grid (spacing null, the paper's): 64³": preprocessing(["t1"], [64] * 3)(case)["image"],
        "native grid (spacing 1.0): 192³ at 1 mm": preprocessing(["t1"], BOX, spacing=1.0)(case)["image"],
    }
    voxel_mm = [
        float(v)
        for v in np.linalg.norm(grids["resized grid (spacing null, the paper's): 64³"].affine[:3, :3].numpy(), axis=0)
    ]
    figure, axes = plt.subplots(2, 3, figsize=(12, 8))
    for column, (title, image) in enumerate(grids.items()):
        volume = image[0].numpy()
        axes[0, column].imshow(volume[:, :, volume.shape[2] // 2].T, cmap="gray", origin="lower")
        axes[1, column].imshow(volume[volume.shape[0] // 2].T, cmap="gray", origin="lower")
        axes[0, column].set_title(title, fontsize=9)
        for row in range(2):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    axes[0, 0].set_ylabel("axial (A–P up)")
    axes[1, 0].set_ylabel("sagittal (S up)")
    figure.suptitle(
        "One phantom on the BraTS grid, each panel with square pixels: the resized grid's voxels are "
        f"{voxel_mm[0]:.1f}×{voxel_mm[1]:.1f}×{voxel_mm[2]:.1f} mm",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return {"resized_voxel_mm": voxel_mm}


def _gb(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1e9:.2f}"


def _alive(plan: dict, count: int = 3) -> str:
    return "; ".join(
        f"{t['count']}× {t['shape']} {t['made_by']} ({_gb(t['bytes'])} GB)" for t in plan["alive_at_peak"][:count]
    )


def _held_by_attention(plan: dict) -> bool:
    """Whether softmax outputs (attention score matrices) are the largest tensor at the peak and, together, a third
    or more of the peak above the floor."""
    scores = sum(t["bytes"] for t in plan["alive_at_peak"] if "softmax" in t["made_by"])
    return "softmax" in plan["alive_at_peak"][0]["made_by"] and scores >= (plan["peak_bytes"] - plan["floor_bytes"]) / 3


def _plan_row(name: str, plan: dict) -> list[str]:
    return [
        name,
        _gb(plan["peak_bytes"]),
        _gb(plan["floor_bytes"]),
        _gb(plan["peak_bytes"] - plan["floor_bytes"]),
        "yes" if plan["peak_bytes"] <= GOAL_BYTES else "**no**",
        "yes" if plan["fits"] else "**no**",
        f"{plan['peak_phase']}, {plan['peak_module'] or '–'}",
    ]


def _measured_cells(plan: dict, measured: Mapping | None) -> list[str]:
    if not measured:
        return ["not measured", "", ""]
    if "error" in measured:
        return [f"not measured: {measured['error']}", "", ""]
    return [
        _gb(measured["peak_bytes"]),
        f"{plan['peak_bytes'] / measured['peak_bytes'] - 1:+.1%}",
        f"{measured['seconds']:.0f}",
    ]


def render_native_resolution(result: dict, command: str, machine: str, figure: str) -> str:
    """Markdown of :func:`native_resolution`'s result, with ``result["aspect"]`` of :func:`plot_aspect_ratio`."""
    plan_header = [
        "configuration",
        "planned peak GB",
        "floor GB",
        "peak − floor GB",
        "≤ 20 GB",
        f"fits {DEVICE_GB} GiB",
        "peak reached in",
    ]
    options = markdown_table(plan_header, [_plan_row(n, p) for n, p in result["options"].items()])
    grids = markdown_table(plan_header, [_plan_row(n, p) for n, p in result["grids"].items()])
    monai = markdown_table(
        plan_header, [_plan_row(f"MONAI DiffusionModelUNet, {n}", p) for n, p in result["monai"].items()]
    )
    alive = markdown_table(
        ["configuration", "largest tensors alive at the peak, above the floor"],
        [[n, _alive(p)] for n, p in {**result["options"], **result["grids"]}.items()],
    )
    largest = markdown_table(
        ["configuration", "parameters", f"largest cube in {DEVICE_GB} GiB", "its planned peak GB"],
        [
            [
                n,
                f"{r['plan']['params']:,}" if r["plan"] else "–",
                f"{r['size']}³" if r["size"] else "none",
                _gb(r["plan"]["peak_bytes"]) if r["plan"] else "–",
            ]
            for n, r in result["largest"].items()
        ],
    )
    step, sampling = result["measured_step"], result["sampling"]
    measured = markdown_table(
        ["what", "planned GB (cpu)", "measured GB (cpu)", "plan error", "measured s"],
        [
            [
                "one training step: paper's IDM, 192³ at 1 mm, batch 1, recompute_norms, no EMA",
                _gb(step["plan_cpu"]["peak_bytes"]),
                *_measured_cells(step["plan_cpu"], step.get("measured")),
            ],
            [
                "one DDIM sampling step: paper's IDM, 192³ at 1 mm, one sample",
                _gb(sampling["plan_cpu"]["peak_bytes"]),
                *_measured_cells(sampling["plan_cpu"], sampling.get("measured")),
            ],
        ],
    )
    mm = result["aspect"]["resized_voxel_mm"]
    return (
        "\n\n".join(
            [
                "# Native resolution: the paper's network on the BraTS 1 mm grid",
                f"Command: `{command}`  \nMachine: {machine}",
                (
                    "Every peak below is planned by `scripts/plan_memory.py` (`bundle.memory_plan`: the trainer's "
                    "own step on "
                    "FakeTensors, see `docs/memory_planner.md` for its accuracy, within 7.5% of six measured peaks) "
                    "for a "
                    f"`--device cuda --device_memory_gb {DEVICE_GB}` run, so it is a **prediction** for a GPU: no "
                    "GPU was lent "
                    "to this run. The planned GPU peak counts tensors only; the plan keeps 1 GiB of the card free "
                    "for the "
                    "CUDA context and library workspaces. The two measured rows at the end are on this machine's CPU."
                ),
                "## The grid",
                (
                    f"With `--spacing 1.0` the images are resampled to 1 mm (`Spacingd`) and cropped or padded to "
                    "`spatial_size` voxels. BraTS2020 and Decathlon Task01 share one atlas frame (240×240×155 at 1 "
                    "mm), so the "
                    "box is fixed in that frame and every case and every sample has one affine; `inference.json` "
                    "writes the "
                    f"samples padded back onto the 240×240×155 grid, where they overlay any case. The box used here, "
                    f"{BOX[0]}×{BOX[1]}×{BOX[2]}, crops 24 mm of background on each side in x and y and pads z from "
                    "155 to 192: "
                    "the brain of a BraTS case spans about 140 × 175 × 140 mm, so it fits (not checked against the "
                    "download here: no BraTS data on this machine). The network needs multiples of 64 with six "
                    "levels and "
                    "attention at the bottom (2⁵, ×2 for its checkerboard); another size is zero-padded inside the "
                    "network, so "
                    "192×224×160, the box the issue names, costs as much as 192×256×192 (1.33× the voxels of 192³)."
                ),
                f"![aspect ratio]({figure})",
                (
                    "The resized grid (the default, `spacing` null, as the paper) resizes each case's foreground "
                    "box to the "
                    f"cube: this synthetic brain's voxels become {mm[0]:.1f}×{mm[1]:.1f}×{mm[2]:.1f} mm, so the "
                    "network sees the head with its axes scaled unequally (the voxel is longest along the head's "
                    "longest axis), and the scaling differs from case to case with the head's extent. Keeping "
                    "the aspect "
                    "ratio (the native grid) gives every case the same physical voxel, so that shapes and sizes are "
                    "learned "
                    "in millimetres and samples can be overlaid on real cases; it costs memory, which is what the "
                    "engine "
                    "saves."
                ),
                "## The paper's network at 1 mm, batch 4 in micro-batches of 1 (192³)",
                options,
                (
                    f"**Goal ≤ 20 GB**: met with recompute_norms, or with amp, with the default EMA on; missed by "
                    f"{_gb(result['options']['float32, EMA (the default run)']['peak_bytes'] - GOAL_BYTES)} GB in "
                    "plain float32 "
                    "with EMA. Every configuration in the table fits a 24 GiB card."
                ),
                "### On other grids (recompute_norms, EMA)",
                grids,
                "### What holds the peak up",
                alive,
                (
                    "The floor (weights, gradients, AdamW's two moments and the EMA: 20 B per parameter, 8.5 GB) is "
                    "the largest "
                    "part of every peak; above it, the coupling conditioners' working set for one sample at level 0 "
                    "(64 "
                    "channels at 192³: 1.8 GB per tensor; their GroupNorm–SiLU stages, which recompute_norms drops, "
                    "0.9 GB each) "
                    "and, with amp, the float32 copies that autocast makes around the channel mixing. What would "
                    "lower it: an "
                    "optimizer step inside backward (no full set of gradients: −1.7 GB, the next issue), EMA weights "
                    "kept off "
                    "the GPU (−1.7 GB), and conditioners convolved in spatial tiles (their level-0 working set)."
                ),
                "## MONAI DiffusionModelUNet matched to the paper's network (±10% parameters), same grid and batch",
                monai,
                (
                    "The matched network (the benchmarks' pairing: the leanest `DiffusionModelUNet` within ±10% of "
                    "the "
                    f"parameters) has widths {result['monai_network']['channels']} with "
                    f"{result['monai_network']['num_res_blocks']} block per level: it spends its parameters at "
                    "depth, and its "
                    f"full-resolution tensors have {result['monai_network']['channels'][0]} channels where IDM's have "
                    f"{PAPER_WORKLOAD.channels[0]}. So it is not a network of the paper's width at full resolution: "
                    "one "
                    f"{PAPER_WORKLOAD.channels[0]} channels wide there would hold "
                    f"{PAPER_WORKLOAD.channels[0] // result['monai_network']['channels'][0]} times its level-0 "
                    "activations."
                ),
                "## The largest cube each benchmark configuration fits in 24 GiB (planned)",
                largest,
                (
                    "Where the attention's score matrices (N × N for N tokens, kept for backward) hold the peak: "
                    + "; ".join(
                        f"{name}: {_alive(r['plan'], 1)}"
                        for name, r in result["largest"].items()
                        if r["plan"] and _held_by_attention(r["plan"])
                    )
                    + ". They grow with the square of the voxels, so the largest cube of a network with attention at a "
                    "fine level is set by them, not by the convolutions: `docs/benchmarks.md` extrapolates its largest "
                    "cubes linearly in voxels from the sizes it measured, which leaves this term out. IDM's invertible "
                    "attention hands PyTorch's `scaled_dot_product_attention` contiguous tokens, so SDPA's fused "
                    "kernel runs and no N × N matrix exists; while it took the math path (a non-contiguous value "
                    "tensor, until 0.12.0), three 7.26 GB score matrices held the benchmark IDM's largest cube at 176³."
                ),
                "## Measured on this machine (CPU)",
                measured,
                (
                    "The training step is measured once after a warm-up that leaves what a first step would "
                    "(gradients, AdamW "
                    "state), as the plan's steady state, in a fresh process: its peak anonymous RSS above the value "
                    "before the "
                    "network was built. Batch 1 (one micro-batch of the step above) without EMA: with EMA the plan is "
                    f"{_gb(step['plan_cpu']['peak_bytes'] + result['options']['recompute_norms, EMA']['ema_bytes'])} "
                    "GB, "
                    "which does not fit this 24 GB machine beside its operating system and the other job it ran; the "
                    "EMA adds "
                    "its weights and nothing else. The sampling step is "
                    "one DDIM step (one network evaluation without gradients) of one sample; "
                    f"its planned GPU peak is {_gb(sampling['plan_cuda']['peak_bytes'])} GB, and a GPU's time per "
                    "step is "
                    "not measured here. `inference.json` shows a progress bar over the steps."
                ),
            ]
        )
        + "\n"
    )
