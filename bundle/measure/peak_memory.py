"""Peak memory of one training step above the post-warm-up baseline, in a fresh process (DESIGN §5).

On the CPU: the process's peak RSS (``VmHWM``) minus its RSS after a warm-up step, so parameters,
gradients and optimizer state are already allocated. The process runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS, and the peak is reset after the
warm-up by writing ``5`` to ``/proc/self/clear_refs``. On a GPU: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, minus the allocation after the warm-up.

Run as ``python -m bundle.measure.peak_memory '<workload json>'``; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..process_memory import proc_status_bytes
from .workload import Workload, build_network, make_training_step

__all__ = ["measure_peak_in_subprocess"]

_ROOT = Path(__file__).resolve().parents[2]


def measure_peak_in_subprocess(workload: Workload, timeout: float = 1800) -> dict:
    """Runs the measurement in a fresh interpreter and returns its result dict.

    Keys: ``peak_bytes`` (peak above baseline), ``baseline_bytes``, ``device``; or ``error`` when the
    step did not fit (out of memory) or failed.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bundle.measure.peak_memory", json.dumps(workload.to_dict())],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=_ROOT,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(workload: Workload, device: torch.device) -> dict:
    model = build_network(workload).to(device)
    step, _ = make_training_step(workload, model, device)
    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - baseline, "baseline_bytes": baseline, "device": "cuda"}
    step()
    baseline = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return {"peak_bytes": proc_status_bytes("VmHWM") - baseline, "baseline_bytes": baseline, "device": "cpu"}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    print(json.dumps(_measure(Workload(**spec), torch.device("cuda" if torch.cuda.is_available() else "cpu"))))
