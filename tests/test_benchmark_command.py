"""``python scripts/benchmark.py suite``: its argument errors, the order of its parts and what it writes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ROOT
from test_benchmarks import MiB, _synthetic_result


def _command_module():
    spec = importlib.util.spec_from_file_location("benchmark_command", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"quick": True, "gpu": True}, "choose one of --quick and --gpu"),
        ({"quick": "true", "budget_s": 0}, "--budget_s must be positive, got 0"),
        ({"quick": "maybe"}, "--quick"),
    ],
)
def test_suite_refuses_bad_arguments_before_writing_anything(tmp_path, arguments, message):
    out = tmp_path / "out"
    with pytest.raises((SystemExit, ValueError), match=message):
        _command_module().Benchmark().suite(output_dir=str(out), **arguments)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_gpu_mode_says_it_needs_cuda(tmp_path):
    with pytest.raises(SystemExit, match="--gpu needs a CUDA device"):
        _command_module().Benchmark().suite(gpu=True, output_dir=str(tmp_path / "out"))


def test_suite_writes_its_report_and_keeps_the_finished_parts_of_a_run_that_stops(tmp_path, monkeypatch):
    """The command's own work, with each part's measurement replaced by the figures of a synthetic suite
    (the measurements themselves are tested in test_benchmarks.py)."""
    command = _command_module()
    figures = _synthetic_result(10 * MiB, int(0.4e9))
    order = []
    for key, name in (
        ("energy", "energy_per_network"),
        ("paper", "paper_configuration"),
        ("memory_options", "memory_options"),
        ("depth", "depth_sweep"),
        ("batch", "batch_sweep"),
        ("resolution", "resolution_sweep"),
    ):
        monkeypatch.setattr(command, name, lambda *args, key=key, **kwargs: order.append(key) or figures[key])
    out = tmp_path / "out"
    out.mkdir()
    (out / "benchmarks.md").write_text("the earlier report")

    def stop(*args):
        raise RuntimeError("stopped in the batch sweep")

    with monkeypatch.context() as patch:
        patch.setattr(command, "batch_sweep", stop)
        with pytest.raises(RuntimeError, match="stopped in the batch sweep"):
            command.Benchmark().suite(quick=True, quality=False, output_dir=str(out))
    assert order == ["resolution", "depth", "paper", "energy"]  # the headline figures first
    assert (out / "benchmarks.md").read_text() == "the earlier report"
    partial = json.loads((out / "benchmarks.partial.json").read_text())
    assert list(partial)[3:] == order and partial["depth"] == figures["depth"]

    def stop_quality(*args):
        raise RuntimeError("stopped in the quality comparison")

    with monkeypatch.context() as patch:
        patch.setattr(command, "_quality", stop_quality)
        with pytest.raises(RuntimeError, match="stopped in the quality comparison"):
            command.Benchmark().suite(quick=True, output_dir=str(out))
    assert not (out / "benchmarks.partial.json").exists()
    assert json.loads((out / "benchmarks.json").read_text())["batch"] == figures["batch"]
    assert "## Depth sweep" in (out / "benchmarks.md").read_text()

    command.Benchmark().suite(quick=True, quality=False, output_dir=str(out))
    assert not (out / "benchmarks.partial.json").exists()
    result = json.loads((out / "benchmarks.json").read_text())
    assert result["command"] == "python scripts/benchmark.py suite --quick --quality false"
    assert result["memory_options"] == figures["memory_options"] and result["quality"] is None
    report = (out / "benchmarks.md").read_text()
    assert report.startswith("# ") and "`python scripts/benchmark.py suite --quick --quality false`" in report
    assert all(
        (out / name).stat().st_size > 0 for name in ("memory_vs_depth.png", "memory_vs_resolution.png", "step_time.png")
    )


@pytest.mark.parametrize(
    "limit_voxels, step, expected", [(100, 16, 96), (64, 64, 64), (15, 16, None), (10_000, 16, 512)]
)
def test_the_largest_cube_is_the_largest_multiple_that_the_plan_fits(monkeypatch, limit_voxels, step, expected):
    from scripts.benchmarking import native_resolution

    planned = []

    def plan(overrides: dict) -> dict:
        size = overrides["spatial_size"][0]
        planned.append(size)
        return {"fits": size <= limit_voxels, "peak_bytes": size}

    monkeypatch.setattr(native_resolution, "_plan", plan)
    found = native_resolution.largest_cube({"batch_size": 1}, step)
    assert found["size"] == expected
    assert (found["plan"] or {}).get("peak_bytes") == expected
    assert all(size % step == 0 for size in planned) and len(planned) <= 12


def test_the_sampling_study_needs_a_trained_generation_study(tmp_path):
    with pytest.raises(SystemExit, match="need --generation_dir with a trained generation study"):
        _command_module().Benchmark().sampling(generation_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
