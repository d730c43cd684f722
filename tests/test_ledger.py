"""The SQLite ledger (rows, kill -9 safety) and the run lock (contention, take-over)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from render.ledger import (
    LOCK_NAME,
    Ledger,
    LockedError,
    RunLock,
    pid_alive,
    read_done_keys,
)
from render.tasks import Task

REPO = Path(__file__).resolve().parents[1]


def make_task(index: int = 0, **kw: object) -> Task:
    base: dict[str, object] = dict(
        job="demo", index=index, prompt=f"a cabin {index}", negative="", seed=index,
        model="sd15", width=64, height=64, steps=4, cfg=7.0, sampler="Euler a",
    )
    base.update(kw)
    task = Task(**base)  # type: ignore[arg-type]
    return dataclasses.replace(task, id=task.compute_id())


def run_py(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended: {proc.stderr.read() if proc.stderr else ''}")
        if expected in line:
            return line
    raise AssertionError(f"no {expected!r} within {timeout}s")


# -- rows ------------------------------------------------------------------------------------
def test_record_and_read(tmp_path: Path) -> None:
    task = make_task(1, axes={"cfg": 7.0, "lora.add_detail": 0.5},
                     sections={"lora": {"add_detail": 0.5}})
    image = tmp_path / "demo" / "00001.png"
    image.parent.mkdir()
    image.write_bytes(b"png")
    failed = make_task(2)
    with Ledger(tmp_path) as ledger:
        ledger.record_done(task, [image], {"render": 1.5}, "a cabin 1\nSteps: 4")
        ledger.record_failed(failed, "RuntimeError: CUDA out of memory")
        assert ledger.done_keys() == {(task.id, task.job)}
        rows = {r.id: r for r in ledger.rows()}
        done, bad = rows[task.id], rows[failed.id]
        assert done.status == "done" and done.paths == (image,)
        assert done.timings == {"render": 1.5} and done.infotext == "a cabin 1\nSteps: 4"
        assert done.axes == {"cfg": 7.0, "lora.add_detail": 0.5}
        assert done.settings["lora"] == {"add_detail": 0.5} and done.settings["kind"] == "txt2img"
        assert done.settings["sections"] == ["lora"] and done.index == 1 and done.job == "demo"
        assert bad.status == "failed" and bad.error == "RuntimeError: CUDA out of memory"
        assert [r.id for r in ledger.rows(job="demo", status="failed")] == [failed.id]
        assert ledger.rows(job="other") == []
    stored = sqlite3.connect(tmp_path / "render.db").execute(
        "SELECT outputs FROM tasks WHERE id=?", (task.id,)).fetchone()[0]
    assert json.loads(stored) == ["demo/00001.png"]      # relative: the tree can move
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    with Ledger(moved) as ledger:
        assert ledger.rows(status="done")[0].paths == (moved / "demo" / "00001.png",)


def test_a_retry_after_failure_becomes_done(tmp_path: Path) -> None:
    task = make_task()
    with Ledger(tmp_path) as ledger:
        ledger.record_failed(task, "boom")
        ledger.record_done(task, [tmp_path / "a.png"], {}, "x")
        (row,) = ledger.rows()
        assert row.status == "done" and row.error is None


def test_a_new_task_taking_a_path_replaces_the_old_row(tmp_path: Path) -> None:
    old, new = make_task(0, cfg=5.0), make_task(0, cfg=9.0)
    path = tmp_path / "00000.png"
    with Ledger(tmp_path) as ledger:
        ledger.record_done(old, [path], {}, "old")
        ledger.record_done(new, [path], {}, "new")
        assert ledger.done_keys() == {(new.id, new.job)}
        assert {r.id: r.status for r in ledger.rows()} == {old.id: "replaced", new.id: "done"}
        ledger.record_done(old, [tmp_path / "00000-b.png"], {}, "old again")
        assert ledger.done_keys() == {(old.id, old.job), (new.id, new.job)}


def test_done_ids_can_check_the_files(tmp_path: Path) -> None:
    task = make_task()
    path = tmp_path / "x.png"
    path.write_bytes(b"x")
    with Ledger(tmp_path) as ledger:
        ledger.record_done(task, [path], {}, None)
        assert ledger.done_keys(check_files=True) == {(task.id, task.job)}
        path.unlink()
        assert ledger.done_keys(check_files=True) == set()
        assert ledger.done_keys() == {(task.id, task.job)}


def test_read_done_keys_creates_nothing(tmp_path: Path) -> None:
    assert read_done_keys(tmp_path / "none") == set()
    assert not (tmp_path / "none").exists()
    task = make_task()
    (tmp_path / "x.png").write_bytes(b"x")
    with Ledger(tmp_path) as ledger:
        ledger.record_done(task, [tmp_path / "x.png"], {}, None)
        assert read_done_keys(tmp_path) == {(task.id, task.job)}    # while the writer is open (WAL)
    (tmp_path / "x.png").unlink()    # the disk is believed over the ledger (issue 12)
    assert read_done_keys(tmp_path) == set()


def test_jobs_in_order_of_appearance_and_threads(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        def work(job: str) -> None:
            for i in range(20):
                task = make_task(i, job=job, prompt=f"{job} {i}")  # the id ignores the job
                ledger.record_done(task, [tmp_path / f"{job}{i}.png"], {}, "")
        ledger.record_failed(make_task(0, job="zeta", prompt="first"), "x")
        threads = [threading.Thread(target=work, args=(j,)) for j in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ledger.done_keys()) == 60
        assert ledger.jobs()[0] == "zeta" and set(ledger.jobs()) == {"zeta", "a", "b", "c"}


def test_task_without_id_is_refused(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger, pytest.raises(ValueError, match="no id"):
        ledger.record_failed(dataclasses.replace(make_task(), id=""), "x")


WRITER = """
import dataclasses, sys
from pathlib import Path
from render.ledger import Ledger
from render.tasks import Task
root = Path(sys.argv[1])
ledger = Ledger(root)
i = 0
while True:
    t = Task(job="demo", index=i, prompt=f"p{i}", negative="", seed=i, model="m", width=8,
             height=8, steps=1, cfg=7.0, sampler="Euler", axes={"cfg": 7.0})
    t = dataclasses.replace(t, id=t.compute_id())
    p = root / f"{i}.png"
    p.write_bytes(b"x")
    ledger.record_done(t, [p], {"render": 0.01}, "infotext " * 40)
    print("committed", i, flush=True)
    i += 1
"""


def test_ledger_survives_kill_9_of_its_writer(tmp_path: Path) -> None:
    proc = run_py(WRITER, str(tmp_path))
    try:
        for _ in range(60):
            line = wait_line(proc, "committed")
        acknowledged = int(line.split()[1]) + 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    db = sqlite3.connect(tmp_path / "render.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Ledger(tmp_path) as ledger:
        rows = ledger.rows()
        assert len(rows) >= acknowledged
        assert {r.index for r in rows} == set(range(len(rows)))      # no holes, no half rows
        for row in rows:
            assert row.status == "done" and row.paths[0].exists()
            assert row.settings["axes"] == {"cfg": 7.0}
        ledger.record_done(make_task(999), [tmp_path / "more.png"], {}, "")  # still writable


# -- the run lock --------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from render.ledger import RunLock
lock = RunLock(Path(sys.argv[1]), command="python render.py jobs/night.yaml").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    proc = run_py(HOLDER, str(tmp_path))
    try:
        wait_line(proc, "locked")
        with pytest.raises(LockedError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "python render.py jobs/night.yaml" in message and "started 20" in message
        os.kill(proc.pid, signal.SIGKILL)        # kill -9: the kernel drops the flock
        proc.wait()
        with RunLock(tmp_path, command="second") as lock:
            info = json.loads(lock.path.read_text())
            assert info["pid"] == os.getpid() and info["command"] == "second"
        assert (tmp_path / LOCK_NAME).read_text() == ""
    finally:
        proc.kill()
        proc.wait()


CONTENDER = """
import sys, time
from pathlib import Path
from render.ledger import LockedError, RunLock
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    with RunLock(Path(sys.argv[1])):
        print("got", flush=True)
        time.sleep(3)
except LockedError as exc:
    print("refused", exc, flush=True)
"""


def test_two_processes_contend_one_wins(tmp_path: Path) -> None:
    root, go = tmp_path / "out", tmp_path / "go"
    procs = [run_py(CONTENDER, str(root), str(go)) for _ in range(2)]
    time.sleep(1.0)
    go.write_text("go")
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outputs) == ["got", "refused"]


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    (tmp_path / LOCK_NAME).write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "started": "yesterday",
        "command": "render old"}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


FORKER = """
import os, sys, time
from pathlib import Path
from render.ledger import RunLock
lock = RunLock(Path(sys.argv[1]), command="render with workers").acquire()
child = os.fork()
if child == 0:                     # a worker: inherits the locked descriptor
    time.sleep(120)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(120)
"""


def test_lock_held_by_an_orphaned_worker_of_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    proc = run_py(FORKER, str(tmp_path))
    child = 0
    try:
        child = int(wait_line(proc, "locked").split()[1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert pid_alive(child)                          # still holds the flock
        with RunLock(tmp_path, command="next night") as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
            third = run_py(HOLDER, str(tmp_path))
            _, err = third.communicate(timeout=60)
            assert "LockedError" in err and f"pid {os.getpid()}" in err
    finally:
        proc.kill()
        proc.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_live_holder_is_never_taken_over(tmp_path: Path) -> None:
    proc = run_py(HOLDER, str(tmp_path))
    try:
        wait_line(proc, "locked")
        for _ in range(3):
            with pytest.raises(LockedError):
                RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-5)
    from render.ledger import process_start_ticks

    ticks = process_start_ticks()
    if ticks is not None:                                 # Linux: a reused pid is not alive
        parent = os.getppid()
        assert pid_alive(parent)
        assert not pid_alive(parent, start_ticks=-1)
