"""A pre-imported Python that runs command lines in forked children: ``python tests/zygote.py`` imports torch,
MONAI, Ignite and the bundle once, then reads one JSON request per line on stdin and answers each with one JSON
line on stdout.

Request: ``{"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path, "timeout": seconds}``, where
``argv`` is what follows ``python`` on a command line (``["-m", "monai.bundle", "run", …]`` or
``["scripts/x.py", …]``). A child forked for it takes ``env`` as its environment and ``cwd`` as its working
directory, appends its standard output and error to the two paths (which may be one), takes the torch threads of
``OMP_NUM_THREADS`` where ``env`` sets it, runs ``argv`` as ``python`` would (the module or
script as ``__main__``, ``sys.argv`` and ``sys.path[0]`` as the interpreter sets them) and ends like an interpreter
does (``SystemExit``'s code, 1 and ``sys.excepthook`` for an uncaught exception, atexit handlers run). Answer:
``{"returncode": n, "timed_out": bool}``; a child still running at the timeout is killed with its process group.

The tests' command lines run here because importing MONAI alone takes about 10 s on a 2-core machine, which each
of some 70 command lines in the suite paid again; a forked child starts in milliseconds from the imported state,
which is that of a fresh interpreter (nothing has run yet), so a command behaves as when typed.
"""

from __future__ import annotations

import gc
import json
import os
import random
import runpy
import signal
import sys
import time

# what a command line of the suite imports: MONAI (all of it comes with ``import monai``), Ignite, fire, the bundle
import fire  # noqa: F401
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot
import monai.bundle.scripts  # noqa: F401
import numpy
import torch

import bundle.data
import bundle.diffusion
import bundle.evaluation
import bundle.handlers
import bundle.inference
import bundle.settings
import bundle.visualize  # noqa: F401


def _run_as_python(argv: list[str]) -> int:
    """Runs ``python *argv`` in this process; its exit status."""
    try:
        if argv[0] == "-m":
            sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter: report through sys.excepthook and exit 1
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _fresh_random_state() -> None:
    """Seeds torch's, NumPy's and Python's generators from the OS, as a new interpreter does: a forked child
    otherwise starts from the zygote's state, the same in every child, which would hide a run that depends on an
    unseeded draw (two command lines would agree only because they were forked from one process)."""
    torch.seed()
    numpy.random.seed()
    random.seed()


def _child(request: dict) -> None:
    """In the forked child: runs the request and leaves through the interpreter's own exit (never returns)."""
    os.setpgrp()  # its own process group, which a timeout kills whole
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if "OMP_NUM_THREADS" in os.environ:  # read when torch was imported, before the fork: apply it as a start would
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    _fresh_random_state()
    sys.exit(_run_as_python(request["argv"]))  # unwinds to the interpreter's exit: atexit, threads, flushes


def _wait(pid: int, timeout: float) -> dict:
    """The answer for child ``pid``, which is killed with its process group after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            return {"returncode": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "timed_out": True}
        time.sleep(0.05)


def main() -> None:
    # the imported modules' objects go to the collector's permanent generation: a child's collections (and the
    # interpreter's shutdown) then do not walk them, which would copy every page they lie on into the child
    # (about 2 s of the shutdown of each command, measured, down to 0.4 s)
    gc.freeze()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps(_wait(pid, request["timeout"])) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
