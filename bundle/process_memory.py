"""Process memory figures from ``/proc/self/status`` (Linux), shared by the training handlers and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

__all__ = ["MMAP_THRESHOLD_ENV", "proc_status_bytes", "return_freed_memory_to_os"]


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS``, ``VmHWM`` (peak RSS) … of this process in bytes; None where /proc does not give it."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MMAP_THRESHOLD_BYTES = 65536
# The same setting for a process started from now on (glibc reads it at start-up): the measurement subprocesses.
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_BYTES)}


def return_freed_memory_to_os(threshold_bytes: int = _MMAP_THRESHOLD_BYTES) -> bool:
    """Makes glibc map allocations of ``threshold_bytes`` or more separately, so that freeing them gives the
    memory back to the OS (what ``MALLOC_MMAP_THRESHOLD_`` does at start-up; by default glibc raises the
    threshold after large frees and then keeps freed tensors in its heap). False where glibc is absent."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except AttributeError:  # a C library without mallopt
        return False
