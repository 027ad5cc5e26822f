"""The memory planner (:mod:`bundle.memory_plan`) against measured peaks of the same training steps.

Each configuration is ``configs/train.json`` with overrides. Its plan is made in this process; its measurement runs
the configured trainer's iteration twice (the plan's steady state) in a fresh process (:class:`FreshProcess`:
``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors go back to the OS). On the CPU the measured peak is the peak
anonymous resident memory above its value before the network was built (``VmHWM`` less the file-backed and shared
pages, which no allocator hands out); on a GPU ``torch.cuda.max_memory_allocated`` from an empty allocator. Both
count the weights, gradients, optimizer state and EMA, as the plan's peak does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from bundle.memory_plan import plan_config, warm_up
from bundle.process_memory import proc_status_bytes

from .child_process import BUNDLE_ROOT, FreshProcess, measuring_device
from .peak_memory import PeakMeter
from .quality import TRAIN_CONFIG, network_definitions
from .report import markdown_table
from .workload import Workload

__all__ = ["ACCURACY_CONFIGURATIONS", "measure_configured_step", "planner_accuracy", "render_planner_accuracy"]

CONFIG = str(BUNDLE_ROOT / TRAIN_CONFIG)
_BENCHMARK = Workload("idm", 64)  # the benchmark suite's IDM (16–128, attention at the last two levels)
_NETWORKS = network_definitions(_BENCHMARK)
_PAPER = {
    "network_def#channels": [64, 128, 256, 512, 1024, 2048],
    "attention_levels": [False, False, False, False, True, True],
}


def _idm(channels: Sequence[int], attention: Sequence[bool]) -> dict:
    return {"network_def": _NETWORKS["idm"] | {"channels": list(channels), "attention_levels": list(attention)}}


ACCURACY_CONFIGURATIONS: dict[str, dict] = {  # name: train.json overrides (EMA, λ_L2 and AdamW as the defaults)
    "IDM 16–128, 64³, batch 4": _idm((16, 32, 64, 128), (False, False, True, True))
    | {"spatial_size": [64] * 3, "batch_size": 4},
    "IDM 32–256, 96³, batch 2": _idm((32, 64, 128, 256), (False, False, True, True))
    | {"spatial_size": [96] * 3, "batch_size": 2},
    "IDM 16–128, 128³, batch 1": _idm((16, 32, 64, 128), (False, False, True, True))
    | {"spatial_size": [128] * 3, "batch_size": 1},
    "IDM 16–128, 160×192×128, batch 2 in micro-batches of 1": _idm((16, 32, 64, 128), (False, False, True, True))
    | {"spatial_size": [160, 192, 128], "batch_size": 2, "micro_batch_size": 1},
    "MONAI DiffusionModelUNet (matched to IDM 16–128), 64³, batch 2": {
        "network_def": _NETWORKS["monai"],
        "spatial_size": [64] * 3,
        "batch_size": 2,
    },
    "paper's IDM (64–2048), 64³, batch 2 in micro-batches of 1": _PAPER
    | {"spatial_size": [64] * 3, "batch_size": 2, "micro_batch_size": 1},
}
QUICK_CONFIGURATIONS = ("IDM 16–128, 64³, batch 4", "MONAI DiffusionModelUNet (matched to IDM 16–128), 64³, batch 2")


def _measure(config_file: str, overrides: Mapping, real_first_step: bool = True) -> dict:
    """The peak of two training steps, or with ``real_first_step`` False of one after :func:`warm_up` (what a
    first step leaves, as the plan's steady state, at the cost of no step)."""
    from monai.bundle import ConfigParser

    device = measuring_device()
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(dict(overrides))
    parser["device"] = f"$torch.device('{device.type}')"
    trainer = parser["train"]["trainer"]  # the configured trainer, without data, handlers or the plan
    trainer.update(
        {
            "train_data_loader": [],
            "train_handlers": [],
            "decollate": False,
            "micro_batch_size": "@micro_batch_size",
            "amp": "$bundle.as_flag(@amp, 'amp')",
        }
    )
    for name in ("noise_scheduler", "noise_sampler"):
        parser.get_parsed_content(name)
    shape = [
        parser.get_parsed_content("batch_size"),
        len(parser.get_parsed_content("modalities")),
        *parser.get_parsed_content("spatial_size"),
    ]
    meter = PeakMeter(device)
    before = meter.allocated()
    meter.reset()
    start = time.perf_counter()
    engine = parser.get_parsed_content("train#trainer")
    images = torch.rand(shape, device=device)
    if not real_first_step:
        warm_up(engine.network, engine.optimizer, engine.ema)
    for _ in range(2 if real_first_step else 1):
        engine._iteration(engine, {"image": images})
    # on the CPU the peak RSS less the pages no allocator hands out (file-backed and shared)
    not_allocated = 0 if device.type == "cuda" else proc_status_bytes("RssFile") + proc_status_bytes("RssShmem")
    peak = meter.peak() - not_allocated - before
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start, "device": device.type}


def measure_configured_step(
    overrides: Mapping, config_file: str = CONFIG, timeout: float = 7200, real_first_step: bool = True
) -> dict:
    """The measured peak of two training steps of ``config_file`` with ``overrides`` (or, with ``real_first_step``
    False, of one after :func:`~bundle.memory_plan.warm_up`) in a fresh process: ``{"peak_bytes", "seconds",
    "device"}`` or ``{"error"}``."""
    return FreshProcess(_measure, config_file, dict(overrides), real_first_step).result(timeout)


def planner_accuracy(configurations: Mapping[str, Mapping] = ACCURACY_CONFIGURATIONS) -> dict:
    """``{"device", "rows": [{"name", "overrides", "plan" (MemoryPlan.to_json()), "measured"}]}``: each configuration
    planned on its own measurement's device kind, then measured."""
    device = measuring_device().type
    rows = []
    for name, overrides in configurations.items():
        plan = plan_config(CONFIG, {**overrides, "device": device}).plan.to_json()
        rows.append(
            {"name": name, "overrides": dict(overrides), "plan": plan, "measured": measure_configured_step(overrides)}
        )
    return {"device": device, "rows": rows}


def _gb(value: float) -> str:
    return f"{value / 1e9:.3f}"


def render_planner_accuracy(result: dict, command: str, machine: str) -> str:
    """Markdown: per configuration, the plan (floor, peak, where) beside the measured peak and the error."""
    measured_as = (
        "`torch.cuda.max_memory_allocated`"
        if result["device"] == "cuda"
        else "peak anonymous RSS of a fresh process above its value before the network was built"
    )
    rows = []
    errors = []
    for row in result["rows"]:
        plan, measured = row["plan"], row["measured"]
        if "error" in measured:
            cells = ["not measured: " + measured["error"], "", ""]
        else:
            error = plan["peak_bytes"] / measured["peak_bytes"] - 1
            errors.append(abs(error))
            cells = [_gb(measured["peak_bytes"]), f"{error:+.1%}", f"{measured['seconds']:.0f}"]
        rows.append(
            [
                row["name"],
                f"{plan['params']:,}",
                _gb(plan["floor_bytes"]),
                _gb(plan["peak_bytes"]),
                f"{plan['peak_phase']}, {plan['peak_module'] or '–'}",
                f"{plan['seconds']:.1f}",
                *cells,
            ]
        )
    table = markdown_table(
        [
            "configuration",
            "parameters",
            "planned floor GB",
            "planned peak GB",
            "planned peak reached in",
            "plan s",
            "measured peak GB",
            "plan error",
            "measured s (2 steps)",
        ],
        rows,
    )
    summary = (
        f"Largest error: {max(errors):.1%} over {len(errors)} measured configurations."
        if errors
        else "No configuration was measured."
    )
    return (
        "\n\n".join(
            [
                "# The memory planner against measured peaks",
                f"Command: `{command}`  \nMachine: {machine}",
                (
                    "Each configuration is `configs/train.json` with the overrides below (EMA 0.999, λ_L2 1e-4 and "
                    "fused AdamW "
                    "as the defaults). **Planned**: `scripts/plan_memory.py` (`bundle.memory_plan`): the trainer's "
                    "iteration run "
                    "on FakeTensors after a warm-up that leaves what a first step would (gradients, AdamW state, "
                    "EMA), counting "
                    "the bytes of live storages; the floor is weights, gradients, AdamW state and EMA. **Measured**: "
                    "two "
                    f"iterations for real (the second is the steady state), {measured_as}, in a fresh process under "
                    "`MALLOC_MMAP_THRESHOLD_=65536` (`scripts/benchmarking/plan_accuracy.py`). Plan error = planned "
                    "/ measured "
                    "− 1."
                ),
                table,
                summary,
                "## What the plan counts and what it leaves out",
                (
                    "The plan counts every tensor: weights, gradients, AdamW's moments, the EMA weights, the batch "
                    "and its noise, and whatever the forward pass, the engine's reconstruction and the gradients keep "
                    "alive, operator by operator. A FakeTensor cannot show what an operator allocates for itself; the "
                    "CPU plan adds the one such buffer that grows with the batch, oneDNN's copies of a convolution's "
                    "operands in blocks of 16 channels (measured per operator), at the convolution that makes it. "
                    "Left out: oneDNN's generated code and small buffers and the CPU process's own objects (the "
                    "tens of MB by which small configurations are measured above their plan), cuDNN's workspaces, the "
                    "CUDA context and the allocator's fragmentation on a GPU (the plan keeps 1 GiB of a GPU free for "
                    "them). Without a GPU, a `--device cuda` plan runs the CPU's operators without their oneDNN "
                    "buffers: a GPU's attention and convolution kernels may keep other working sets, so its figure is "
                    "a prediction to check with `torch.cuda.max_memory_allocated`."
                ),
            ]
        )
        + "\n"
    )
