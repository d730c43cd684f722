"""The CLI as a child process, for tests that must kill it, signal it or watch it work.

Shared by the runner and reliability tests: the same environment (one thread, this checkout
first on the path) and the same polling, so a kill -9 test in one suite is a kill -9 test in
the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The checkout holding ``render.py`` (the package's parent folder).
ROOT = Path(__file__).resolve().parents[2]


def render_process(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """``python render.py ARGS`` started from the checkout, output captured as text."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "render.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[str],
             timeout: float = 120) -> None:
    """Poll ``predicate`` until true; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s")
