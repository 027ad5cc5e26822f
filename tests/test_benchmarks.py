"""The benchmark suite's measuring parts: energy counters, baselines, sweeps and the report."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import largest_update_allocation, run_python

from scripts.benchmarking import energy
from scripts.benchmarking.energy import EnergyCounter, measure_energy
from scripts.benchmarking.suite_report import goals, render_suite
from scripts.benchmarking.sweeps import (
    MEMORY_OPTIONS,
    OUT_OF_MEMORY,
    PAPER,
    Budget,
    SuitePlan,
    largest_cube,
    measure_row,
)
from scripts.benchmarking.workload import NETWORKS, Workload

MiB = 2**20


def _write_rapl(root: Path, energy_uj: int, max_range: int = 1000) -> Path:
    domain = root / "intel-rapl:0"
    domain.mkdir(parents=True, exist_ok=True)
    (domain / "name").write_text("package-0\n")
    (domain / "energy_uj").write_text(str(energy_uj))
    (domain / "max_energy_range_uj").write_text(str(max_range))
    return domain


def test_energy_is_na_with_reason_and_runs_nothing_without_counters(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "_POWERCAP", tmp_path / "absent")
    calls = []
    result = measure_energy(lambda: calls.append(1), seconds=5)
    assert "n/a" in result and "RAPL" in result["n/a"] and calls == []


def test_nvml_counter_reads_the_device_torch_maps_and_is_unreadable_without_a_temperature(monkeypatch):
    import sys
    from types import SimpleNamespace

    handles = []
    readings = {"mJ": 12_500, "celsius": 51}

    def temperature(handle, sensor):
        if readings["celsius"] is None:
            raise RuntimeError("Not Supported")
        return readings["celsius"]

    fake_nvml = SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: handles.append(handle) or readings["mJ"],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_get_pynvml_handler", lambda: "handle of NVML device 3")
    counter = energy.find_energy_counter()
    assert counter.source == "NVML" and counter.joules() == 12.5 and counter.celsius() == 51.0
    assert set(handles) == {"handle of NVML device 3"}
    readings["celsius"] = None
    assert energy._nvml_counter() == "NVML unreadable (Not Supported)"


def test_rapl_energy_unwraps_counter_overflow(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "_POWERCAP", tmp_path)
    domain = _write_rapl(tmp_path, 900_000, max_range=1_000_000)
    counter = energy.find_energy_counter()
    assert isinstance(counter, EnergyCounter) and counter.source == "RAPL"
    readings = iter([200_000, 500_000])  # wraps past 1e6 µJ once, then climbs

    def step() -> None:
        (domain / "energy_uj").write_text(str(next(readings)))

    result = measure_energy(step, seconds=0, counter=counter)
    assert result["steps"] == 1
    assert result["joules"] == pytest.approx(0.3)  # 900 000 → 1 000 000 → 200 000 µJ
    assert result["joules_per_step"] == pytest.approx(0.3)


def test_measure_energy_runs_steps_for_the_window_after_an_uncounted_first_step_and_reports_temperature():
    clock = {"j": 0.0, "calls": 0}
    counter = EnergyCounter("fake", lambda: clock["j"], lambda: 40.0 + clock["j"])

    def step() -> None:  # the first call pays 10 J of start-up, every later one 2 J
        clock["j"] += 10.0 if clock["calls"] == 0 else 2.0
        clock["calls"] += 1

    result = measure_energy(step, seconds=0.05, counter=counter)
    assert result["steps"] >= 1 and clock["calls"] == result["steps"] + 1
    assert result["joules"] == pytest.approx(2.0 * result["steps"])
    assert result["joules_per_step"] == pytest.approx(2.0)
    assert result["celsius_start"] == 50.0 and result["celsius_max"] == pytest.approx(50.0 + 2.0 * result["steps"])


def _row(network: str, size: int, peak: int | None, baseline: int = 100 * MiB, **extra) -> dict:
    result = {"peak_bytes": peak, "baseline_bytes": baseline, "retained_bytes": baseline - 50 * MiB, "device": "cpu"}
    return {
        "network": network,
        "size": size,
        "batch_size": 1,
        "num_blocks": 2,
        "peak": result if peak is not None else {"error": OUT_OF_MEMORY},
        **extra,
    }


def test_largest_cube_extrapolates_linearly_in_voxels_and_stops_at_the_first_failure():
    # total = 100 MiB + 1 KiB per voxel: 1 GiB fits n³ ≤ (1024 − 100) · 1024 voxels → n ≤ 98.1, a multiple of 16 → 96
    rows = [_row("idm", n, n**3 * 1024) for n in (32, 64)]
    assert largest_cube(rows, "idm", 2**30) == {"measured": 64, "first_out_of_memory": None, "extrapolated": 96}
    rows = [_row("monai", 32, 10 * MiB), _row("monai", 64, None), _row("monai", 96, None)]
    assert largest_cube(rows, "monai", 2**30) == {"measured": 32, "first_out_of_memory": 64}


def test_a_sweep_cut_short_gives_a_lower_bound_and_no_verdict_it_would_decide():
    skipped = {"skipped": "skipped (time budget spent)"}
    rows = [
        _row("idm", 32, 32**3 * 1024),
        _row("idm", 64, 64**3 * 1024),
        {"network": "idm", "size": 96, **skipped},
        {"network": "idm", "size": 128, **skipped},
    ]
    assert largest_cube(rows, "idm", 2**30) == {"measured": 64, "first_out_of_memory": None, "unmeasured_from": 96}
    crashed = [*rows[:2], {**_row("idm", 96, None), "peak": {"error": "exit code 1"}}, _row("idm", 128, MiB)]
    assert largest_cube(crashed, "idm", 2**30) == {"measured": 128, "first_out_of_memory": None, "unmeasured_from": 96}
    result = _synthetic_result(10 * MiB, int(0.4e9))
    goal = "largest cube at batch 1 within the memory limit: IDM's the largest"
    exact = {"measured": 64, "first_out_of_memory": 96}
    cut = {"measured": 64, "first_out_of_memory": None, "unmeasured_from": 96}
    for cubes, measured, verdict in [
        ({"idm": cut, "idm_plain": exact, "monai": exact, "monai_checkpointed": exact}, "≥ 64³", "met"),
        ({"idm": exact, "idm_plain": cut, "monai": exact, "monai_checkpointed": exact}, "64³", "n/a"),
        (
            {"idm": {**cut, "measured": 48}, "idm_plain": exact, "monai": exact, "monai_checkpointed": exact},
            "≥ 48³",
            "n/a",
        ),
        (
            {"idm": {**exact, "measured": 48}, "idm_plain": exact, "monai": exact, "monai_checkpointed": exact},
            "48³",
            "**missed**",
        ),
    ]:
        row = {g[0]: g for g in goals({**result, "largest_cube": cubes})}[goal]
        assert row[1].startswith(f"IDM memory-efficient {measured}, ") and row[2] == verdict, row
    report = render_suite({**result, "largest_cube": {n: cut for n in NETWORKS}}, None)
    assert "| IDM memory-efficient | 64³ | not measured from 96³ | — |" in report


def _timed(rounds: list[float]) -> dict:
    return {"step_seconds_per_round": rounds, "step_seconds": statistics.median(rounds)}


def _synthetic_result(me_peak_64: int, paper_peak: int, options_peak: int | None = None) -> dict:
    """A suite result; the paper configuration peaks ``paper_peak`` above its floor with the whole batch
    and ``options_peak`` (default: the same) with the memory options."""
    plan = SuitePlan.quick()
    depth = [
        _row(n, plan.depth_size, peak, stored_bytes=stored, num_blocks=d)
        for d, scale in ((1, 1), (8, 3))
        for n, peak, stored in (
            ("idm", 10 * MiB, 1 * MiB),
            ("idm_plain", 20 * MiB * scale, 9 * MiB * scale),
            ("monai", 30 * MiB * scale, 9 * MiB * scale),
            ("monai_checkpointed", 15 * MiB * scale, 3 * MiB * scale),
        )
    ]
    peaks = {"idm": me_peak_64, "idm_plain": 60 * MiB, "monai": 100 * MiB, "monai_checkpointed": 40 * MiB}
    # Round 2 was slow for every network: paired ratios 1.3, 1.3, 1.5 (median 1.3), while the ratio of the
    # medians would be 2.25 / 1.5 = 1.5.
    rounds = {
        "idm": [1.3, 2.6, 2.25],
        "idm_plain": [1.0, 2.0, 1.5],
        "monai": [0.5, 1.0, 0.75],
        "monai_checkpointed": [1.5, 3.0, 2.4],
    }
    resolution = [
        _row(n, plan.batch_size_at, peaks[n], stored_bytes=MiB, flops=1e9, parameters=1e6, **_timed(rounds[n]))
        for n in NETWORKS
    ]
    floor = 16 * 100
    peak = {"baseline_bytes": 50 * MiB + floor, "retained_bytes": floor, "device": "cpu"}
    paper = {
        "parameters": {"total": 100},
        "flops_per_step": 1e12,
        "forward_flops_per_sample": 1e11,
        "floor_bytes": floor,
        "peaks": {
            option: {
                "peak_bytes": paper_peak if option == "whole batch" or options_peak is None else options_peak,
                **peak,
            }
            for option in MEMORY_OPTIONS
        },
    }
    options = [
        _row(
            "idm",
            plan.batch_size_at,
            peak_mb * MiB,
            option=option,
            stored_bytes=MiB,
            flops=1e9,
            **_timed([seconds, 2 * seconds, seconds]),
        )
        for option, peak_mb, seconds in zip(MEMORY_OPTIONS, (40, 20, 15), (2.0, 2.5, 2.75), strict=True)
    ]
    cubes = {
        n: {"measured": plan.batch_size_at, "first_out_of_memory": None, "extrapolated": 64 if n == "idm" else 48}
        for n in NETWORKS
    }
    return {
        "plan": asdict(plan),
        "machine": "test machine",
        "command": "python x",
        "depth": depth,
        "resolution": resolution,
        "batch": resolution,
        "energy": {"n/a": "no counters"},
        "paper": paper,
        "memory_options": options,
        "largest_cube": cubes,
        "wall_seconds": 60.0,
    }


def test_goal_verdicts_follow_the_figures():
    met = {g[0]: g[2] for g in goals(_synthetic_result(me_peak_64=10 * MiB, paper_peak=int(0.4e9)))}
    assert all(v == "met" for v in met.values()), met
    missed = {g[0]: g[2] for g in goals(_synthetic_result(me_peak_64=50 * MiB, paper_peak=int(0.6e9)))}
    size = SuitePlan.quick().batch_size_at
    assert missed[f"peak at {size}³ ≤ 0.15× MONAI plain"] == "**missed**"
    assert missed[f"peak at {size}³ below MONAI + checkpointing"] == "**missed**"
    assert missed["paper configuration: peak − floor ≤ 0.5 GB (batch 4, 64³)"] == "**missed**"
    step_time = {g[0]: g for g in goals(_synthetic_result(10 * MiB, int(0.4e9)))}
    assert step_time["step time memory-efficient / plain ≤ 1.4× (median over rounds)"][1:] == [
        f"{size}³ 1.30× (1.30–1.50)",
        "met",
    ]
    assert step_time[f"faster than MONAI + checkpointing at equal or lower memory ({size}³, batch 1)"][1:] == [
        "2.25 vs 2.40 s, ratio 0.87× (0.87–0.94)",
        "met",
    ]
    with_options = {g[0]: g for g in goals(_synthetic_result(10 * MiB, int(0.6e9), options_peak=int(0.4e9)))}
    paper = with_options["paper configuration: peak − floor ≤ 0.5 GB (batch 4, 64³)"]
    assert paper[1] == (
        "whole batch: 0.60 GB; micro-batches of 1: 0.40 GB; micro-batches of 1 + recompute_norms: 0.40 GB"
    )
    assert paper[2] == "met with micro-batches of 1; **missed** with the whole batch at once"
    cut_short = _synthetic_result(10 * MiB, int(0.6e9))
    for option in list(MEMORY_OPTIONS)[1:]:
        cut_short["paper"]["peaks"][option] = {"skipped": "skipped (time budget spent)"}
    paper = {g[0]: g for g in goals(cut_short)}["paper configuration: peak − floor ≤ 0.5 GB (batch 4, 64³)"]
    assert paper[1:] == [
        "whole batch: 0.60 GB; micro-batches of 1: n/a; micro-batches of 1 + recompute_norms: n/a",
        "**missed** with what was measured; not measured: micro-batches of 1, micro-batches of 1 + recompute_norms",
    ]
    cubes = {n: {"measured": None, "first_out_of_memory": None} for n in NETWORKS}
    largest = {g[0]: g for g in goals({**cut_short, "largest_cube": cubes})}[
        "largest cube at batch 1 within the memory limit: IDM's the largest"
    ]
    assert largest[1:] == [
        ", ".join(
            f"{label} n/a"
            for label in (
                "IDM memory-efficient",
                "IDM plain autograd",
                "MONAI DiffusionModelUNet",
                "MONAI DiffusionModelUNet + checkpointing",
            )
        ),
        "n/a",
    ]


def test_rendered_report_carries_the_command_tables_and_energy_reason():
    text = render_suite(_synthetic_result(10 * MiB, int(0.4e9)), "## Quality section\n")
    assert "`python x`" in text and "no counters" in text and text.rstrip().endswith("## Quality section")
    size = SuitePlan.quick().batch_size_at
    assert f"| {size} | IDM memory-efficient | 1.00M | 1.0 | 10 | 1.0 | 2.25 |" in text
    assert f"| {size} | 1.30× (1.30–1.50) | 1.00× (1.00–1.00) | 0.50× (0.50–0.50) | 1.50× (1.50–1.60) |" in text
    assert f"{PAPER['parameters'] / 1e6:.1f}M" in text
    assert "| micro-batches of 1 + recompute_norms | 1.0 | 15 | 1.0 | 2.75 | 1.38× (1.38–1.38) |" in text


def test_rendered_energy_table_says_where_and_how_long_each_network_ran():
    result = _synthetic_result(10 * MiB, int(0.4e9))
    measured = {
        "source": "NVML",
        "seconds": 20.4,
        "steps": 51,
        "joules": 6120.0,
        "watts": 300.0,
        "joules_per_step": 120.0,
        "celsius_start": 31.0,
        "celsius_max": 45.0,
    }
    result["energy"] = {
        **{n: measured for n in NETWORKS[:3]},
        "monai_checkpointed": {"skipped": "skipped (time budget spent)"},
    }
    text = render_suite(result, None)
    plan = SuitePlan.quick()
    assert "## Energy and temperature (NVML)" in text
    assert f"at {plan.batch_size_at}³, batch 1, for {plan.energy_seconds:.0f} s" in text
    assert "| IDM memory-efficient | 20 | 51 | 300 | 120.0 | 31 | 45 |" in text
    assert "| MONAI DiffusionModelUNet + checkpointing | skipped (time budget spent) |" in text


def test_paired_ratio_is_taken_within_rounds_and_needs_matching_rounds():
    from scripts.benchmarking.timing import paired_ratio

    assert paired_ratio([2.0, 6.0, 3.0], [1.0, 4.0, 3.0]) == (1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0, 2.0], [1.0])


def test_measured_row_has_fewer_stored_bytes_for_the_memory_efficient_idm():
    plan, budget = SuitePlan.quick(), Budget(None)
    rows = {
        n: measure_row(
            Workload(n, 16, channels=(8, 16), attention_levels=(False, True)), plan, budget, torch.device("cpu")
        )
        for n in ("idm", "idm_plain")
    }
    assert rows["idm"]["parameters"] == rows["idm_plain"]["parameters"] > 0
    assert rows["idm"]["stored_bytes"] < 0.2 * rows["idm_plain"]["stored_bytes"]
    assert rows["idm"]["peak"]["peak_bytes"] > 0 and rows["idm"]["flops"] > rows["idm_plain"]["flops"]
    assert measure_row(Workload("idm", 16), plan, Budget(0), None)["skipped"].startswith("skipped")


def test_step_times_come_back_per_workload_and_round():
    from scripts.benchmarking.timing import measure_times_in_subprocess

    small = Workload("idm", 16, channels=(8, 16), attention_levels=(False, True))
    times = measure_times_in_subprocess([small, replace(small, network="idm_plain")], repeats=3)
    assert len(times) == 2 and all(len(rounds) == 3 and min(rounds) > 0 for rounds in times)


def test_a_failed_timing_process_is_reported_in_its_rows_and_the_suite_goes_on(monkeypatch):
    from scripts.benchmarking import sweeps
    from scripts.benchmarking.suite_report import _row_cells

    timeouts = []

    def fail(workloads, repeats, timeout):
        timeouts.append(timeout)
        raise RuntimeError("timing subprocess failed: CUDA error: an illegal memory access")

    monkeypatch.setattr(sweeps, "measure_times_in_subprocess", fail)
    rows = [{**Workload(n, 16).to_dict(), "peak": {"peak_bytes": MiB}} for n in ("idm", "idm_plain")]
    sweeps._time_rows(rows, SuitePlan.quick(), Budget(100))
    assert all("illegal memory access" in r["step_seconds_error"] and "step_seconds" not in r for r in rows)
    assert 150 < timeouts[0] <= 160  # what is left of the 100 s budget plus a minute's grace
    assert _row_cells(rows[0], "size")[-1] == "timing failed"


def test_resolution_sweep_stops_a_network_after_it_runs_out_of_memory_and_the_batch_sweep_reuses_its_rows(monkeypatch):
    from scripts.benchmarking import sweeps

    plan = replace(SuitePlan.quick(), sizes=(16, 32, 48), batch_size_at=16, batch_sizes=(1, 2))
    measured, timed = [], []

    def fake_row(workload, plan, budget, device):
        measured.append((workload.network, workload.size, workload.batch_size))
        fits = workload.network != "monai" or workload.size < 32
        return {**workload.to_dict(), "peak": {"peak_bytes": MiB} if fits else {"error": OUT_OF_MEMORY}}

    def fake_times(rows, plan, budget):
        timed.append({(r["size"], r["batch_size"]) for r in rows})
        for row in rows:
            row["step_seconds"] = 1.0

    monkeypatch.setattr(sweeps, "measure_row", fake_row)
    monkeypatch.setattr(sweeps, "_time_rows", fake_times)
    resolution = sweeps.resolution_sweep(plan, Budget(None), torch.device("cpu"))
    assert measured == [(n, s, 1) for s in (16, 32, 48) for n in NETWORKS if (n, s) != ("monai", 48)]
    assert timed == [{(16, 1)}, {(32, 1)}, {(48, 1)}]
    assert resolution[8 + NETWORKS.index("monai")]["peak"]["error"] == f"{OUT_OF_MEMORY} (at a smaller size)"
    measured.clear(), timed.clear()
    batch = sweeps.batch_sweep(plan, Budget(None), torch.device("cpu"), resolution)
    assert measured == [(n, 16, 2) for n in NETWORKS] and timed == [{(16, 2)}]
    assert batch[:4] == resolution[:4] and batch[0] is not resolution[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's peak and memory cap")
def test_cuda_peak_is_the_allocators_and_the_memory_limit_is_enforced():
    from scripts.benchmarking.peak_memory import measure_peak_in_subprocess

    small = Workload("idm", 32, channels=(8, 16), attention_levels=(False, True))
    fits = measure_peak_in_subprocess(small, memory_limit_bytes=8 * 2**30)
    assert fits["device"] == "cuda" and fits["peak_bytes"] > 0, fits
    # a level-0 tensor of this one is 8 × 256³ × 4 B = 512 MiB, twice the cap
    too_big = replace(small, network="idm_plain", size=256)
    assert measure_peak_in_subprocess(too_big, memory_limit_bytes=256 * MiB) == {"error": OUT_OF_MEMORY}


def test_the_cuda_memory_cap_reaches_the_allocator_as_a_fraction_of_the_current_device(monkeypatch):
    """Runs torch's own ``set_per_process_memory_fraction`` (its argument checks included) with only the
    driver calls stubbed, so a device torch would refuse fails here, without a GPU."""
    from types import SimpleNamespace

    import torch.cuda.memory

    from scripts.benchmarking.peak_memory import cap_cuda_memory

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction", lambda *args: calls.append(args), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=96 * 2**30))
    cap_cuda_memory(24 * 2**30)
    cap_cuda_memory(200 * 2**30)  # more than the device has: no cap
    assert calls == [(0.25, 1), (1.0, 1)]


def test_running_out_of_memory_is_recognised_however_the_device_reports_it():
    from scripts.benchmarking.child_process import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(torch.AcceleratorError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("Given groups=1, weight of size [8, 2, 3, 3, 3], expected input"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_child_processes_find_the_bundle_and_the_packages_already_on_pythonpath(monkeypatch, tmp_path):
    from scripts.benchmarking.child_process import BUNDLE_ROOT, child_environment

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # e.g. packages installed with pip install --target
    env = child_environment(OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(BUNDLE_ROOT), str(tmp_path)]
    assert env["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert child_environment()["PYTHONPATH"] == str(BUNDLE_ROOT)


FREED_TO_THE_OS = """
from bundle.process_memory import proc_status_bytes
from scripts.benchmarking.allocator import return_freed_memory_to_os
import torch

MiB = 2**20
assert return_freed_memory_to_os()
before = proc_status_bytes("VmRSS")
tensors = [torch.ones(2**18) for _ in range(256)]  # 256 MiB in 1 MiB tensors
held = proc_status_bytes("VmRSS")
del tensors
assert held - before > 200 * MiB, (held - before) / MiB
assert proc_status_bytes("VmRSS") - before < 50 * MiB, (proc_status_bytes("VmRSS") - before) / MiB
"""


def test_freed_tensors_go_back_to_the_os_after_mallopt(tmp_path):
    """In a process of its own, as the benchmarks measure: in the suite's process the arena earlier tests grew would
    hold the tensors without the RSS growing."""
    (tmp_path / "freed.py").write_text(FREED_TO_THE_OS)
    result = run_python([tmp_path / "freed.py"])
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_benchmarked_adamw_update_allocates_nothing_of_a_parameters_size():
    from scripts.benchmarking.workload import build_network, make_training_step

    workload = Workload("idm", 16, channels=(16, 32), attention_levels=(False, True))
    optimizer = make_training_step(workload, build_network(workload)).optimizer
    largest_allocation, largest_parameter = largest_update_allocation(optimizer)
    assert largest_parameter == 16 * 16 * 27 * 4  # a 16 → 16 3³ convolution of the 32-channel level
    assert largest_allocation < 1024


def test_step_profile_follows_every_engine_step_and_names_the_phases():
    from scripts.benchmarking.step_profile import profile_step_in_subprocess, render_step_profile
    from scripts.benchmarking.workload import build_network

    workload = Workload("idm", 32, batch_size=2, channels=(8, 16), attention_levels=(False, True))
    profile = profile_step_in_subprocess(workload)
    assert "error" not in profile, profile
    assert len(profile["steps"]) == len(build_network(workload).trunk.sequence.steps)
    assert {s["step"] for s in profile["steps"]} >= {
        "OnTensor(HalfCoupling)",
        "OnTensor(InvertibleAttention)",
        "SkipSplit",
    }
    assert profile["steps"][0]["state"] == [(8, 32, 32, 32)]  # backward starts at the trunk's output
    assert all(s["peak_bytes"] >= s["before_bytes"] for s in profile["steps"])
    assert profile["backward_peak_bytes"] >= max(s["peak_bytes"] for s in profile["steps"]) > 0
    assert profile["forward_peak_bytes"] > 0 and profile["update_peak_bytes"] >= 0
    text = render_step_profile(profile, workload, "python x", "a machine")
    assert "`python x`" in text and "| OnTensor(HalfCoupling) | 8 × 32^3 |" in text
    assert "A level-0 state tensor of this step is 2 MB" in text  # 2 × 8 × 32³ × 4 B
    micro = replace(workload, micro_batch_size=1)
    profile = profile_step_in_subprocess(micro)
    assert len(profile["steps"]) == 2 * len(build_network(workload).trunk.sequence.steps)  # each sample's backward
    text = render_step_profile(profile, micro, "python x", "a machine")
    assert "batch 2 back-propagated 1 at a time" in text and "A level-0 state tensor of this step is 1 MB" in text
