"""Energy and temperature of training steps, where the machine exposes counters (the paper's §5.3).

Sources, in order: NVML on a CUDA GPU (``nvmlDeviceGetTotalEnergyConsumption``, millijoules, and the
GPU temperature), then Intel/AMD RAPL through ``/sys/class/powercap`` (package energy, microjoules;
CPU temperature from ``/sys/class/thermal`` where readable). Where none is readable the result says
so and why, and no steps are run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["EnergyCounter", "find_energy_counter", "measure_energy"]

_POWERCAP = Path("/sys/class/powercap")
_THERMAL = Path("/sys/class/thermal")


@dataclass
class EnergyCounter:
    """``joules()``: a cumulative energy reading; ``celsius()``: a temperature or ``None``."""

    source: str
    joules: Callable[[], float]
    celsius: Callable[[], float | None]


def _nvml_counter() -> EnergyCounter | str:
    """NVML's counters of the current CUDA device. Its NVML handle comes from torch, which maps the CUDA
    index through ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) to NVML's, as ``torch.cuda.temperature`` does."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import pynvml

        handle = torch.cuda._get_pynvml_handler()
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    except Exception as error:  # noqa: BLE001 - missing library, driver or a GPU without these counters
        return f"NVML unreadable ({error})"
    return EnergyCounter(
        "NVML",
        lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3,
        lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
    )


def _cpu_celsius() -> float | None:
    readings = []
    for zone in _THERMAL.glob("thermal_zone*/temp"):
        try:
            readings.append(int(zone.read_text()) / 1e3)
        except (OSError, ValueError):
            continue
    return max(readings) if readings else None


class _RaplPackages:
    """Cumulative joules over RAPL package domains, unwrapping each counter at ``max_energy_range_uj``."""

    def __init__(self, domains: list[Path]) -> None:
        self.domains = domains
        self.ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.last = [int((d / "energy_uj").read_text()) for d in domains]
        self.total_uj = 0

    def __call__(self) -> float:
        for i, domain in enumerate(self.domains):
            now = int((domain / "energy_uj").read_text())
            self.total_uj += now - self.last[i] if now >= self.last[i] else now + self.ranges[i] - self.last[i]
            self.last[i] = now
        return self.total_uj / 1e6


def _rapl_counter() -> EnergyCounter | str:
    domains = [
        d
        for d in sorted(_POWERCAP.glob("*-rapl:*"))
        if (d / "name").exists() and (d / "name").read_text().startswith("package") and (d / "energy_uj").exists()
    ]
    if not domains:
        return f"no RAPL package domains under {_POWERCAP}"
    try:
        joules = _RaplPackages(domains)
    except (OSError, ValueError) as error:
        return f"RAPL unreadable ({error})"
    return EnergyCounter("RAPL", joules, _cpu_celsius)


def find_energy_counter() -> EnergyCounter | str:
    """The first readable counter, or a string saying why there is none."""
    reasons = []
    for make in (_nvml_counter, _rapl_counter):
        counter = make()
        if isinstance(counter, EnergyCounter):
            return counter
        reasons.append(counter)
    return "; ".join(reasons)


def _synchronized(step: Callable[[], None]) -> None:
    """``step()``, waiting for the GPU's work to finish."""
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_energy(step: Callable[[], None], seconds: float, counter: EnergyCounter | str | None = None) -> dict:
    """Runs ``step()`` repeatedly for ``seconds`` (at least one step) and returns the energy used. One untimed
    step comes first, so that one-off start-up work (CUDA kernels loaded, cuDNN plans chosen, the optimizer's
    state allocated) at near-idle power is not counted as a training step.

    Keys: ``source``, ``seconds``, ``steps``, ``joules``, ``watts``, ``joules_per_step``,
    ``celsius_start``, ``celsius_max``; or ``{"n/a": reason}`` when no counter is readable (nothing is run).
    A RAPL counter covers the whole CPU package, so other load on the machine is included.
    """
    counter = find_energy_counter() if counter is None else counter
    if isinstance(counter, str):
        return {"n/a": counter}
    _synchronized(step)
    celsius = [counter.celsius()]
    start_joules, start, steps = counter.joules(), time.perf_counter(), 0
    while steps == 0 or time.perf_counter() - start < seconds:
        _synchronized(step)
        steps += 1
        celsius.append(counter.celsius())
    elapsed, joules = time.perf_counter() - start, counter.joules() - start_joules
    readings = [c for c in celsius if c is not None]
    return {
        "source": counter.source,
        "seconds": elapsed,
        "steps": steps,
        "joules": joules,
        "watts": joules / elapsed,
        "joules_per_step": joules / steps,
        "celsius_start": celsius[0],
        "celsius_max": max(readings) if readings else None,
    }
