"""This process's memory figures from ``/proc/self/status`` (Linux), for the training handlers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["proc_status_bytes"]


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS``, ``VmHWM`` (peak RSS) … of this process in bytes; None where /proc does not give it."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None
