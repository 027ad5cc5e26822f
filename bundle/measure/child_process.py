"""The environment of the benchmarks' child processes (timing, the quality comparison's training runs)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLE_ROOT", "child_environment"]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def child_environment(**variables: str) -> dict[str, str]:
    """This process's environment with the bundle root first on ``PYTHONPATH``, the entries already there
    kept after it (packages installed with ``pip install --target`` stay importable in the child), and
    ``variables`` set."""
    python_path = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **variables}
