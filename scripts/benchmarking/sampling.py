"""How few network evaluations does a trained model need? Every sampler of the bundle against the number of network
evaluations it spends per sample:

* generation: the generation study's IDM (ε-prediction; ``scripts/benchmark.py generation``) sampled by the full DDPM
  chain (T evaluations), DDIM with η = 0 and 1, PNDM and DPM-Solver++(2M) at a few step counts, and a rectified flow
  trained as that IDM was (the same data, network, steps and seed; only ``objective`` differs, trained here, resumed
  across sessions) by its Euler steps; each set of samples measured against the validation volumes with the
  generation measures (:func:`~bundle.sample_quality.compare_to_real`: the fraction within the real-vs-real spread
  and the distances behind it);
* translation: the synthesis study's conditioned IDM (``scripts/benchmark.py synthesis``, T1 → T2) by the same
  samplers, each validation case's translation scored against its real volume (:func:`~bundle.synthesis
  .translate_split`: SSIM and PSNR in the head, the BraSyn measures).

Beside each point the wall time per sample on this machine; for the paper's network at 1 mm, the FLOPs of one
evaluation (counted on the meta device) and what ``docs/native_resolution.json`` measured and planned for one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Subset

from bundle.checkpoint import load_checkpoint
from bundle.diffusion import DiffusionSampler
from bundle.run_record import TrainedModel
from bundle.sample_quality import compare_to_real
from bundle.synthesis import mean_std, translate_split

from .flops import forward_flops
from .generation import grid_in_words, run_config, train_once, validation_volumes
from .report import machine_description, markdown_table
from .sweeps import PAPER

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["compare_sampling", "render_sampling_markdown", "sampler_points", "write_sampling_report"]

FIGURE = "sampling.png"
FULL_CHAIN = "DDPM (T steps)"
FEW_STEP_SAMPLERS = {  # label: (sampler, η) of an ε model, each at the study's step counts
    "DDIM η = 0": ("ddim", 0.0),
    "DDIM η = 1": ("ddim", 1.0),
    "PNDM": ("pndm", 0.0),
    "DPM-Solver++(2M)": ("dpm_solver", 0.0),
}
FLOW_SAMPLER = "rectified flow, Euler"
STEPS = (5, 10, 20, 50)
FLOW_STEPS = (5, 10, 20, 30, 50)
GOAL_EVALUATIONS = 20
MODELS = {"epsilon": "IDM, ε", "rectified_flow": "IDM, rectified flow"}  # the generation models by objective


def sampler_points(
    objective: str, steps: Sequence[int] = STEPS, flow_steps: Sequence[int] = FLOW_STEPS
) -> list[tuple[str, str, float, int | None]]:
    """``(label, sampler, η, steps)`` of every point a model of ``objective`` is sampled at (steps None: T)."""
    if objective == "rectified_flow":
        return [(FLOW_SAMPLER, "euler", 0.0, n) for n in flow_steps]
    points = [(FULL_CHAIN, "ddpm", 0.0, None)]
    return points + [(label, name, eta, n) for label, (name, eta) in FEW_STEP_SAMPLERS.items() for n in steps]


class _Counted(nn.Module):
    """The network, counting its evaluations (calls)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.network(x, timesteps)


def _trained(run_dir: Path) -> tuple[_Counted, TrainedModel]:
    """The run's EMA weights (``model.pt``) in the network its record describes, counted, and the record."""
    model = TrainedModel(run_dir / "models" / "model.pt")
    network = load_checkpoint(model.network_def(), model.ckpt_path).eval()
    return _Counted(network), model


def _chain(model: TrainedModel, name: str, eta: float, steps: int | None, seed: int, **options) -> DiffusionSampler:
    scheduler = model.sampler(name, eta=eta)
    return DiffusionSampler(scheduler, steps or model.num_train_timesteps, seed=seed, progress=False, **options)


def measure_generation(
    run_dir: Path, points: Sequence[tuple], num_samples: int, seed: int, batch_size: int = 4
) -> list[dict]:
    """Per point of :func:`sampler_points`: ``num_samples`` samples of the run's model against its validation
    volumes (:func:`~bundle.sample_quality.compare_to_real`), the evaluations per sample and the seconds per sample."""
    network, model = _trained(run_dir)
    real = validation_volumes(run_dir)
    shape = (len(model.modalities), *model.spatial_size)
    batches = math.ceil(num_samples / batch_size)
    results = []
    for label, name, eta, steps in points:
        network.calls = 0
        start = time.perf_counter()
        samples = _chain(model, name, eta, steps, seed).draw(network, num_samples, shape, batch_size)
        seconds = time.perf_counter() - start
        comparison = compare_to_real(samples, real, model.modalities, seed=seed)
        results.append(
            {
                "sampler": label,
                "steps": steps or model.num_train_timesteps,
                "evaluations": network.calls // batches,
                "seconds_per_sample": seconds / num_samples,
                "within_spread": comparison["within_spread"],
                "distance_ratio": comparison["distance_ratio"],
                "comparison": comparison,
            }
        )
    return results


def measure_translation(run_dir: Path, points: Sequence[tuple], seed: int, num_cases: int) -> list[dict]:
    """Per point of :func:`sampler_points`: the run's translation of its first ``num_cases`` validation cases (with
    their tumour labels) scored against the real volumes (:func:`~bundle.synthesis.translate_split`), the evaluations
    per case and the seconds per case."""
    network, model = _trained(run_dir)
    parser = run_config(run_dir)
    parser.update({"preprocessing#segmentation": True})
    dataset = parser.get_parsed_content("validate#dataset")
    cases = min(num_cases, len(dataset))
    dataloader = DataLoader(Subset(dataset, range(cases)), batch_size=8, num_workers=0)
    results = []
    for label, name, eta, steps in points:
        network.calls = 0
        inferer = _chain(model, name, eta, steps, seed, num_channels=len(model.modalities), conditioned=True)
        start = time.perf_counter()
        with torch.no_grad():
            scores = translate_split(
                network, inferer, dataloader, model.modalities, model.condition_modalities, 2, "cpu"
            )
        seconds = time.perf_counter() - start
        results.append(
            {
                "sampler": label,
                "steps": steps or model.num_train_timesteps,
                "evaluations": network.calls // len(dataloader),
                "cases": cases,
                "seconds_per_case": seconds / cases,
                "model": scores["model"],
                "identity": scores["identity"],
            }
        )
    return results


def train_flow(work_dir: Path, generation_run: Path, num_threads: int | None = None) -> tuple[Path, float]:
    """Trains, in ``work_dir/flow``, the rectified flow twin of the generation study's IDM run ``generation_run``:
    its settings (``args.json``) with ``objective`` rectified_flow (a stopped run resumes:
    :func:`~scripts.benchmarking.generation.train_once`: a finished one is reused). Returns the run folder and its
    wall seconds."""
    args = json.loads((generation_run / "args.json").read_text())
    overrides = {k: v for k, v in args.items() if k not in ("ckpt_dir", "output_dir")} | {"objective": "rectified_flow"}
    return work_dir / "flow", train_once(work_dir / "flow", overrides, num_threads)


def _paper_evaluation() -> dict:
    """One evaluation of the paper's network at 1 mm (192³, one sample): FLOPs, and what
    ``docs/native_resolution.json`` planned (GPU) and measured (CPU) for one sampling step, where it is there."""
    workload = replace(PAPER["workload"], size=192, batch_size=1)
    result = {"flops": forward_flops(workload)}
    recorded = Path(__file__).resolve().parents[2] / "docs" / "native_resolution.json"
    if recorded.exists():
        sampling = json.loads(recorded.read_text())["sampling"]
        result |= {
            "planned_gpu_bytes": sampling["plan_cuda"]["peak_bytes"],
            "measured_cpu_seconds": sampling["measured"].get("seconds"),
        }
    return result


def compare_sampling(
    work_dir: str | Path,
    generation_dir: str | Path,
    translation_dir: str | Path | None = None,
    num_samples: int = 16,
    steps: Sequence[int] = STEPS,
    flow_steps: Sequence[int] = FLOW_STEPS,
    seed: int = 0,
    num_threads: int | None = None,
    translation_cases: int = 8,
) -> dict:
    """Trains the rectified flow twin of ``generation_dir/idm`` (:func:`train_flow`; reused once trained), then
    measures generation for both and, given ``translation_dir`` (a synthesis study's direction folder, e.g.
    ``runs/synthesis/t1_to_t2``), translation of its first ``translation_cases`` validation cases by its IDM:
    ``{"settings", "machine", "generation": {"epsilon":
    [point, …], "rectified_flow": [...]}, "translation": [...] or None, "paper_evaluation", "flow_training_seconds"}``.
    """
    work_dir, generation_run = Path(work_dir), Path(generation_dir) / "idm"
    flow_run, flow_seconds = train_flow(work_dir, generation_run, num_threads)
    epsilon, flow = TrainedModel(generation_run / "models" / "model.pt"), TrainedModel(flow_run / "models" / "model.pt")
    generation = {
        "epsilon": measure_generation(generation_run, sampler_points("epsilon", steps), num_samples, seed),
        "rectified_flow": measure_generation(
            flow_run, sampler_points("rectified_flow", flow_steps=flow_steps), num_samples, seed
        ),
    }
    translation = None
    if translation_dir is not None:
        translation = measure_translation(
            Path(translation_dir) / "idm", sampler_points("epsilon", steps), seed, translation_cases
        )
    args = json.loads((generation_run / "args.json").read_text())
    settings = {
        "spatial_size": epsilon.spatial_size,
        "spacing": args.get("spacing"),
        "num_train_timesteps": epsilon.num_train_timesteps,
        "training_epochs": args["train#trainer#max_epochs"],
        "num_samples": num_samples,
        "seed": seed,
        "generation_dir": str(generation_dir),
        "translation_dir": None if translation_dir is None else str(translation_dir),
        "translation_cases": translation_cases,
        "flow_objective": flow.objective,
    }
    return {
        "settings": settings,
        "machine": machine_description(),
        "generation": generation,
        "translation": translation,
        "paper_evaluation": _paper_evaluation(),
        "flow_training_seconds": flow_seconds,
    }


def _reaches(point: Mapping, full: Mapping) -> bool:
    """``point`` is as good as the full chain: as many measures within the spread, and no farther on the whole."""
    return point["within_spread"] >= full["within_spread"] and point["distance_ratio"] <= full["distance_ratio"]


def goal_statement(generation: Mapping[str, Sequence[dict]]) -> str:
    """Whether a sampler reaches the full chain's quality (:func:`_reaches`) in at most :data:`GOAL_EVALUATIONS`
    evaluations, and if not, which comes closest (the smallest distance ratio within the budget) and by how much."""
    full = next(p for p in generation["epsilon"] if p["sampler"] == FULL_CHAIN)
    points = [p for name in generation for p in generation[name] if p["sampler"] != FULL_CHAIN]
    reached = sorted((p for p in points if _reaches(p, full)), key=lambda p: p["evaluations"])
    target = (
        f"the full chain's quality ({full['within_spread']:.0%} of the measures within the spread, distance ratio "
        f"{full['distance_ratio']:.2f}, in {full['evaluations']} evaluations)"
    )
    if reached and reached[0]["evaluations"] <= GOAL_EVALUATIONS:
        best = reached[0]
        return (
            f"**Goal met**: {best['sampler']} at {best['steps']} steps reaches {target} in {best['evaluations']} "
            f"evaluations ({best['within_spread']:.0%}, {best['distance_ratio']:.2f}), "
            f"{full['evaluations'] / best['evaluations']:.0f}× fewer."
        )
    budget = [p for p in points if p["evaluations"] <= GOAL_EVALUATIONS]
    missed = f"**Goal missed**: no sampler reaches {target} in ≤ {GOAL_EVALUATIONS} evaluations."
    if budget:
        closest = min(budget, key=lambda p: (p["distance_ratio"], p["evaluations"]))
        missed += (
            f" Closest within the budget: {closest['sampler']} at {closest['steps']} steps, "
            f"{closest['within_spread']:.0%} within and distance ratio {closest['distance_ratio']:.2f} "
            f"({closest['distance_ratio'] / full['distance_ratio']:.2f}× the full chain's) in "
            f"{closest['evaluations']} evaluations."
        )
    if reached:
        missed += f" The fewest evaluations that reach it: {reached[0]['sampler']}, {reached[0]['evaluations']}."
    return missed


def _series(result: Mapping) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{panel: {sampler: [(evaluations, value), …]}}``: the generation's distance ratio and the translation's SSIM
    in the head (its first generated modality)."""
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {"generation": {}}
    for points in result["generation"].values():
        for p in points:
            panels["generation"].setdefault(p["sampler"], []).append((p["evaluations"], p["distance_ratio"]))
    if result["translation"]:
        panels["translation"] = {}
        for p in result["translation"]:
            ssim = next(iter(p["model"].values()))["head_ssim"]["mean"]
            panels["translation"].setdefault(p["sampler"], []).append((p["evaluations"], ssim))
    return panels


def plot_sampling(result: Mapping, path: Path) -> None:
    """Quality against network evaluations, one line per sampler: the generation's distance ratio
    (:func:`~bundle.sample_quality.distance_ratio`; the real-vs-real spread's edge at 1) and, with a translation, its
    SSIM in the head."""
    panels = _series(result)
    labels = {"generation": "distance to the real volumes ÷ real-vs-real spread", "translation": "SSIM in the head"}
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for axis, (task, by_sampler) in zip(axes[0], panels.items(), strict=True):
        for sampler, values in by_sampler.items():
            values.sort()
            style = {"linestyle": "none", "marker": "*", "markersize": 12} if sampler == FULL_CHAIN else {"marker": "o"}
            axis.plot(*zip(*values, strict=True), label=sampler, **style)
        if task == "generation":
            axis.axhline(1.0, color="grey", linewidth=1)
            axis.set_yscale("log")
        axis.axvline(GOAL_EVALUATIONS, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("network evaluations per sample")
        axis.set_ylabel(labels[task])
        axis.set_title(task)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _generation_rows(generation: Mapping[str, Sequence[dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "sampler", "steps", "evaluations", "within spread", "distance ratio", "seconds per sample"]
    rows = [
        [
            MODELS[name],
            p["sampler"],
            str(p["steps"]),
            str(p["evaluations"]),
            f"{p['within_spread']:.0%}",
            f"{p['distance_ratio']:.2f}",
            f"{p['seconds_per_sample']:.1f}",
        ]
        for name, points in generation.items()
        for p in points
    ]
    return header, rows


def _distance_rows(generation: Mapping[str, Sequence[dict]]) -> tuple[list[str], list[list[str]]]:
    """Each measure's distance to the real volumes (the real-vs-real spread's largest in brackets) for the full
    chain and each sampler's point nearest :data:`GOAL_EVALUATIONS` evaluations."""
    chosen = []
    for points in generation.values():
        for sampler in dict.fromkeys(p["sampler"] for p in points):
            own = [p for p in points if p["sampler"] == sampler]
            chosen.append(min(own, key=lambda p: abs(p["evaluations"] - GOAL_EVALUATIONS)))
    header = ["measure", *[f"{p['sampler']}, {p['evaluations']}" for p in chosen]]
    measures = chosen[0]["comparison"]["measures"]
    rows = []
    for measure in measures:
        cells = []
        for p in chosen:
            m = p["comparison"]["measures"][measure]
            mark = "" if m["within_spread"] else " ✗"
            cells.append(f"{m['generated_vs_real']:.3g} ({m['real_vs_real_max']:.3g}){mark}")
        rows.append([measure, *cells])
    return header, rows


def _translation_rows(translation: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "sampler",
        "steps",
        "evaluations",
        "SSIM, head",
        "PSNR, head (dB)",
        "BraSyn SSIM",
        "BraSyn PSNR (dB)",
        "seconds per case",
    ]
    rows = []
    for p in translation:
        for modality, scores in p["model"].items():
            rows.append(
                [
                    f"{p['sampler']} ({modality})" if len(p["model"]) > 1 else p["sampler"],
                    str(p["steps"]),
                    str(p["evaluations"]),
                    mean_std(scores["head_ssim"], 3),
                    mean_std(scores["head_psnr"], 2),
                    mean_std(scores["brasyn_ssim"], 3),
                    mean_std(scores["brasyn_psnr"], 2),
                    f"{p['seconds_per_case']:.1f}",
                ]
            )
    identity = next(iter(translation[0]["identity"].values()))
    rows.append(
        [
            "identity (the input)",
            "–",
            "0",
            mean_std(identity["head_ssim"], 3),
            mean_std(identity["head_psnr"], 2),
            mean_std(identity["brasyn_ssim"], 3),
            mean_std(identity["brasyn_psnr"], 2),
            "–",
        ]
    )
    return header, rows


def render_sampling_markdown(result: Mapping, command: str) -> str:
    s, paper = result["settings"], result["paper_evaluation"]
    full = next(p for p in result["generation"]["epsilon"] if p["sampler"] == FULL_CHAIN)
    lines = [
        "# Sampling: quality against network evaluations",
        "",
        f"Produced by `{command}` on {result['machine']}.",
        "",
        (
            f"The generation study's IDM (ε-prediction, {s['training_epochs']} epochs on {grid_in_words(s)}, T = "
            f"{s['num_train_timesteps']}, from `{s['generation_dir']}`) and its rectified flow twin (the same data, "
            f"network, epochs and seed, `--objective rectified_flow`: {result['flow_training_seconds'] / 60:.0f} min "
            f"of training here), each sampled {s['num_samples']} times per point (seed {s['seed']}: every point "
            "starts from the same noise) and measured against the validation volumes by the generation measures "
            "(`bundle.sample_quality.compare_to_real`, as `docs/generation.md`). Evaluations are counted calls of the "
            "network per sample."
        ),
        "",
        goal_statement(result["generation"]),
        "",
        f"![quality against evaluations]({FIGURE})",
        "",
        "## Generation",
        "",
        (
            "Distance ratio: the geometric mean over the measures of the samples' distance to the validation volumes "
            "divided by the largest real-vs-real distance (below 1: within the spread; lower is better), the figure's "
            "left panel. A sampler reaches the full chain's quality when it has as many measures within the spread "
            "and no larger a ratio."
        ),
        "",
        markdown_table(*_generation_rows(result["generation"])),
        "",
        (
            "Each measure's distance to the validation volumes, the real-vs-real spread's largest in brackets "
            f"(✗: outside it), for the full chain and each sampler's point nearest {GOAL_EVALUATIONS} evaluations:"
        ),
        "",
        markdown_table(*_distance_rows(result["generation"])),
        "",
    ]
    if result["translation"]:
        lines += [
            "## Translation",
            "",
            (
                f"The synthesis study's conditioned IDM (`{s['translation_dir']}`), each of its first "
                f"{result['translation'][0]['cases']} validation cases translated by "
                "each sampler and scored against its real volume (`bundle.synthesis.translate_split`: SSIM and PSNR in "
                "the head; BraSyn's after its percentile normalisation), mean ± std over the cases:"
            ),
            "",
            markdown_table(*_translation_rows(result["translation"])),
            "",
        ]
    lines += [
        "## At 1 mm",
        "",
        (
            f"One evaluation of the paper's network on 192³ (one sample) is {paper['flops'] / 1e12:.1f} TFLOPs "
            "(counted on the meta device); a volume by the full chain of T = 2000 (`configs/train.json`'s) is "
            f"{2000 * paper['flops'] / 1e15:.1f} PFLOPs, by {GOAL_EVALUATIONS} evaluations "
            f"{GOAL_EVALUATIONS * paper['flops'] / 1e15:.2f} PFLOPs."
        ),
    ]
    if "planned_gpu_bytes" in paper:
        lines[-1] += (
            f" `docs/native_resolution.md` plans {paper['planned_gpu_bytes'] / 1e9:.2f} GB of GPU memory for one "
            "sampling step (every sampler's step is one evaluation; the multistep ones keep one or three more "
            "sample-sized tensors)"
        )
        if paper.get("measured_cpu_seconds"):
            seconds = paper["measured_cpu_seconds"]
            lines[-1] += (
                f" and measured one step in {seconds:.0f} s on a CPU (measured: {seconds * 2000 / 3600:.0f} CPU-hours "
                f"a volume by 2000 evaluations, {seconds * GOAL_EVALUATIONS / 60:.0f} CPU-minutes by "
                f"{GOAL_EVALUATIONS})"
            )
        lines[-1] += "."
    lines += ["", f"On this machine the full chain took {full['seconds_per_sample']:.0f} s a sample at the study grid."]
    return "\n".join(lines) + "\n"


def write_sampling_report(result: dict, command: str, output_dir: str | Path = "docs") -> Path:
    """``sampling.md``, ``sampling.json`` and ``sampling.png`` in ``output_dir``; the Markdown's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_sampling(result, output_dir / FIGURE)
    (output_dir / "sampling.json").write_text(json.dumps(result, indent=1))
    path = output_dir / "sampling.md"
    path.write_text(render_sampling_markdown(result, command))
    return path
