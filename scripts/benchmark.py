"""Benchmarks of the IDM network against plain autograd and MONAI's DiffusionModelUNet
(docs/architecture.md, "Measuring").

Usage (from the bundle root):
    python scripts/benchmark.py suite          # every figure on this machine → docs/benchmarks.md + PNGs
    python scripts/benchmark.py suite --quick  # small sizes, < 5 min on 2 CPU cores → runs/benchmarks_quick/
    python scripts/benchmark.py suite --gpu    # one GPU, 8 minutes, sizes until 24 GiB is spent → runs/benchmarks_gpu/
    python scripts/benchmark.py quality        # the equal-budget quality comparison alone → docs/benchmark_quality.md
    python scripts/benchmark.py generation --work_dir runs/generation   # samples like the data? → docs/generation.md
    python scripts/benchmark.py synthesis --work_dir runs/synthesis     # a T2 from a T1 → docs/synthesis.md
    python scripts/benchmark.py sampling --generation_dir runs/generation   # quality per evaluation → docs/sampling.md
    python scripts/benchmark.py profile        # where the paper configuration's step peaks → docs/paper_step_profile.md
    python scripts/benchmark.py profile --micro_batch_size 1 --recompute_norms true   # with the memory options
    python scripts/benchmark.py planner        # the memory planner against measured peaks → docs/memory_planner.md
    python scripts/benchmark.py native         # the paper's network at 1 mm → docs/native_resolution.md
    python scripts/benchmark.py budget         # memory_budget and optimizer_in_backward → docs/memory_budget.md
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import fire
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.diffusion import micro_batches
from bundle.flags import as_flag, as_flags
from scripts.benchmarking.allocator import return_freed_memory_to_os
from scripts.benchmarking.budget_curve import (
    budget_curve,
    budget_summary,
    paper_update,
    plot_curve,
    render_budget_report,
    replace_budget_section,
)
from scripts.benchmarking.generation import compare_generation, write_generation_report
from scripts.benchmarking.native_resolution import native_resolution, plot_aspect_ratio, render_native_resolution
from scripts.benchmarking.patch_training import compare_patch_training, write_patch_report
from scripts.benchmarking.plan_accuracy import (
    ACCURACY_CONFIGURATIONS,
    QUICK_CONFIGURATIONS,
    planner_accuracy,
    render_planner_accuracy,
)
from scripts.benchmarking.quality import compare_quality, render_quality_markdown, write_quality_report
from scripts.benchmarking.report import machine_description
from scripts.benchmarking.sampling import compare_sampling, write_sampling_report
from scripts.benchmarking.step_profile import profile_step_in_subprocess, render_step_profile
from scripts.benchmarking.suite_report import cube_limits, plot_suite, render_suite
from scripts.benchmarking.sweeps import (
    MEMORY_OPTIONS,
    PAPER,
    Budget,
    SuitePlan,
    batch_sweep,
    depth_sweep,
    energy_per_network,
    memory_options,
    paper_configuration,
    resolution_sweep,
)
from scripts.benchmarking.synthesis import compare_synthesis, write_synthesis_report
from scripts.benchmarking.workload import NETWORKS

QUALITY_REPORT = "benchmark_quality.md"
PARTIAL_RESULT = "benchmarks.partial.json"
PROFILE_REPORT = "paper_step_profile"
PLANNER_REPORT = "memory_planner"
NATIVE_REPORT = "native_resolution"


def _attention_at_last_two(channels: tuple[int, ...]) -> tuple[bool, ...]:
    return tuple(level >= len(channels) - 2 for level in range(len(channels)))


def _training_threads() -> int | None:
    """One torch thread per training process on the CPU: two processes' OpenMP threads on few cores
    stall each other, and the comparison's wall times would measure that."""
    return None if torch.cuda.is_available() else 1


def _quality(plan: SuitePlan, output_dir: Path) -> dict:
    return compare_quality(
        output_dir=output_dir,
        epochs=plan.quality_epochs,
        size=plan.quality_size,
        channels=plan.quality_channels,
        attention_levels=_attention_at_last_two(plan.quality_channels),
        num_threads=_training_threads(),
    )


def _write_suite_report(result: dict, out: Path) -> str:
    """Writes ``benchmarks.md``, ``benchmarks.json`` and the figures of a suite ``result`` into ``out``; the
    report. Without a quality comparison in ``result``, the report points to the latest one in ``out``."""
    plot_suite(result, out)
    if result.get("quality"):
        quality_markdown = render_quality_markdown(result["quality"], result["command"], level=2)
    elif (out / QUALITY_REPORT).exists():
        quality_markdown = (
            f"## Quality at equal budget\n\nNot re-run by this command; the latest comparison "
            f"(`python scripts/benchmark.py quality`) is in [{QUALITY_REPORT}]({QUALITY_REPORT})."
        )
    else:
        quality_markdown = None
    report = render_suite(result, quality_markdown)
    (out / "benchmarks.md").write_text(report)
    (out / "benchmarks.json").write_text(json.dumps(result, indent=1))
    return report


def _sizes_and_levels(
    spatial_size: int | tuple[int, ...], attention_levels: tuple[bool, ...] | str
) -> tuple[list[int], list[bool]]:
    """The three sizes of ``--spatial_size`` (one size or three) and the flags of ``--attention_levels`` (a JSON
    string or what fire parsed)."""
    sizes = [spatial_size] * 3 if isinstance(spatial_size, int) else list(spatial_size)
    levels = json.loads(attention_levels) if isinstance(attention_levels, str) else attention_levels
    return sizes, as_flags(levels, "--attention_levels")


def _check_recipe(steps: int, check_every: int, sizes: list[int], spatial_size, num_phantoms: int) -> None:
    """Exits naming the flags unless the generation recipe's settings are in range (``sizes``: ``spatial_size`` as
    three sizes)."""
    if steps < 1 or check_every < 1 or len(sizes) != 3 or min(sizes) < 16 or num_phantoms < 8:
        raise SystemExit(
            f"ERROR: need --steps ≥ 1, --check_every ≥ 1, --spatial_size of one or three sizes ≥ 16 and "
            f"--num_phantoms ≥ 8, got {steps}, {check_every}, {spatial_size} and {num_phantoms}."
        )


def _grid_flags(sizes: list[int], spacing: float | None, levels: list[bool]) -> str:
    """``--spatial_size "[…]" [--spacing s] --attention_levels "[…]"`` as a study's command line gives them."""
    attention = ",".join("true" if level else "false" for level in levels)
    spacing_flag = f" --spacing {spacing}" if spacing else ""
    return f'--spatial_size "[{",".join(map(str, sizes))}]"{spacing_flag} --attention_levels "[{attention}]"'


class Benchmark:
    """IDM benchmarks; each command writes a markdown report, a JSON file with every figure and PNG plots."""

    def suite(
        self,
        quick: bool = False,
        gpu: bool = False,
        output_dir: str | None = None,
        budget_s: float | None = None,
        quality: bool = True,
    ) -> None:
        """The resolution and depth sweeps of the four networks, the paper configuration, energy, the batch
        sweep and the memory options, then the equal-budget quality comparison; writes ``benchmarks.md``,
        ``benchmarks.json`` and the figures once the measurements are done, and again with the quality
        comparison. Until the first report is written, ``benchmarks.partial.json`` holds the figures of every
        part finished so far (a run stopped early keeps them; the earlier report stays).

        Args:
            quick: small sizes and few repetitions (under 5 minutes on 2 CPU cores).
            gpu: the GPU plan (sizes up to 320³ within a 24 GiB cap, 6.5 minutes of measurements, then the
                quality comparison: about 8 minutes in all); needs CUDA.
            output_dir: default ``docs`` (full), ``runs/benchmarks_quick`` or ``runs/benchmarks_gpu``.
            budget_s: wall-time budget of the measurements before the quality comparison; those after it is
                spent are reported as skipped (the quality comparison, a fixed training, runs all the same).
            quality: include the quality comparison (trains two networks).
        """
        quick, gpu, quality = as_flag(quick, "--quick"), as_flag(gpu, "--gpu"), as_flag(quality, "--quality")
        if quick and gpu:
            raise SystemExit("ERROR: choose one of --quick and --gpu.")
        if gpu and not torch.cuda.is_available():
            raise SystemExit(
                "ERROR: --gpu needs a CUDA device, and torch.cuda.is_available() is False here "
                "(a CPU build of torch?). Run without --gpu to measure on the CPU."
            )
        if budget_s is not None and budget_s <= 0:
            raise SystemExit(f"ERROR: --budget_s must be positive, got {budget_s}.")
        plan = SuitePlan.gpu() if gpu else SuitePlan.quick() if quick else SuitePlan.full()
        plan = plan if budget_s is None else replace(plan, budget_seconds=budget_s)
        mode = (" --gpu" if gpu else " --quick" if quick else "") + ("" if quality else " --quality false")
        out = Path(output_dir or ("runs/benchmarks_gpu" if gpu else "runs/benchmarks_quick" if quick else "docs"))
        out.mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return_freed_memory_to_os()  # this process counts stored bytes at every size, the largest last
        budget, start = Budget(plan.budget_seconds), time.perf_counter()
        count = len(NETWORKS) * (len(plan.depths) + len(plan.sizes) + len(plan.batch_sizes) + 1) + len(MEMORY_OPTIONS)
        result = {
            "plan": asdict(plan),
            "machine": machine_description(),
            "command": f"python scripts/benchmark.py suite{mode}",
        }
        partial = out / PARTIAL_RESULT  # what is measured so far, should the run stop early
        with tqdm(total=count, desc="benchmark suite") as progress:
            phases = {  # the headline figures first: a spent budget (GPU mode) cuts the ones after them
                "resolution": lambda: resolution_sweep(plan, budget, device, progress),
                "depth": lambda: depth_sweep(plan, budget, device, progress),
                "paper": lambda: paper_configuration(plan, budget),
                "energy": lambda: energy_per_network(plan, budget, device, progress),
                "batch": lambda: batch_sweep(plan, budget, device, result["resolution"], progress),
                "memory_options": lambda: memory_options(plan, budget, device, progress),
            }
            for key, measure in phases.items():
                result[key] = measure()
                partial.write_text(json.dumps(result, indent=1))
        result["largest_cube"] = cube_limits(result["resolution"], plan.memory_limit_bytes)
        result["quality"] = None
        result["wall_seconds"] = time.perf_counter() - start
        report = _write_suite_report(result, out)  # kept should the quality comparison be stopped
        partial.unlink()
        if quality:
            result["quality"] = _quality(plan, out)
            result["wall_seconds"] = time.perf_counter() - start
            report = _write_suite_report(result, out)
        print(report)

    def quality(self, epochs: int = 16, size: int = 32, channels=(16, 32, 64), output_dir: str = "docs") -> None:
        """IDM vs its parameter-matched MONAI ``DiffusionModelUNet`` trained by ``configs/train.json`` at equal
        budget on the built-in phantoms; writes ``benchmark_quality.md``/``.json`` and ``quality_vs_monai.png``."""
        if epochs < 1 or size < 16:
            raise SystemExit(f"ERROR: need --epochs ≥ 1 and --size ≥ 16, got {epochs} and {size}.")
        channels = tuple(int(c) for c in channels)
        result = compare_quality(
            output_dir=output_dir,
            epochs=epochs,
            size=size,
            channels=channels,
            attention_levels=_attention_at_last_two(channels),
            num_threads=_training_threads(),
        )
        command = f"python scripts/benchmark.py quality --epochs {epochs} --size {size} --channels '{list(channels)}'"
        print(write_quality_report(result, command, output_dir).read_text())

    def generation(
        self,
        work_dir: str = "runs/generation",
        steps: int = 1200,
        check_every: int = 400,
        spatial_size: int | tuple[int, int, int] = (28, 32, 28),
        spacing: float | None = 6.0,
        num_phantoms: int = 256,
        attention_levels: tuple[bool, ...] | str = (False, False, True),
        continue_steps: int = 0,
        output_dir: str = "docs",
    ) -> None:
        """IDM and its parameter-matched MONAI ``DiffusionModelUNet`` (channels 16, 32, 64, attention at
        ``attention_levels``) trained by ``configs/train.json`` on the built-in synthetic brains, both at once on one
        torch thread each, with the generation monitor every ``check_every`` steps, on ``spatial_size`` (one size or
        three) of the native grid of ``spacing`` mm (``--spacing None``: each case's head box resized); writes
        ``generation.md``, ``generation.json``, ``generation_samples.png`` and ``generation_curves.png``. The runs are
        kept in ``work_dir``: a rerun with the same one resumes the runs a session left unfinished, reuses the
        finished ones and redraws the report. With ``--continue_steps`` (more than ``--steps``), the IDM run is then
        trained on to that many steps as a resume of a copy of it, and reported too."""
        sizes, levels = _sizes_and_levels(spatial_size, attention_levels)
        _check_recipe(steps, check_every, sizes, spatial_size, num_phantoms)
        result = compare_generation(
            work_dir,
            steps=steps,
            check_every=check_every,
            spatial_size=sizes,
            spacing=spacing,
            num_phantoms=num_phantoms,
            attention_levels=levels,
            continue_steps=continue_steps,
        )
        command = (
            f"python scripts/benchmark.py generation --work_dir {work_dir} --steps {steps} "
            f"--check_every {check_every} {_grid_flags(sizes, spacing, levels)} --num_phantoms {num_phantoms}"
            + (f" --continue_steps {continue_steps}" if continue_steps else "")
        )
        print(write_generation_report(result, command, output_dir).read_text())

    def synthesis(
        self,
        work_dir: str = "runs/synthesis",
        steps: tuple[int, ...] = (250, 500),
        spatial_size: int | tuple[int, int, int] = (28, 32, 28),
        spacing: float | None = 6.0,
        directions: str | tuple[str, ...] = "t1->t2,t1->flair",
        num_phantoms: int = 128,
        attention_levels: tuple[bool, ...] | str = (False, False, True),
        output_dir: str = "docs",
    ) -> None:
        """Missing-modality synthesis on the built-in brains: the conditioned IDM and MONAI's ``UNet`` as an L1
        regression (``configs/regression.json``, matched parameters) trained by the bundle's configs on the same data
        and steps, for each of ``--directions`` (given->generated, comma-separated), each evaluated by
        ``configs/evaluate.json`` after training to each of ``--steps`` (learning curves; identity baseline beside),
        on ``spatial_size`` (one size or three) of the native grid of ``spacing`` mm (``--spacing None``: each case's
        head box resized), IDM with attention at ``attention_levels``. Two runs at a time on one torch thread each
        (about an hour for the defaults on 2 idle CPU cores); writes ``synthesis.md``, ``synthesis.json``,
        ``synthesis_curves.png`` and ``synthesis_examples.png``. The runs are kept in ``work_dir``: a rerun reuses
        every stage evaluated before."""
        steps = (steps,) if isinstance(steps, int) else tuple(steps)
        sizes, levels = _sizes_and_levels(spatial_size, attention_levels)
        items = directions if isinstance(directions, (list, tuple)) else str(directions).split(",")
        pairs = [tuple(str(pair).split("->")) for pair in items]
        if (
            not steps
            or min(steps) < 1
            or len(sizes) != 3
            or min(sizes) < 16
            or num_phantoms < 8
            or any(len(pair) != 2 or pair[0] == pair[1] for pair in pairs)
        ):
            raise SystemExit(
                "ERROR: need --steps of positive integers such as '[250,500]', --spatial_size of one or three sizes "
                "≥ 16, --num_phantoms ≥ 8 and --directions of given->generated pairs such as 't1->t2,t1->flair', got "
                f"{steps}, {spatial_size}, {num_phantoms} and {directions!r}."
            )
        result = compare_synthesis(
            work_dir,
            steps=steps,
            spatial_size=sizes,
            spacing=spacing,
            directions=pairs,
            num_phantoms=num_phantoms,
            attention_levels=levels,
        )
        command = (
            f"python scripts/benchmark.py synthesis --work_dir {work_dir} --steps '{list(steps)}' "
            f"{_grid_flags(sizes, spacing, levels)} --directions '{directions}' --num_phantoms {num_phantoms}"
        )
        print(write_synthesis_report(result, command, output_dir).read_text())

    def sampling(
        self,
        generation_dir: str = "runs/generation",
        translation_dir: str | None = None,
        work_dir: str = "runs/sampling",
        num_samples: int = 16,
        translation_cases: int = 8,
        output_dir: str = "docs",
    ) -> None:
        """Quality against network evaluations: the generation study's IDM in ``generation_dir`` sampled by every
        sampler at 5, 10, 20 and 50 steps and by the full DDPM chain, and its rectified flow twin (trained here in
        ``work_dir``, as that IDM was but for ``--objective rectified_flow``; a stopped run resumes) by Euler steps,
        ``num_samples`` each against the validation volumes; with ``--translation_dir`` (a synthesis study's
        direction, e.g. ``runs/synthesis/t1_to_t2``) its IDM's translations of its first ``translation_cases``
        validation cases likewise. Writes ``sampling.md``, ``sampling.json`` and ``sampling.png``."""
        if (
            num_samples < 2
            or translation_cases < 1
            or not (Path(generation_dir) / "idm" / "models" / "model.pt").exists()
        ):
            raise SystemExit(
                f"ERROR: need --generation_dir with a trained generation study (its idm/models/model.pt), "
                f"--num_samples ≥ 2 and --translation_cases ≥ 1, got {generation_dir!r}, {num_samples} and "
                f"{translation_cases}."
            )
        result = compare_sampling(
            work_dir,
            generation_dir,
            translation_dir,
            num_samples,
            num_threads=None,
            translation_cases=translation_cases,
        )
        command = (
            f"python scripts/benchmark.py sampling --generation_dir {generation_dir} --work_dir {work_dir} "
            f"--num_samples {num_samples}"
            + (
                f" --translation_dir {translation_dir} --translation_cases {translation_cases}"
                if translation_dir
                else ""
            )
        )
        print(write_sampling_report(result, command, output_dir).read_text())

    def patches(
        self,
        work_dir: str = "runs/patches",
        steps: int = 1200,
        check_every: int = 400,
        spatial_size: int | tuple[int, int, int] = (28, 32, 28),
        spacing: float | None = 6.0,
        num_phantoms: int = 256,
        fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
        probabilities: tuple[float, ...] = (0.2, 0.3, 0.5),
        quarter: bool = True,
        output_dir: str = "docs",
    ) -> None:
        """Patch training against whole volumes: the generation recipe's IDM trained on whole volumes and with
        ``patch_training`` (``fractions`` of each side with ``probabilities``), both at once on one torch thread each,
        then (``--quarter``) both again on a quarter of the training cases; the generation measures against steps and
        wall time, and the wall time to the whole-volume run's final quality. Writes ``patch_training.md``, ``.json``
        and two figures. Runs are kept in ``work_dir``: a rerun resumes the unfinished ones and reuses the rest."""
        sizes, _ = _sizes_and_levels(spatial_size, (False, False, True))
        quarter = as_flag(quarter, "--quarter")
        _check_recipe(steps, check_every, sizes, spatial_size, num_phantoms)
        result = compare_patch_training(
            work_dir,
            fractions=tuple(fractions),
            probabilities=tuple(probabilities),
            quarter=quarter,
            steps=steps,
            check_every=check_every,
            spatial_size=sizes,
            spacing=spacing,
            num_phantoms=num_phantoms,
        )
        command = (
            f"python scripts/benchmark.py patches --work_dir {work_dir} --steps {steps} --check_every {check_every} "
            f"--spatial_size '{list(sizes)}' --spacing {spacing} --num_phantoms {num_phantoms} "
            f"--fractions '{list(fractions)}' --probabilities '{list(probabilities)}' --quarter {str(quarter).lower()}"
        )
        print(write_patch_report(result, command, output_dir).read_text())

    def profile(
        self, micro_batch_size: int | None = None, recompute_norms: bool = False, output_dir: str = "docs"
    ) -> None:
        """Where the paper configuration's training step (batch 4, 64³) reaches its peak memory: per phase and
        per engine step, in a fresh process (about 3 minutes on 2 CPU cores); writes ``paper_step_profile.md``
        and ``paper_step_profile.json``, or with the memory options ``paper_step_profile_micro<k>.*``
        (``--micro_batch_size k``: back-propagated k samples at a time) and ``…_recompute_norms.*``
        (``--recompute_norms true``: the network's option of that name)."""
        recompute_norms = as_flag(recompute_norms, "--recompute_norms")
        try:
            micro_batches(PAPER["workload"].batch_size, micro_batch_size)
        except ValueError as error:
            raise SystemExit(f"ERROR: --{error}") from None
        workload = replace(PAPER["workload"], micro_batch_size=micro_batch_size, recompute_norms=recompute_norms)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = profile_step_in_subprocess(workload)
        options = (f" --micro_batch_size {micro_batch_size}" if micro_batch_size else "") + (
            " --recompute_norms true" if recompute_norms else ""
        )
        report = render_step_profile(
            result, workload, f"python scripts/benchmark.py profile{options}", machine_description()
        )
        name = (
            PROFILE_REPORT
            + (f"_micro{micro_batch_size}" if micro_batch_size else "")
            + ("_recompute_norms" if recompute_norms else "")
        )
        (out / f"{name}.json").write_text(json.dumps({"workload": workload.to_dict(), **result}, indent=1))
        (out / f"{name}.md").write_text(report)
        print(report)

    def planner(self, quick: bool = False, output_dir: str = "docs") -> None:
        """The memory planner's prediction against the measured peak of the same training steps, for each
        configuration of ``scripts.benchmarking.plan_accuracy.ACCURACY_CONFIGURATIONS`` (about 25 minutes on 2 CPU
        cores; ``--quick true``: two of them, about 2 minutes, to ``runs/planner_quick``); writes
        ``memory_planner.md`` and ``memory_planner.json``."""
        quick = as_flag(quick, "--quick")
        configurations = (
            {name: ACCURACY_CONFIGURATIONS[name] for name in QUICK_CONFIGURATIONS} if quick else ACCURACY_CONFIGURATIONS
        )
        out = Path("runs/planner_quick" if quick and output_dir == "docs" else output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = planner_accuracy(configurations)
        command = "python scripts/benchmark.py planner" + (" --quick true" if quick else "")
        report = render_planner_accuracy(result, command, machine_description())
        (out / f"{PLANNER_REPORT}.json").write_text(json.dumps(result, indent=1))
        (out / f"{PLANNER_REPORT}.md").write_text(report)
        print(report)

    def native(self, measure: bool = True, output_dir: str = "docs", work_dir: str = "runs/native") -> None:
        """The paper's network on the BraTS 1 mm grid: planned peaks under each memory option and grid, MONAI's
        matched network, the largest cube of each benchmark configuration in 24 GiB, a figure of the two grids and
        (``--measure true``, about an hour on 2 CPU cores, 20 GB of memory) one training step and one sampling step
        measured; writes ``native_resolution.md``, ``.json`` and ``.png`` (``--measure false``: the plans only,
        a few minutes, to ``runs/native`` unless ``--output_dir`` is given)."""
        measure = as_flag(measure, "--measure")
        out = Path(output_dir if measure or output_dir != "docs" else work_dir)
        out.mkdir(parents=True, exist_ok=True)
        figure = f"{NATIVE_REPORT}.png"
        aspect = plot_aspect_ratio(out / figure, Path(work_dir))
        result = native_resolution(measure, progress=lambda line: print(line, flush=True)) | {"aspect": aspect}
        (out / f"{NATIVE_REPORT}.json").write_text(json.dumps(result, indent=1))
        command = "python scripts/benchmark.py native" + ("" if measure else " --measure false")
        report = render_native_resolution(result, command, machine_description(), figure)
        (out / f"{NATIVE_REPORT}.md").write_text(report)
        print(report)

    def budget(self, quick: bool = False, output_dir: str | None = None) -> None:
        """The engine's memory_budget from 0 to unlimited at 64³, batch 4 (peak and step time against plain autograd,
        MONAI plain and checkpointed as points) and the paper's network with the optimizer step inside backward
        (peak per parameter, EMA off and on, step time, planned peaks at budgets); about 45 minutes on 2 CPU cores
        and 12 GB; writes ``memory_budget.md``, ``.json`` and ``.png`` to ``docs`` (``--quick``: 16³, batch 1, a
        narrower paper network at batch 1, a few minutes, to ``runs/budget_quick``)."""
        quick = as_flag(quick, "--quick")
        out = Path(output_dir or ("runs/budget_quick" if quick else "docs"))
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        return_freed_memory_to_os()
        curve = budget_curve(size=16, batch_size=1, repeats=1) if quick else budget_curve()
        paper = paper_update(quick=quick)
        command = "python scripts/benchmark.py budget" + (" --quick" if quick else "")
        result = {
            "curve": curve,
            "paper": paper,
            "machine": machine_description(),
            "command": command,
            "minutes": (time.perf_counter() - start) / 60,
        }
        (out / "memory_budget.json").write_text(json.dumps(result, indent=1, default=str))
        plot_curve(curve, out / "memory_budget.png")
        report = render_budget_report(result, command, "memory_budget.png")
        (out / "memory_budget.md").write_text(report)
        benchmarks = out / "benchmarks.md"  # its section on the budget, as the suite writes it from this result
        if benchmarks.exists():
            benchmarks.write_text(replace_budget_section(benchmarks.read_text(), budget_summary(result)))
        print(report)


if __name__ == "__main__":
    fire.Fire(Benchmark)
