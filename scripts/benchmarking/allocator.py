"""glibc's allocator setting that gives freed memory back to the OS (the benchmark and its subprocesses)."""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["MMAP_THRESHOLD_ENV", "return_freed_memory_to_os"]

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
