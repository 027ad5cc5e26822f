"""The benchmarks' child processes: fresh processes forked from a fork server for every measurement (peak
memory, step times, the step profile), and the command lines the quality, generation and synthesis studies run
(``python -m monai.bundle run …``, :func:`run_bundle_command`) with their environment.

A measurement needs a fresh process (a new allocator, no tensors of an earlier configuration, its own
peak), but importing torch, MONAI and this bundle costs seconds. The fork server (``multiprocessing``
"forkserver") imports them once; every :class:`FreshProcess` is forked from it. The server starts with
``MALLOC_MMAP_THRESHOLD_=65536`` in its environment (glibc reads it at process start; forked children
inherit it), so memory a child frees goes back to the OS, and with the bundle root on ``PYTHONPATH``,
so its preloading does not depend on the working directory. The server never touches CUDA: every child
initialises its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

import torch

from .allocator import MMAP_THRESHOLD_ENV

__all__ = [
    "BUNDLE_ROOT",
    "OUT_OF_MEMORY",
    "FreshProcess",
    "child_environment",
    "is_out_of_memory",
    "launch_python",
    "measuring_device",
    "run_bundle_command",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
OUT_OF_MEMORY = "out of memory"
# What the fork server imports once: the modules whose functions its children run (torch, MONAI and the
# networks come with them).
_PRELOAD = [
    "scripts.benchmarking.peak_memory",
    "scripts.benchmarking.timing",
    "scripts.benchmarking.step_profile",
    "scripts.benchmarking.plan_accuracy",
]
# How running out of memory reads where it is not a torch.OutOfMemoryError: the CPU allocator's failure,
# a CUDA error raised outside the caching allocator ("CUDA error: out of memory", e.g. a library handle or
# a cuDNN workspace) and a cuBLAS/cuDNN allocation status.
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "ALLOC_FAILED")


def child_environment(**variables: str) -> dict[str, str]:
    """This process's environment with the bundle root first on ``PYTHONPATH``, the entries already there
    kept after it (packages installed with ``pip install --target`` stay importable in the child), and
    ``variables`` set."""
    python_path = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **variables}


def launch_python(argv: Sequence[str], env: Mapping[str, str], log: Path) -> int:
    """``python *argv`` in a new process in the bundle root with ``env``, its standard output and error appended to
    ``log``; its exit status. (The test suite replaces it with one that forks the process from its pre-imported
    ``tests/zygote.py``, which runs the same command line as a new interpreter would.)"""
    with open(log, "a") as out:
        command = [sys.executable, *argv]
        result = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        return result.returncode


def run_bundle_command(
    run_id: str,
    config_file: str | Sequence[str],
    args_file: Path,
    log: Path,
    flags: Mapping[str, object] | None = None,
    num_threads: int | None = None,
) -> int:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG --args_file ARGS --key value …`` (``flags``) as a
    user types it, on ``num_threads`` torch threads (``OMP_NUM_THREADS``; None: torch's default), its output appended
    to ``log`` (:func:`launch_python`); its exit status."""
    configs = config_file if isinstance(config_file, str) else json.dumps(list(config_file))
    argv = ["-m", "monai.bundle", "run", run_id, "--config_file", configs, "--args_file", str(args_file)]
    argv += [a for key, value in (flags or {}).items() for a in (f"--{key}", str(value))]
    env = child_environment() if num_threads is None else child_environment(OMP_NUM_THREADS=str(num_threads))
    return launch_python(argv, env, log)


def measuring_device() -> torch.device:
    """The device a measurement runs on: the current CUDA device where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_out_of_memory(error: Exception) -> bool:
    """Whether ``error`` says the device ran out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _OUT_OF_MEMORY_MESSAGES)
    )


@cache
def _fork_server() -> multiprocessing.context.BaseContext:
    """The "forkserver" context, its server started now with :func:`child_environment` (allocator setting
    included) as its environment and :data:`_PRELOAD` imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    environment = child_environment(**MMAP_THRESHOLD_ENV)
    saved = {key: os.environ.get(key) for key in (*MMAP_THRESHOLD_ENV, "PYTHONPATH")}
    os.environ.update({key: environment[key] for key in saved})
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return context


class FreshProcess:
    """``function(*args)`` (a module-level function returning a dict) running in a new process forked from
    the fork server, started on construction; :meth:`result` waits for its dict, so the caller can work
    meanwhile.

    A failure in the child becomes ``{"error": ...}``: :data:`OUT_OF_MEMORY` when the device ran out of
    memory (including a child the kernel's OOM killer ended), else the exception's type and message.
    """

    def __init__(self, function: Callable[..., dict], *args) -> None:
        context = _fork_server()
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_run_in_child, args=(function, args, sender), daemon=True)
        self._process.start()
        sender.close()

    def result(self, timeout: float = 3600) -> dict:
        """The child's dict; ``{"error": "no result within … s"}`` (the child killed) after ``timeout`` seconds."""
        if self._receiver.poll(timeout):
            try:
                result = self._receiver.recv()
            except EOFError:  # the child died without answering
                result = None
        else:
            self._process.kill()
            result = {"error": f"no result within {timeout:.0f} s"}
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        if result is None:
            exit_code = self._process.exitcode
            result = {"error": OUT_OF_MEMORY if exit_code == -9 else f"exit code {exit_code}"}
        return result


def _run_in_child(function: Callable[..., dict], args: tuple, sender) -> None:
    try:
        result = function(*args)
    except Exception as error:  # noqa: BLE001 - any failure of the child is reported in the row; the suite goes on
        result = {"error": OUT_OF_MEMORY if is_out_of_memory(error) else f"{type(error).__name__}: {error}"}
    sender.send(result)
    sender.close()
