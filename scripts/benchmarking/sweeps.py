"""The benchmark suite's measurements: depth, resolution and batch sweeps over the four networks, the
paper configuration against its parameter/optimizer floor, and energy (docs/architecture.md, "Measuring").

Each measurement is a *row*: the workload's fields plus ``parameters``, ``stored_bytes`` (saved for
backward), ``peak`` (the fresh-process result of :mod:`scripts.benchmarking.peak_memory`), ``flops`` per
step and, where timed, ``step_seconds_per_round`` (one time per round of interleaved repetitions, see
:mod:`scripts.benchmarking.timing`) and their median ``step_seconds``, or ``step_seconds_error`` where the
timing process failed. A :class:`Budget` bounds the wall time of a suite's measurements (the GPU mode
must finish in 8 minutes): once it is spent, the remaining rows say ``skipped``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from bundle.diffusion import micro_batches

from .baselines import count_parameters
from .energy import find_energy_counter, measure_energy
from .flops import forward_flops, training_step_flops
from .peak_memory import OUT_OF_MEMORY, measure_peak_in_subprocess, start_peak_measurement
from .report import parameter_breakdown
from .saved_bytes import saved_activation_bytes
from .timing import measure_times_in_subprocess
from .workload import NETWORKS, Workload, build_network, make_training_step

__all__ = [
    "MEMORY_OPTIONS",
    "PAPER",
    "Budget",
    "SuitePlan",
    "batch_sweep",
    "depth_sweep",
    "energy_per_network",
    "largest_cube",
    "measure_row",
    "memory_options",
    "paper_configuration",
    "resolution_sweep",
]

GiB = 2**30
SKIPPED = "skipped (time budget spent)"
# The paper's configuration (Sec. 4) and its reported figures (Table 3).
PAPER = {
    "workload": Workload(
        "idm",
        64,
        batch_size=4,
        channels=(64, 128, 256, 512, 1024, 2048),
        attention_levels=(False, False, False, False, True, True),
    ),
    "parameters": 343.6e6,
    "gflops": 5.64,
    "peak_bytes": 6.71e9,
    "peak_minus_floor_bytes": 1.2e9,
}
BYTES_PER_PARAMETER_FLOOR = 16  # float32 weight + gradient + AdamW's two moments
# What an IDM user can trade for memory beyond the engine: back-propagating the batch one sample at a time
# (the trainer's micro_batch_size; the same gradient) and recomputing the coupling functions' GroupNorm–SiLU
# stages in backward (the network's recompute_norms). Workload fields per option.
MEMORY_OPTIONS = {
    "whole batch": {},
    "micro-batches of 1": {"micro_batch_size": 1},
    "micro-batches of 1 + recompute_norms": {"micro_batch_size": 1, "recompute_norms": True},
}


class Budget:
    """Wall-clock allowance of a suite run; ``None`` seconds means unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start >= self.seconds

    def process_timeout(self, grace: float = 60.0, unlimited: float = 3600.0) -> float:
        """Seconds a measuring process started now may run: what is left of the budget plus ``grace``, so a
        process started just before the budget is spent still finishes while one that would overrun it by
        minutes is stopped (its rows say so); ``unlimited`` without a budget."""
        if self.seconds is None:
            return unlimited
        return max(0.0, self.seconds - (time.perf_counter() - self.start)) + grace


@dataclass(frozen=True)
class SuitePlan:
    """What one suite run measures. :meth:`full` (CPU, every figure), :meth:`quick` (CPU, < 5 min) and
    :meth:`gpu` (one GPU, 8 minutes, sizes continued until nothing fits in ``memory_limit_bytes``).
    ``channels`` are the reference IDM's widths (2 blocks per level, attention at the last two levels)."""

    depths: tuple[int, ...] = (1, 2, 4, 8)
    depth_size: int = 32
    sizes: tuple[int, ...] = (32, 48, 64, 96, 128)
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    batch_size_at: int = 64
    repeats: int = 5
    energy_seconds: float = 120.0
    paper_peak: bool = True
    quality_epochs: int = 16
    quality_size: int = 32
    quality_channels: tuple[int, ...] = (16, 32, 64)
    memory_limit_bytes: int = 24 * GiB
    budget_seconds: float | None = None
    channels: tuple[int, ...] = (16, 32, 64, 128)

    @classmethod
    def full(cls) -> SuitePlan:
        return cls()

    @classmethod
    def quick(cls) -> SuitePlan:
        return cls(
            depths=(1, 8),
            depth_size=32,
            sizes=(16, 32),
            batch_sizes=(1, 2),
            batch_size_at=32,
            repeats=3,
            energy_seconds=5.0,
            paper_peak=False,
            quality_epochs=2,
            quality_size=16,
            quality_channels=(8, 16, 32),
            channels=(8, 16, 32, 64),
        )

    @classmethod
    def gpu(cls) -> SuitePlan:
        """6.5 minutes of measurements (the resolution and depth sweeps first; what comes after them is cut
        where the budget is spent), then the quality comparison: about 8 minutes on one GPU. GPU step times
        vary little: 3 rounds."""
        return cls(
            sizes=(32, 64, 96, 128, 160, 192, 224, 256, 320),
            repeats=3,
            energy_seconds=15.0,
            budget_seconds=390.0,
        )


def _skipped(workload: Workload) -> dict:
    return {**workload.to_dict(), "skipped": SKIPPED}


def measure_row(workload: Workload, plan: SuitePlan, budget: Budget, device: torch.device) -> dict:
    """Parameters, FLOPs per step, stored bytes and fresh-process peak of one workload.

    FLOPs and parameters are counted (on the meta device) while the fresh process measures the peak.
    Stored bytes are those of one micro-batch's forward, counted only when the step fits (a configuration
    that does not fit could not hold its stored activations either)."""
    if budget.spent:
        return _skipped(workload)
    peak = start_peak_measurement(workload, plan.memory_limit_bytes)
    row = {**workload.to_dict(), "flops": training_step_flops(workload)}
    with torch.device("meta"):
        row["parameters"] = count_parameters(build_network(workload))
    row["peak"] = peak.result(budget.process_timeout())
    if "error" not in row["peak"]:
        model = build_network(workload).to(device)
        first = micro_batches(workload.batch_size, workload.micro_batch_size)[0]
        row["stored_bytes"] = saved_activation_bytes(
            partial(make_training_step(workload, model, device).loss, first), model
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next configurations' processes need the memory
    return row


def _time_rows(rows: list[dict], plan: SuitePlan, budget: Budget) -> None:
    """Adds ``step_seconds_per_round`` and their median ``step_seconds`` (interleaved repetitions in one fresh
    process) to the rows that fit, or ``step_seconds_error`` where that process failed."""
    fitting = [r for r in rows if "peak" in r and "error" not in r["peak"]]
    if budget.spent or not fitting:
        return
    workloads = [Workload(**{k: r[k] for k in Workload.__dataclass_fields__}) for r in fitting]
    try:
        per_workload = measure_times_in_subprocess(workloads, plan.repeats, budget.process_timeout())
    except RuntimeError as error:  # the suite goes on; the rows say why
        for row in fitting:
            row["step_seconds_error"] = str(error)[-500:]
        return
    for row, rounds in zip(fitting, per_workload, strict=True):
        row["step_seconds_per_round"] = rounds
        row["step_seconds"] = statistics.median(rounds)


def _reference(plan: SuitePlan, network: str, size: int, **fields) -> Workload:
    return Workload(network, size, channels=plan.channels, **fields)


def depth_sweep(plan: SuitePlan, budget: Budget, device: torch.device, progress=None) -> list[dict]:
    """``num_blocks`` in ``plan.depths`` at ``plan.depth_size``³, batch 1. The MONAI baselines keep the
    widths matched at 2 blocks (``baseline_widths_at=2``) and get ``num_res_blocks = num_blocks``."""
    rows = []
    for depth in plan.depths:
        for network in NETWORKS:
            workload = _reference(plan, network, plan.depth_size, num_blocks=depth, baseline_widths_at=2)
            rows.append(measure_row(workload, plan, budget, device))
            progress and progress.update()
    return rows


def _measured_already(rows: Sequence[dict], workload: Workload) -> dict | None:
    """A copy of the row of ``rows`` that measured ``workload`` (not skipped), if any."""
    for row in rows:
        if "skipped" not in row and all(row.get(k) == v for k, v in workload.to_dict().items()):
            return dict(row)
    return None


class _Group:
    """The rows of one timed group (one size, one batch size): rows of ``measured`` with the same workload
    are reused, times included; the group is timed where any row was measured anew."""

    def __init__(self, measured: Sequence[dict]) -> None:
        self.measured, self.rows, self.all_reused = measured, [], True

    def add(self, workload: Workload, plan: SuitePlan, budget: Budget, device: torch.device) -> dict:
        row = _measured_already(self.measured, workload)
        self.all_reused &= row is not None
        self.rows.append(row or measure_row(workload, plan, budget, device))
        return self.rows[-1]

    def timed(self, plan: SuitePlan, budget: Budget) -> list[dict]:
        if not self.all_reused:
            _time_rows(self.rows, plan, budget)
        return self.rows


def resolution_sweep(plan: SuitePlan, budget: Budget, device: torch.device, progress=None) -> list[dict]:
    """Cubes ``plan.sizes`` at the reference width, batch 1, timed per size; a network is not tried at
    larger sizes once it has run out of memory."""
    rows, out_of_memory = [], set()
    for size in plan.sizes:
        group = _Group(measured=())
        for network in NETWORKS:
            workload = _reference(plan, network, size)
            if network in out_of_memory:
                group.rows.append({**workload.to_dict(), "peak": {"error": f"{OUT_OF_MEMORY} (at a smaller size)"}})
            elif group.add(workload, plan, budget, device).get("peak", {}).get("error") == OUT_OF_MEMORY:
                out_of_memory.add(network)
            progress and progress.update()
        rows += group.timed(plan, budget)
    return rows


def batch_sweep(
    plan: SuitePlan, budget: Budget, device: torch.device, measured: Sequence[dict] = (), progress=None
) -> list[dict]:
    """Batch sizes ``plan.batch_sizes`` at ``plan.batch_size_at``³, timed per batch size. Rows of ``measured``
    (the resolution sweep's batch-1 rows) are reused, times included, where a whole group is there."""
    rows = []
    for batch_size in plan.batch_sizes:
        group = _Group(measured)
        for network in NETWORKS:
            group.add(_reference(plan, network, plan.batch_size_at, batch_size=batch_size), plan, budget, device)
            progress and progress.update()
        rows += group.timed(plan, budget)
    return rows


def largest_cube(rows: Sequence[dict], network: str, limit_bytes: int, divisor: int = 16) -> dict:
    """The largest cube (a multiple of ``divisor``) whose training step fits in ``limit_bytes``.

    ``measured``: the largest size that ran; ``first_out_of_memory``: the smallest that did not. Where the
    sweep ended before either (a size skipped once the time budget was spent, or one that failed otherwise),
    ``unmeasured_from`` names that size and ``measured`` is only a lower bound. Where every size ran,
    ``extrapolated`` follows the total memory (post-warm-up baseline + peak) linearly in the voxel count from
    the two largest sizes, which is how activation memory scales at fixed width.
    """
    mine = sorted((r for r in rows if r.get("network") == network), key=lambda r: r["size"])
    ran = [r for r in mine if "peak_bytes" in r.get("peak", {})]
    failed = [r["size"] for r in mine if r.get("peak", {}).get("error", "").startswith(OUT_OF_MEMORY)]
    result: dict = {"measured": ran[-1]["size"] if ran else None, "first_out_of_memory": min(failed, default=None)}
    if failed:
        return result
    unmeasured = [r["size"] for r in mine if "peak_bytes" not in r.get("peak", {})]
    if unmeasured:
        result["unmeasured_from"] = unmeasured[0]
        return result
    if len(ran) < 2:
        return result
    (a, b) = ran[-2:]
    total = [r["peak"]["baseline_bytes"] + r["peak"]["peak_bytes"] for r in (a, b)]
    slope = (total[1] - total[0]) / (b["size"] ** 3 - a["size"] ** 3)
    if slope <= 0:
        return result
    cube = ((limit_bytes - total[1]) / slope + b["size"] ** 3) ** (1 / 3)
    result["extrapolated"] = int(cube // divisor * divisor)
    return result


def paper_configuration(plan: SuitePlan, budget: Budget) -> dict:
    """The paper's configuration (batch 4, 64³): parameters by layer kind, FLOPs per training step and
    per forward pass of one sample, and (when ``plan.paper_peak``) the measured peak of each of
    :data:`MEMORY_OPTIONS` (``peaks``, by option) against the 16 bytes/parameter floor of weights,
    gradients and AdamW state."""
    workload: Workload = PAPER["workload"]
    with torch.device("meta"):
        breakdown = parameter_breakdown(build_network(workload))
    result = {
        "workload": workload.to_dict(),
        "parameters": breakdown,
        "flops_per_step": training_step_flops(workload),
        "forward_flops_per_sample": forward_flops(replace(workload, batch_size=1)),
        "floor_bytes": BYTES_PER_PARAMETER_FLOOR * breakdown["total"],
    }
    if plan.paper_peak:
        result["peaks"] = {
            label: {"skipped": SKIPPED}
            if budget.spent
            else measure_peak_in_subprocess(replace(workload, **options), timeout=budget.process_timeout())
            for label, options in MEMORY_OPTIONS.items()
        }
    return result


def memory_options(plan: SuitePlan, budget: Budget, device: torch.device, progress=None) -> list[dict]:
    """The memory-efficient IDM at the reference width, ``plan.batch_size_at``³ and the largest batch of
    ``plan.batch_sizes``, with each of :data:`MEMORY_OPTIONS` (row key ``option``): peak, stored bytes,
    FLOPs, and step times measured together."""
    rows = []
    for label, options in MEMORY_OPTIONS.items():
        workload = _reference(plan, "idm", plan.batch_size_at, batch_size=max(plan.batch_sizes), **options)
        rows.append({"option": label, **measure_row(workload, plan, budget, device)})
        progress and progress.update()
    _time_rows(rows, plan, budget)
    return rows


def energy_per_network(plan: SuitePlan, budget: Budget, device: torch.device, progress=None) -> dict:
    """Energy and temperature over the first ``plan.energy_seconds`` of training steps of each network at
    ``plan.batch_size_at``³, batch 1; ``{"n/a": reason}`` when no counter is readable."""
    counter = find_energy_counter()
    if isinstance(counter, str):
        progress and progress.update(len(NETWORKS))
        return {"n/a": counter}
    results = {}
    for network in NETWORKS:
        workload = _reference(plan, network, plan.batch_size_at)
        if budget.spent:
            results[network] = {"skipped": SKIPPED}
        else:
            model = build_network(workload).to(device)
            results[network] = measure_energy(
                make_training_step(workload, model, device)[0], plan.energy_seconds, counter
            )
            del model
        progress and progress.update()
    return results
