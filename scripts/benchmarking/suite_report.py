"""``benchmarks.md`` and its figures from a suite result (:mod:`scripts.benchmarking.sweeps`).

Every verdict in the report is computed from the figures of the same run; nothing is typed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

from .budget_curve import BUDGET_SECTION, budget_summary
from .report import markdown_table
from .sweeps import MEMORY_OPTIONS, PAPER, largest_cube
from .timing import paired_ratio
from .workload import NETWORKS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["LABELS", "goals", "plot_suite", "render_suite"]

LABELS = {
    "idm": "IDM memory-efficient",
    "idm_plain": "IDM plain autograd",
    "monai": "MONAI DiffusionModelUNet",
    "monai_checkpointed": "MONAI DiffusionModelUNet + checkpointing",
}
MB, GB = 2**20, 1e9
FIGURES = {"depth": "memory_vs_depth.png", "resolution": "memory_vs_resolution.png", "time": "step_time.png"}


def _peak(row: dict) -> int | None:
    return row.get("peak", {}).get("peak_bytes")


def _by(rows: Sequence[dict], **match) -> dict[str, dict]:
    """``{network: row}`` of the rows matching every ``field=value``."""
    return {r["network"]: r for r in rows if all(r.get(k) == v for k, v in match.items())}


def _growth(rows: Sequence[dict], network: str, value: Callable[[dict], float | None]) -> float | None:
    mine = sorted((r for r in rows if r["network"] == network), key=lambda r: r["num_blocks"])
    if len(mine) < 2 or value(mine[0]) in (None, 0) or value(mine[-1]) is None:
        return None
    return value(mine[-1]) / value(mine[0]) - 1


def _fmt(value: float | None, spec: str, scale: float = 1.0, missing: str = "n/a", unit: str = "") -> str:
    return missing if value is None else format(value / scale, spec) + unit


def _memory_cell(row: dict) -> str:
    if "skipped" in row:
        return row["skipped"]
    return _fmt(_peak(row), ".0f", MB) if _peak(row) is not None else row["peak"].get("error", "n/a")


def _time_ratio(row: dict, reference: dict) -> tuple[float, float, float] | None:
    """``(median, min, max)`` over rounds of ``row``'s step time / ``reference``'s, both timed in the same
    rounds; None where either was not timed."""
    if "step_seconds_per_round" not in row or "step_seconds_per_round" not in reference:
        return None
    return paired_ratio(row["step_seconds_per_round"], reference["step_seconds_per_round"])


def _ratio_text(ratio: tuple[float, float, float] | None) -> str:
    return "n/a" if ratio is None else f"{ratio[0]:.2f}× ({ratio[1]:.2f}–{ratio[2]:.2f})"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def paper_peak_minus_floor(paper: dict, option: str = "whole batch") -> float | None:
    """Peak memory of the paper configuration with one of :data:`~scripts.benchmarking.sweeps.MEMORY_OPTIONS`
    minus the 16 B/parameter floor: what the network and its warm-up step retain (``retained_bytes``)
    plus the step's peak above that, minus the floor."""
    peak = paper.get("peaks", {}).get(option, {})
    if "peak_bytes" not in peak:
        return None
    return peak["retained_bytes"] + peak["peak_bytes"] - paper["floor_bytes"]


def _paper_goal(paper: dict) -> list[str]:
    """The paper-configuration goal row: every option's peak − floor; met if any option meets it, saying which."""
    goal = "paper configuration: peak − floor ≤ 0.5 GB (batch 4, 64³)"
    overs = {option: paper_peak_minus_floor(paper, option) for option in MEMORY_OPTIONS}
    measured = "; ".join(f"{option}: {_fmt(over, '.2f', GB, unit=' GB')}" for option, over in overs.items())
    if all(over is None for over in overs.values()):
        return [goal, measured, _verdict(None)]
    meeting = [option for option, over in overs.items() if over is not None and over <= 0.5e9]
    unmeasured = [option for option, over in overs.items() if over is None]
    verdict = _verdict(bool(meeting))
    if meeting and meeting[0] != "whole batch":
        verdict += f" with {meeting[0]}; **missed** with the whole batch at once"
    elif not meeting and unmeasured:
        verdict += f" with what was measured; not measured: {', '.join(unmeasured)}"
    return [goal, measured, verdict]


def goals(result: dict) -> list[list[str]]:
    """Rows ``[goal, measured, verdict]`` for the issue's goals, from the figures of ``result``."""
    depth, resolution, plan = result["depth"], result["resolution"], result["plan"]
    rows = []
    stored = {n: _growth(depth, n, lambda r: r.get("stored_bytes")) for n in NETWORKS}
    peak = {n: _growth(depth, n, _peak) for n in NETWORKS}
    flat = None if stored["idm"] is None or peak["idm"] is None else max(stored["idm"], peak["idm"]) <= 0.05
    baselines_grow = [peak[n] for n in ("monai", "monai_checkpointed")]
    rows.append(
        [
            f"IDM stored bytes and peak flat in depth (≤ 5% from {plan['depths'][0]} to {plan['depths'][-1]} blocks)",
            f"stored {_fmt(stored['idm'], '+.1%')}, peak {_fmt(peak['idm'], '+.1%')}",
            _verdict(flat),
        ]
    )
    rows.append(
        [
            "both MONAI baselines' peak grows with depth",
            ", ".join(f"{LABELS[n]} {_fmt(peak[n], '+.0%')}" for n in ("monai", "monai_checkpointed")),
            _verdict(None if None in baselines_grow else all(g > 0.05 for g in baselines_grow)),
        ]
    )
    size = plan["batch_size_at"]
    at = _by(resolution, size=size)
    me, monai, ckpt = (at.get(n, {}) for n in ("idm", "monai", "monai_checkpointed"))
    ratio = _peak(me) / _peak(monai) if _peak(me) and _peak(monai) else None
    rows.append(
        [
            f"peak at {size}³ ≤ 0.15× MONAI plain",
            _fmt(ratio, ".3f", unit="×"),
            _verdict(None if ratio is None else ratio <= 0.15),
        ]
    )
    below = None if not (_peak(me) and _peak(ckpt)) else _peak(me) < _peak(ckpt)
    rows.append(
        [
            f"peak at {size}³ below MONAI + checkpointing",
            f"{_fmt(_peak(me), '.0f', MB)} vs {_fmt(_peak(ckpt), '.0f', MB)} MB",
            _verdict(below),
        ]
    )
    times = [
        (size, ratio)
        for size in sorted({r["size"] for r in resolution})
        if (ratio := _time_ratio(*(_by(resolution, size=size).get(n, {}) for n in ("idm", "idm_plain"))))
    ]
    rows.append(
        [
            "step time memory-efficient / plain ≤ 1.4× (median over rounds)",
            ", ".join(f"{s}³ {_ratio_text(t)}" for s, t in times) or "n/a",
            _verdict(None if not times else all(t[0] <= 1.4 for _, t in times)),
        ]
    )
    against_ckpt = _time_ratio(me, ckpt)
    faster = None
    if against_ckpt and _peak(me) and _peak(ckpt):
        faster = against_ckpt[0] < 1 and _peak(me) <= _peak(ckpt)
    rows.append(
        [
            f"faster than MONAI + checkpointing at equal or lower memory ({size}³, batch 1)",
            (
                f"{_fmt(me.get('step_seconds'), '.2f')} vs {_fmt(ckpt.get('step_seconds'), '.2f')} s, "
                f"ratio {_ratio_text(against_ckpt)}"
            ),
            _verdict(faster),
        ]
    )
    rows.append(_paper_goal(result["paper"]))
    rows.append(_largest_cube_goal(result["largest_cube"]))
    return rows


def _largest_cube_goal(cubes: dict[str, dict]) -> list[str]:
    """The largest-cube goal row. A network whose sweep ended before it ran out of memory (``unmeasured_from``)
    has only a lower bound, ``≥ n³``: the verdict is n/a where such a bound decides it."""
    best = {n: c.get("extrapolated") or c.get("measured") for n, c in cubes.items()}
    lower_bound = {n: "unmeasured_from" in c for n, c in cubes.items()}
    measured = ", ".join(
        f"{LABELS[n]} " + ("n/a" if not best[n] else f"≥ {best[n]}³" if lower_bound[n] else f"{best[n]}³")
        for n in NETWORKS
    )
    others = [n for n in NETWORKS if n != "idm"]
    largest = best["idm"] >= max(best[n] or 0 for n in others) if best["idm"] else None
    undecided = lower_bound["idm"] if largest is False else largest and any(lower_bound[n] for n in others)
    return [
        "largest cube at batch 1 within the memory limit: IDM's the largest",
        measured,
        _verdict(None if undecided else largest),
    ]


def plot_suite(result: dict, output_dir: Path) -> None:
    """``memory_vs_depth.png``, ``memory_vs_resolution.png`` and ``step_time.png``."""
    panels = [
        (
            "depth",
            result["depth"],
            "num_blocks",
            "blocks per level",
            [
                ("bytes stored for backward (MB)", lambda r: r.get("stored_bytes"), MB),
                ("peak memory above baseline (MB)", _peak, MB),
            ],
        ),
        (
            "resolution",
            result["resolution"],
            "size",
            "cube side (voxels)",
            [
                ("bytes stored for backward (MB)", lambda r: r.get("stored_bytes"), MB),
                ("peak memory above baseline (MB)", _peak, MB),
            ],
        ),
        (
            "time",
            result["resolution"],
            "size",
            "cube side (voxels)",
            [
                ("median training-step time (s)", lambda r: r.get("step_seconds"), 1.0),
            ],
        ),
    ]
    for key, rows, x_field, x_label, series in panels:
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
        for ax, (title, value, scale) in zip(axes[0], series, strict=True):
            for network in NETWORKS:
                mine = sorted((r for r in rows if r["network"] == network and value(r)), key=lambda r: r[x_field])
                if mine:
                    ax.plot(
                        [r[x_field] for r in mine], [value(r) / scale for r in mine], marker="o", label=LABELS[network]
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output_dir / FIGURES[key], dpi=120)
        plt.close(fig)


def _row_cells(row: dict, first: str) -> list[str]:
    return [
        str(row[first]),
        LABELS[row["network"]],
        _fmt(row.get("parameters"), ".2f", 1e6, unit="M"),
        _fmt(row.get("stored_bytes"), ".1f", MB),
        _memory_cell(row),
        _fmt(row.get("flops"), ".1f", 1e9),
        "timing failed" if "step_seconds_error" in row else _fmt(row.get("step_seconds"), ".2f"),
    ]


def _time_ratios(rows: Sequence[dict], field: str) -> list[list[str]]:
    table = []
    for value in sorted({r[field] for r in rows}):
        group = _by(rows, **{field: value})
        table.append(
            [str(value)] + [_ratio_text(_time_ratio(group.get(n, {}), group.get("idm_plain", {}))) for n in NETWORKS]
        )
    return table


def _peak_cells(paper: dict, option: str) -> list[str]:
    peak = paper.get("peaks", {}).get(option, {})
    if "peak_bytes" in peak:
        measured = (
            f"{(peak['retained_bytes'] + peak['peak_bytes']) / GB:.2f} GB "
            f"(post-warm-up {peak['retained_bytes'] / GB:.2f} GB + step peak "
            f"{peak['peak_bytes'] / GB:.2f} GB; {peak['device']})"
        )
    else:
        measured = peak.get("error") or peak.get("skipped") or "not measured in this mode"
    return [measured, _fmt(paper_peak_minus_floor(paper, option), ".2f", GB, unit=" GB")]


def _paper_section(paper: dict) -> str:
    breakdown = markdown_table(
        ["layer kind", "parameters"], [[k, f"{v / 1e6:.1f}M"] for k, v in paper["parameters"].items()]
    )
    whole_peak, whole_over = _peak_cells(paper, "whole batch")
    table = markdown_table(
        ["", "this bundle", "paper"],
        [
            ["parameters", f"{paper['parameters']['total'] / 1e6:.1f}M", f"{PAPER['parameters'] / 1e6:.1f}M"],
            [
                "FLOPs per training step of the batch (forward + reconstruction + backward)",
                f"{paper['flops_per_step'] / 1e12:.2f} TFLOPs",
                f"{PAPER['gflops']} GFLOPs (definition not given)",
            ],
            ["FLOPs of one forward pass, one sample", f"{paper['forward_flops_per_sample'] / 1e9:.0f} GFLOPs", ""],
            [
                "floor: 16 B/parameter (weights, gradients, AdamW moments)",
                f"{paper['floor_bytes'] / GB:.2f} GB",
                f"{16 * PAPER['parameters'] / GB:.2f} GB",
            ],
            ["peak memory of a training step (whole batch)", whole_peak, f"{PAPER['peak_bytes'] / GB:.2f} GB"],
            ["peak − floor (goal ≤ 0.5 GB)", whole_over, f"~{PAPER['peak_minus_floor_bytes'] / GB:.1f} GB"],
        ],
    )
    options = markdown_table(
        ["memory option", "peak memory of a training step", "peak − floor"],
        [[option, *_peak_cells(paper, option)] for option in MEMORY_OPTIONS],
    )
    return (
        "## Paper configuration: channels 64…2048, attention at the last two levels, 2 blocks, batch 4, 64³\n\n"
        f"{table}\n\n"
        "Peak memory = what building the network and a warm-up step leave allocated (post-warm-up) plus the "
        "step's peak above that. Post-warm-up counts the process's own allocations: on the CPU the anonymous "
        "resident memory (`RssAnon`) after the warm-up minus before the network was built, so neither the "
        "interpreter nor the shared-library code that the first step pages in counts (a CUDA allocator sees "
        "neither). "
        "FLOPs are counted by `FlopCounterMode` on the meta device for the whole batch of 4. Where this step "
        "reaches its peak, phase by phase and engine step by engine step, and what bounds it: "
        "`python scripts/benchmark.py profile` (docs/paper_step_profile.md).\n\n"
        "### With the memory options\n\n"
        "The same step of batch 4 back-propagated one sample at a time (the trainer's `micro_batch_size`: "
        "gradient accumulation, the same gradient), and additionally with the network's `recompute_norms` "
        "(the coupling functions recompute their GroupNorm–SiLU stages in backward). Their cost in time is in "
        "the memory-options section below; `python scripts/benchmark.py profile --micro_batch_size 1 "
        "--recompute_norms true` profiles that step.\n\n"
        f"{options}\n\n"
        "### Parameters by layer kind\n\n"
        f"{breakdown}"
    )


def _memory_options_section(rows: Sequence[dict], plan: dict) -> str:
    whole = next((r for r in rows if r["option"] == "whole batch"), {})
    table = [
        [
            r["option"],
            _fmt(r.get("stored_bytes"), ".1f", MB),
            _memory_cell(r),
            _fmt(r.get("flops"), ".1f", 1e9),
            _fmt(r.get("step_seconds"), ".2f"),
            _ratio_text(_time_ratio(r, whole)),
        ]
        for r in rows
    ]
    return "\n\n".join(
        [
            (
                f"## Memory options: the memory-efficient IDM at {plan['batch_size_at']}³, batch "
                f"{max(plan['batch_sizes'])}"
            ),
            (
                "Stored = bytes saved for backward by one micro-batch's forward. Step times measured together, "
                "interleaved, in one fresh process; × whole batch = median (min–max) over rounds of the paired ratio."
            ),
            markdown_table(
                ["memory option", "stored MB", "peak MB", "GFLOPs / step", "step s", "× whole batch"], table
            ),
        ]
    )


def _energy_section(energy: dict, plan: dict) -> str:
    if "n/a" in energy:
        return f"## Energy and temperature\n\nn/a on this machine: {energy['n/a']}.\n"
    rows = [
        [
            LABELS[n],
            e.get("skipped") or f"{e['seconds']:.0f}",
            *(
                []
                if "skipped" in e
                else [
                    e["steps"],
                    f"{e['watts']:.0f}",
                    f"{e['joules_per_step']:.1f}",
                    _fmt(e["celsius_start"], ".0f"),
                    _fmt(e["celsius_max"], ".0f"),
                ]
            ),
        ]
        for n, e in energy.items()
    ]
    source = next((e["source"] for e in energy.values() if "source" in e), "n/a")
    return (
        "\n\n".join(
            [
                f"## Energy and temperature ({source})",
                (
                    f"Training steps of each network at {plan['batch_size_at']}³, batch 1, for "
                    f"{plan['energy_seconds']:.0f} s, "
                    "one network after another at the start of the suite (before the sweeps; the first starts on an "
                    "idle "
                    "device)."
                ),
                markdown_table(["network", "seconds", "steps", "mean W", "J / step", "°C start", "°C max"], rows),
            ]
        )
        + "\n"
    )


def _budget_section() -> str:
    """The section of ``python scripts/benchmark.py budget``'s last result (``docs/memory_budget.json``), which that
    command also writes into ``benchmarks.md``; a pointer to the command before it has run."""
    path = Path(__file__).resolve().parents[2] / "docs" / "memory_budget.json"
    if path.exists():
        return budget_summary(json.loads(path.read_text()))
    return f"{BUDGET_SECTION}\n\nNot measured yet: `python scripts/benchmark.py budget` writes it."


def render_suite(result: dict, quality_markdown: str | None) -> str:
    """The whole ``benchmarks.md``."""
    plan = result["plan"]
    depth_rows = [_row_cells(r, "num_blocks") for r in result["depth"]]
    growth = [
        [
            LABELS[n],
            _fmt(_growth(result["depth"], n, lambda r: r.get("stored_bytes")), "+.1%"),
            _fmt(_growth(result["depth"], n, _peak), "+.1%"),
        ]
        for n in NETWORKS
    ]
    resolution_rows = [_row_cells(r, "size") for r in result["resolution"]]
    batch_rows = [_row_cells(r, "batch_size") for r in result["batch"]]
    limit = plan["memory_limit_bytes"] / 2**30
    cubes = []
    for n in NETWORKS:
        c = result["largest_cube"][n]
        cubes.append(
            [
                LABELS[n],
                f"{c['measured']}³" if c["measured"] else "none",
                f"{c['first_out_of_memory']}³"
                if c["first_out_of_memory"]
                else f"not measured from {c['unmeasured_from']}³"
                if "unmeasured_from" in c
                else "—",
                f"{c['extrapolated']}³" if c.get("extrapolated") else "—",
            ]
        )
    header = ["{}", "network", "params", "stored MB", "peak MB", "GFLOPs / step", "step s"]
    sections = [
        "# Benchmarks: IDM vs plain autograd vs MONAI DiffusionModelUNet (with and without checkpointing)",
        (
            f"Command: `{result['command']}`  \nMachine: {result['machine']}  \nWall time of the run: "
            f"{result['wall_seconds'] / 60:.1f} min"
        ),
        (
            "One training step = forward, ε-MSE loss, backward and an AdamW update, 2 channels (T1, T2). IDM: "
            f"channels {tuple(plan['channels'])}, 2 blocks per level unless swept, attention at the last two levels. "
            "MONAI: the leanest `DiffusionModelUNet` within ±10% of the IDM's parameter count "
            "(`scripts.benchmarking.matched_monai_unet`); the checkpointed baseline wraps every residual and attention "
            "block in `torch.utils.checkpoint` (non-reentrant). **Stored** = bytes autograd keeps for backward "
            "(`saved_tensors_hooks`, parameters excluded). **Peak** = peak memory of the step above the "
            "post-warm-up baseline (parameters, gradients and optimizer state already allocated), each "
            "configuration in a fresh process: CUDA allocator peak on a GPU, peak RSS on the CPU "
            "(`scripts/benchmarking/peak_memory.py`). **Step s** = median over rounds of interleaved repetitions in "
            f"one fresh process per group ({plan['repeats']} rounds after a warm-up round; each round times every "
            "network of the group once, in turn; on the CPU under `MALLOC_MMAP_THRESHOLD_=65536`, as the peak "
            "processes, so freed memory returns to the OS). **Time ratios** (a × b–c) = median, minimum and maximum "
            "over those rounds of the ratio of two networks' times in the same round, so that the machine's slower "
            "drifts cancel out. **GFLOPs** = `FlopCounterMode` over forward and backward (the memory-efficient "
            "IDM's reconstruction included)."
        ),
        "## Goals",
        markdown_table(["goal", "measured", "verdict"], goals(result)),
        f"## Depth sweep at {plan['depth_size']}³, batch 1",
        (
            "The MONAI baselines keep the widths matched (±10%) to the 2-block IDM with 2 residual blocks per level "
            "and get `num_res_blocks` = blocks per level, so they deepen as the IDM does (parameter counts in the "
            "table)."
        ),
        f"![memory vs depth]({FIGURES['depth']})",
        markdown_table([header[0].format("blocks"), *header[1:]], depth_rows),
        f"### Growth from {plan['depths'][0]} to {plan['depths'][-1]} blocks per level",
        markdown_table(["network", "stored bytes", "peak memory"], growth),
        "## Resolution sweep, batch 1",
        f"![memory vs resolution]({FIGURES['resolution']})\n\n![step time]({FIGURES['time']})",
        markdown_table([header[0].format("size"), *header[1:]], resolution_rows),
        "### Step time relative to IDM plain autograd",
        markdown_table(["size", *(LABELS[n] for n in NETWORKS)], _time_ratios(result["resolution"], "size")),
        f"### Largest cube that trains at batch 1 within {limit:.0f} GiB",
        (
            "Measured = the largest size of the sweep that ran; out of memory = the smallest that did not; where "
            "the sweep ended before that (the time budget spent, or a failure given in the table above), the "
            "measured size is only a lower bound. Where every size ran, the limit is extrapolated: total memory "
            "(post-warm-up baseline + step peak) grows linearly with the voxel count at fixed width, fitted through "
            "the two largest sizes, rounded down to a multiple of 16."
        ),
        markdown_table(["network", "measured", "out of memory at", "extrapolated"], cubes),
        f"## Batch sweep at {plan['batch_size_at']}³",
        markdown_table([header[0].format("batch"), *header[1:]], batch_rows),
        markdown_table(["batch", *(LABELS[n] for n in NETWORKS)], _time_ratios(result["batch"], "batch_size")),
        _paper_section(result["paper"]),
        _memory_options_section(result["memory_options"], plan),
        _budget_section(),
        _energy_section(result["energy"], plan),
    ]
    if quality_markdown:
        sections.append(quality_markdown)
    return "\n\n".join(s.strip() for s in sections) + "\n"


def cube_limits(rows: Sequence[dict], limit_bytes: int) -> dict[str, dict]:
    """:func:`~scripts.benchmarking.sweeps.largest_cube` for every network."""
    return {n: largest_cube(rows, n, limit_bytes) for n in NETWORKS}
