"""What spare memory buys: the time–memory curve of the engine's ``memory_budget`` and the optimizer step inside
backward on the paper's network (``python scripts/benchmark.py budget`` → docs/memory_budget.md)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from bundle.memory_plan import plan_config
from bundle.networks.storage_plan import choose_stored, step_costs

from .peak_memory import measure_peak_in_subprocess
from .report import markdown_table
from .sweeps import PAPER
from .timing import measure_times_in_subprocess, paired_ratio
from .workload import Workload, build_network

__all__ = [
    "BUDGET_SECTION",
    "BUDGET_SHARES",
    "budget_curve",
    "budget_summary",
    "paper_update",
    "plot_curve",
    "render_budget_report",
    "replace_budget_section",
    "step_costs_of",
]

BUDGET_SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, math.inf)  # of the bytes all the trunk's steps would keep
TRAIN = str(Path(__file__).resolve().parents[2] / "configs" / "train.json")
MB = 1e6
BUDGET_SECTION = "## Spending spare memory: memory_budget and optimizer_in_backward"
# the paper's network with the ordinary update and the update inside backward (Workload fields), EMA off as the
# paper trains and on as configs/train.json does, and with the coupling functions' norms recomputed
PAPER_VARIANTS = {
    "ordinary, EMA off": {},
    "in backward, EMA off": {"optimizer_in_backward": True},
    "in backward + recompute_norms, EMA off": {"optimizer_in_backward": True, "recompute_norms": True},
    "ordinary, EMA on": {"ema": True},
    "in backward, EMA on": {"optimizer_in_backward": True, "ema": True},
}


def step_costs_of(workload: Workload) -> list:
    """The trunk steps' :class:`~bundle.networks.storage_plan.StepCost` at the workload's shapes (meta device)."""
    with torch.device("meta"):
        network = build_network(workload)
        shape = (workload.batch_size, workload.channels[0]) + (workload.size,) * workload.spatial_dims
        x = torch.empty(shape, requires_grad=True)
        cond = torch.empty(workload.batch_size, network.time_mlp[-1].out_features, requires_grad=True)
        return step_costs(list(network.trunk.sequence.steps), (x,), cond)


def _label(share: float) -> str:
    return "unlimited" if math.isinf(share) else "0 (rebuild all)" if share == 0 else f"{share:.0%} of all"


def budget_curve(size: int = 64, batch_size: int = 4, repeats: int = 4, timeout: float = 7200) -> dict:
    """Peak (fresh process each) and step time (one process, interleaved) of the memory-efficient IDM at each of
    :data:`BUDGET_SHARES`, beside IDM plain autograd and MONAI's ``DiffusionModelUNet`` plain and checkpointed."""
    base = Workload("idm", size, batch_size=batch_size)
    costs = step_costs_of(base)
    total = sum(c.stored_bytes for c in costs)
    rows = [{"label": "IDM plain autograd", "workload": replace(base, network="idm_plain")}]
    for share in BUDGET_SHARES:
        budget = math.inf if math.isinf(share) else share * total
        kept = choose_stored(costs, budget)
        rows.append(
            {
                "label": f"IDM, budget {_label(share)}",
                "share": share,
                "budget_bytes": budget,
                "steps_kept": sum(kept),
                "steps": len(kept),
                "workload": replace(base, memory_budget=budget),
            }
        )
    rows += [
        {"label": "MONAI DiffusionModelUNet", "workload": replace(base, network="monai")},
        {"label": "MONAI DiffusionModelUNet + checkpointing", "workload": replace(base, network="monai_checkpointed")},
    ]
    for row in rows:
        row["peak"] = measure_peak_in_subprocess(row["workload"], timeout=timeout)
    seconds = measure_times_in_subprocess([row["workload"] for row in rows], repeats, timeout=timeout)
    for row, times in zip(rows, seconds, strict=True):
        row["seconds"] = times
        row["ratio"] = paired_ratio(times, seconds[0])
        row["workload"] = row["workload"].to_dict()
    return {"size": size, "batch_size": batch_size, "total_kept_bytes": total, "repeats": repeats, "rows": rows}


def paper_update(quick: bool = False, repeats: int = 2, timeout: float = 7200) -> dict:
    """The paper's network (batch 4, 64³; ``quick``: narrower, batch 1) with the ordinary step and with the update
    inside backward, EMA off (as the paper trains) and on: the measured peak (what building and a warm-up step
    left allocated plus the step's peak above it) per parameter, the update's step time against the ordinary one,
    and the memory plan's prediction (on CUDA) of both and of the peak at memory budgets."""
    workload: Workload = PAPER["workload"]
    if quick:  # (six levels need 64³: the bottom's attention pairs voxels along an axis of 2)
        workload = replace(workload, batch_size=1, channels=(8, 16, 32, 64, 128, 256))
    with torch.device("meta"):
        params = sum(p.numel() for p in build_network(workload).parameters())
    variants = {}
    for label, fields in PAPER_VARIANTS.items():
        peak = measure_peak_in_subprocess(replace(workload, **fields), timeout=timeout)
        total = peak.get("retained_bytes", 0) + peak.get("peak_bytes", 0)
        variants[label] = {"peak": peak, "total_bytes": total, "bytes_per_parameter": total / params}
    ordinary, fused = workload, replace(workload, optimizer_in_backward=True)
    seconds = measure_times_in_subprocess([ordinary, fused], repeats, timeout=timeout)
    overrides = {
        "batch_size": workload.batch_size,
        "spatial_size": [workload.size] * 3,
        "ema_decay": 0,
        "device": "cuda",
        "device_memory_gb": 80,
        "network_def#channels": list(workload.channels),
    }
    costs = step_costs_of(workload)
    total = sum(c.stored_bytes for c in costs)
    planned = {}
    for share in (0.0, 0.25, 0.5, math.inf):
        budget = math.inf if math.isinf(share) else share * total
        plan = plan_config(TRAIN, overrides | {"memory_budget": budget}).plan
        planned[_label(share)] = {
            "peak_bytes": plan.peak_bytes,
            "floor_bytes": plan.floor_bytes,
            "steps_kept": sum(choose_stored(costs, budget)),
        }
    for label, fields in PAPER_VARIANTS.items():
        plan = plan_config(
            TRAIN,
            overrides
            | {
                "memory_budget": 0,
                "ema_decay": 0.999 if fields.get("ema") else 0,
                "optimizer_in_backward": fields.get("optimizer_in_backward", False),
                "recompute_norms": fields.get("recompute_norms", False),
            },
        ).plan
        planned[label] = {
            "peak_bytes": plan.peak_bytes,
            "floor_bytes": plan.floor_bytes,
            "bytes_per_parameter": plan.peak_bytes / params,
        }
    result = {
        "workload": workload.to_dict(),
        "parameters": params,
        "variants": variants,
        "seconds": {"ordinary": seconds[0], "in backward": seconds[1]},
        "ratio": paired_ratio(seconds[1], seconds[0]),
        "total_kept_bytes": total,
        "planned": planned,
    }
    if torch.cuda.is_available():  # the paper's network at budgets: minutes on a GPU, hours on the CPU
        shares = [0.0, 0.25, 0.5, math.inf]
        timed = [replace(workload, memory_budget=math.inf if math.isinf(s) else s * total) for s in shares]
        times = measure_times_in_subprocess(timed, repeats, timeout=timeout)
        result["budget_ratios"] = {_label(s): paired_ratio(t, times[0]) for s, t in zip(shares, times, strict=True)}
    return result


def _ratio(ratio) -> str:
    median, low, high = ratio
    return f"{median:.2f}× ({low:.2f}–{high:.2f})"


def _peak(row: dict) -> float | None:
    return None if "error" in row["peak"] else row["peak"]["peak_bytes"]


def plot_curve(curve: dict, path: Path) -> None:
    """Step time relative to plain autograd against peak memory: the budgets as a line, the others as points."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    idm = [r for r in curve["rows"] if "share" in r and _peak(r) is not None]
    axes.plot([_peak(r) / MB for r in idm], [r["ratio"][0] for r in idm], "o-", label="IDM, memory_budget 0 → ∞")
    for r in idm:
        axes.annotate(
            _label(r["share"]), (_peak(r) / MB, r["ratio"][0]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    for r, marker in zip([r for r in curve["rows"] if "share" not in r], "s^v", strict=True):
        if _peak(r) is not None:
            axes.plot(_peak(r) / MB, r["ratio"][0], marker, label=r["label"])
    axes.set_xlabel("peak memory of the step above the weights, gradients and optimizer state (MB)")
    axes.set_ylabel("step time / IDM plain autograd")
    axes.set_title(f"One training step at {curve['size']}³, batch {curve['batch_size']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _curve_goals(curve: dict) -> list[list[str]]:
    """The issue's goals of the time–memory curve: (goal, measured, verdict) rows."""
    rows = curve["rows"]
    plain = rows[0]
    budgets = [r for r in rows if "share" in r]
    unlimited, zero = budgets[-1], budgets[0]
    half = [r for r in budgets if _peak(r) is not None and _peak(plain) and _peak(r) <= 0.5 * _peak(plain)]
    best_half = min(half, key=lambda r: r["ratio"][0]) if half else None
    goals = [
        [
            "≤ 1.05× plain autograd's step time where everything is kept",
            f"unlimited: {_ratio(unlimited['ratio'])}",
            "met" if unlimited["ratio"][0] <= 1.05 else "**missed**",
        ],
        [
            "≤ 1.15× at half of plain autograd's activation memory",
            "no budget at or below half"
            if best_half is None
            else f"{_label(best_half['share'])}: peak {_peak(best_half) / _peak(plain):.2f}× plain's, "
            f"{_ratio(best_half['ratio'])}",
            "met" if best_half is not None and best_half["ratio"][0] <= 1.15 else "**missed**",
        ],
        ["today's figure at budget 0 (1.28–1.33× in benchmarks.md)", _ratio(zero["ratio"]), "for comparison"],
    ]
    return goals


def _paper_goals(paper: dict) -> list[list[str]]:
    """The issue's goals of the update in backward, each for the variant with and without recompute_norms."""
    v = paper["variants"]

    def row(goal: str, labels: tuple[str, ...], limit: float) -> list[str]:
        values = [(label, v[label]["bytes_per_parameter"]) for label in labels if label in v]
        measured = "; ".join(f"{label}: {value:.3f} B" for label, value in values)
        return [goal, measured, "met" if any(value <= limit for _, value in values) else "**missed**"]

    return [
        row(
            "peak ≤ 15 B/parameter, in backward, EMA off",
            ("in backward, EMA off", "in backward + recompute_norms, EMA off"),
            15,
        ),
        row("the same with EMA on (+4 B/parameter: ≤ 19 B)", ("in backward, EMA on",), 19),
    ]


def budget_summary(result: dict) -> str:
    """The section of ``benchmarks.md`` on the budget and the update in backward: the goals of
    ``memory_budget.md`` (``python scripts/benchmark.py budget``) with its command."""
    curve, paper = result["curve"], result["paper"]
    w = paper["workload"]
    return "\n".join(
        [
            BUDGET_SECTION,
            "",
            (
                f"From `{result['command']}` ([memory_budget.md](memory_budget.md): the whole curve, the figure, the "
                f"planned peaks of the paper's network at budgets). The time–memory curve of the benchmark IDM at "
                f"{curve['size']}³, batch {curve['batch_size']}, as `memory_budget` goes from 0 to unlimited, and the "
                f"paper's network ({paper['parameters'] / 1e6:.1f}M parameters, batch {w['batch_size']}, "
                f"{w['size']}³) with "
                "`optimizer_in_backward`:"
            ),
            "",
            markdown_table(["goal", "measured", "verdict"], _curve_goals(curve) + _paper_goals(paper)),
            "",
            "| update | measured peak | bytes / parameter |",
            "|---|---|---|",
            *(
                f"| {label} | {v['total_bytes'] / 1e9:.2f} GB | {v['bytes_per_parameter']:.2f} |"
                for label, v in paper["variants"].items()
                if "error" not in v["peak"]
            ),
            "",
            f"Step time with the update inside backward / ordinary: {_ratio(paper['ratio'])}.",
        ]
    )


def replace_budget_section(markdown: str, section: str) -> str:
    """``markdown`` (a ``benchmarks.md``) with its :data:`BUDGET_SECTION` replaced by ``section`` (up to the next
    ``## `` heading), or ``section`` put before its energy section (else at its end) where it has none."""
    lines = markdown.splitlines()
    if BUDGET_SECTION in lines:
        start = lines.index(BUDGET_SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("## Energy")), len(lines))
    return "\n".join([*lines[:start], *section.strip().splitlines(), "", *lines[end:]]).rstrip() + "\n"


def render_budget_report(result: dict, command: str, png_name: str) -> str:
    curve, paper = result["curve"], result["paper"]
    rows = curve["rows"]
    plain = rows[0]
    lines = [
        "# What spare memory buys: the engine's memory budget and the optimizer step inside backward",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}  ",
        f"Wall time of the run: {result['minutes']:.1f} min",
        "",
        "## Time and memory of one training step as the budget grows",
        "",
        (
            f"The benchmark IDM (channels (16, 32, 64, 128), 2 blocks, attention at the last two levels) at "
            f"{curve['size']}³, batch {curve['batch_size']}; `memory_budget` as a share of the "
            f"{curve['total_kept_bytes'] / MB:.0f} MB that all the trunk's steps would keep. **Peak** = the step's "
            "peak "
            "above what the warm-up left allocated, in a fresh process per row (peak RSS on the CPU, the allocator's "
            "peak on a GPU). **Step time** = median over rounds in one process, every row timed in turn in each round "
            f"({curve['repeats']} rounds after a warm-up one); **× plain** = median (min–max) over the rounds of the "
            "row's time over IDM plain autograd's in the same round."
        ),
        "",
    ]
    table = []
    for r in rows:
        peak = _peak(r)
        table.append(
            [
                r["label"],
                f"{r['steps_kept']}/{r['steps']}" if "share" in r else "",
                "n/a" if peak is None else f"{peak / MB:.0f}",
                "n/a" if peak is None or _peak(plain) is None else f"{peak / _peak(plain):.2f}",
                f"{sorted(r['seconds'])[len(r['seconds']) // 2]:.2f}",
                _ratio(r["ratio"]),
            ]
        )
    lines += [
        markdown_table(["run", "steps kept", "peak MB", "peak / plain", "step s", "× plain"], table),
        "",
        f"![time against memory]({png_name})",
        "",
    ]
    goals = _curve_goals(curve)
    lines += ["### Goals", "", markdown_table(["goal", "measured", "verdict"], goals), ""]
    params = paper["parameters"]
    w = paper["workload"]
    lines += [
        "## The paper's network with the optimizer step inside backward",
        "",
        (
            f"Channels {tuple(w['channels'])}, attention at the last two levels, 2 blocks, batch {w['batch_size']}, "
            f"{w['size']}³, {params / 1e6:.1f}M parameters, AdamW (fused). **Peak** = what building the network and a "
            "warm-up step left allocated (weights, moments, gradients unless updated in backward, EMA) plus the step's "
            "peak above that, measured in a fresh process; per parameter."
        ),
        "",
    ]
    table = []
    for label, v in paper["variants"].items():
        ok = "error" not in v["peak"]
        table.append(
            [
                label,
                f"{v['total_bytes'] / 1e9:.2f} GB" if ok else v["peak"]["error"],
                f"{v['bytes_per_parameter']:.2f}" if ok else "n/a",
                (
                    f"{paper['planned'][label]['peak_bytes'] / 1e9:.2f} GB "
                    f"({paper['planned'][label]['bytes_per_parameter']:.1f} B)"
                ),
            ]
        )
    lines += [
        markdown_table(["update", "measured peak", "bytes / parameter", "planned on CUDA (B / parameter)"], table),
        "",
        (
            f"Step time inside backward / ordinary (EMA off, {len(paper['seconds']['ordinary'])} rounds): "
            f"{_ratio(paper['ratio'])}."
        ),
        "",
    ]
    goals = _paper_goals(paper)
    lines += [
        markdown_table(["goal", "measured", "verdict"], goals),
        "",
        "### The paper's network at memory budgets (planned, not measured)",
        "",
        (
            "The memory plan (`bundle.memory_plan`, FakeTensors on CUDA's allocator rounding, EMA off) of the same "
            f"step at budgets given as shares of the {paper['total_kept_bytes'] / 1e9:.1f} GB all its steps "
            "would keep: what a GPU would need. On a GPU the same command also times the step at these budgets "
            "(× budget 0); on this CPU it would take hours."
        ),
        "",
    ]
    ratios = paper.get("budget_ratios", {})
    table = [
        [
            label,
            f"{v['steps_kept']}",
            f"{v['peak_bytes'] / 1e9:.2f} GB",
            f"{(v['peak_bytes'] - v['floor_bytes']) / 1e9:.2f} GB",
            _ratio(ratios[label]) if label in ratios else "not measured (no GPU)",
        ]
        for label, v in paper["planned"].items()
        if "steps_kept" in v
    ]
    lines += [
        markdown_table(
            ["memory_budget", "steps kept", "planned peak", "planned peak − floor", "step time × budget 0"], table
        ),
        "",
    ]
    return "\n".join(lines)
