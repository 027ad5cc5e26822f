"""Peak memory of one training step above the post-warm-up baseline, in a fresh process
(docs/architecture.md, "Measuring").

On the CPU: the process's peak RSS (``VmHWM``) minus its RSS after a warm-up step, so parameters,
gradients and optimizer state are already allocated. The process runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS, and the peak is reset after the
warm-up by writing ``5`` to ``/proc/self/clear_refs``. On a GPU: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, minus the allocation after the warm-up; with ``memory_limit_bytes``
the process may allocate no more than that (``set_per_process_memory_fraction``), so "does it fit in
24 GiB" is answered by the allocator itself.

Each measurement is a :class:`~scripts.benchmarking.child_process.FreshProcess`: a fresh allocator and no
tensors of any earlier configuration, without paying the imports (seconds) per configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bundle.process_memory import proc_status_bytes

from .child_process import OUT_OF_MEMORY, FreshProcess, measuring_device
from .workload import Workload, build_network, make_training_step

__all__ = ["OUT_OF_MEMORY", "PeakMeter", "cap_cuda_memory", "measure_peak_in_subprocess", "start_peak_measurement"]


def start_peak_measurement(workload: Workload, memory_limit_bytes: int | None = None) -> FreshProcess:
    """Starts the measurement of ``workload``'s step peak in a fresh process; its ``result(timeout)`` is the
    dict of :func:`measure_peak_in_subprocess`."""
    return FreshProcess(_measure, workload, memory_limit_bytes)


def measure_peak_in_subprocess(
    workload: Workload, memory_limit_bytes: int | None = None, timeout: float = 3600
) -> dict:
    """Runs the measurement in a fresh process and returns its result dict.

    Keys: ``peak_bytes`` (peak above baseline), ``baseline_bytes`` (after the warm-up step: parameters,
    gradients, optimizer state and, on the CPU, the interpreter), ``retained_bytes`` (what building the
    network and the warm-up step left allocated: :meth:`PeakMeter.allocated` after it minus before),
    ``device``; or ``error``: :data:`OUT_OF_MEMORY` when the step did not fit (including a
    process the kernel's OOM killer ended), else the failure.
    """
    return start_peak_measurement(workload, memory_limit_bytes).result(timeout)


class PeakMeter:
    """Memory in use and its peak since the last reset: the CUDA allocator's on a GPU; RSS and peak RSS
    (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return proc_status_bytes("VmRSS")

    def allocated(self) -> int:
        """Memory the process allocated itself: the CUDA allocator's bytes, or on the CPU the anonymous
        resident memory (``RssAnon``), which leaves out the shared-library code that a first step pages in
        (tens of MB of ``RssFile``, which no allocator hands out and a GPU measurement does not see)."""
        return self.current() if self.cuda else proc_status_bytes("RssAnon")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return proc_status_bytes("VmHWM")

    def reset(self) -> int:
        """Resets the peak to the memory in use now, and returns that."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()


def cap_cuda_memory(limit_bytes: int) -> None:
    """Lets this process's CUDA allocator hand out at most ``limit_bytes`` on the current device (as a
    fraction of its total memory; an allocation beyond it raises ``torch.OutOfMemoryError``). The device
    is named by its index: ``set_per_process_memory_fraction`` refuses a ``torch.device`` without one."""
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), index)


def _measure(workload: Workload, memory_limit_bytes: int | None) -> dict:
    device = measuring_device()
    if device.type == "cuda" and memory_limit_bytes:
        cap_cuda_memory(memory_limit_bytes)
    meter = PeakMeter(device)
    before = meter.allocated()
    model = build_network(workload).to(device)
    step = make_training_step(workload, model, device).step
    step()
    retained = meter.allocated() - before
    baseline = meter.reset()
    step()
    return {
        "peak_bytes": meter.peak() - baseline,
        "baseline_bytes": baseline,
        "retained_bytes": retained,
        "device": device.type,
    }
