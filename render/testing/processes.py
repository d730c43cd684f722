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


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child run: this one, this checkout first, one torch thread."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra or {}))


def render_process(*args: str, env: dict[str, str] | None = None,
                   **kw: Any) -> subprocess.Popen[str]:
    """``python render.py ARGS`` started from the checkout, output captured as text;
    ``env``: variables to set besides the usual ones."""
    return subprocess.Popen([sys.executable, str(ROOT / "render.py"), *args], cwd=ROOT,
                            env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def render_run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python render.py ARGS`` run to its end (within ``timeout`` seconds), as above."""
    return subprocess.run([sys.executable, str(ROOT / "render.py"), *args], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


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


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children ...), from ``/proc``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:   # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def ray_workers(pid: int) -> list[int]:
    """The render workers (Ray actors, titled ``ray::RenderWorker``) a run ``pid`` started."""
    workers = []
    for child in descendants(pid):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::RenderWorker"):
            workers.append(child)
    return workers
