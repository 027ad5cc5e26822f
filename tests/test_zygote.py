"""The suite's command-line runner (``conftest.run_python`` over ``tests/zygote.py``) ends a command as the
interpreter would: exit status, output, working directory, environment, uncaught exceptions, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_python

SCRIPT = """
import os, sys, time
print("out", os.getcwd(), os.environ.get("IDM_ZYGOTE_TEST"), sys.argv[1:])
print("err", file=sys.stderr)
mode = sys.argv[1]
if mode == "exit-text":
    sys.exit("stopped: bad input")
if mode == "raise":
    raise ValueError("uncaught")
if mode == "sleep":
    time.sleep(60)
sys.exit(int(mode))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("mode, returncode", [("0", 0), ("3", 3), ("exit-text", 1), ("raise", 1)])
def test_a_command_ends_as_under_the_interpreter(script, tmp_path, mode, returncode):
    env = {**os.environ, "IDM_ZYGOTE_TEST": "set"}
    result = run_python([script, mode], cwd=tmp_path, env=env)
    expected = subprocess.run(
        [sys.executable, script, mode], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert (
        (result.returncode, result.stdout)
        == (expected.returncode, expected.stdout)
        == (returncode, f"out {tmp_path} set ['{mode}']\n")
    )
    assert result.stderr.startswith("err\n") and result.stderr.splitlines()[-1] == expected.stderr.splitlines()[-1]


def test_a_command_past_its_timeout_is_killed(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([script, "sleep"], cwd=tmp_path, timeout=1)
    assert run_python([script, "0"], cwd=tmp_path).returncode == 0  # the runner goes on
