"""--executor ray on a local Ray cluster of 2 CPUs with the tiny kit (render.executors).

In-process runs share one cluster (``ray.init(num_cpus=2, include_dashboard=False)``); the
runs that are killed or signalled are child processes that start their own. Every wait has a
timeout: ``faulthandler`` ends a hung in-process run with its traceback.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.executors.ray_workers import MAX_RESTARTS, RAY_MISSING, _Item, _Queue, _Worker
from render.ledger import Ledger
from render.tasks import Batch, Task
from render.testing.checks import done_count
from render.testing.processes import (
    descendants,
    ray_workers,
    render_process,
    render_run,
    wait_for,
)

FAULTS = Path(__file__).parent / "fixtures" / "ray_faults"
TIMEOUT = 240   # seconds for any one run


def write_job(tmp_path: Path, kit: Path, body: str, name: str = "job.yaml") -> Path:
    job = tmp_path / name
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   "output: {dir: \"out/{job}\", grid: false}\n"
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}\n"
                   + body)
    return job


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def deadline() -> Iterator[None]:
    """A hung in-process run ends the test session with every thread's traceback."""
    faulthandler.dump_traceback_later(TIMEOUT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def outputs(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*.png"))}


def check_whole_and_recorded(out: Path, job: str, n: int) -> dict[str, dict]:
    """n whole images of ``job``, each with its provenance and a done row, and no other row;
    no temp file. Returns each image's provenance by file name."""
    with Ledger(out) as ledger:
        assert len(ledger.rows(job=job)) == n
    return check_done_images(out, job, n)


def check_done_images(out: Path, job: str, n: int) -> dict[str, dict]:
    """n whole images of ``job``, each with its provenance and a done row; no temp file.
    Returns each image's provenance by file name."""
    files = sorted((out / job).glob("*.png"))
    assert len(files) == n, [p.name for p in files]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with Ledger(out) as ledger:
        rows = {row.id: row for row in ledger.rows(job=job, status="done")}
    assert len(rows) == n
    provs = {}
    for path in files:
        with Image.open(path) as im:
            im.load()
        _, prov = metadata.read_metadata(path)
        assert prov["task"]["id"] in rows
        provs[path.name] = prov
    return provs


def test_no_cluster_at_address_auto_is_one_line(tmp_path, kit):
    """First in this file: "auto" joins any Ray running on the machine, and the tests below
    start one."""
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn}\n")
    done = rerun(str(job), "--executor", "ray", "--address", "auto")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "error: --executor ray: cannot join the Ray cluster at --address auto: Could not find")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# -- same pixels, names, metadata and ledger as the local executor --------------------------

def test_ray_renders_what_local_renders_pixel_for_pixel(tmp_path, kit, cluster, deadline,
                                                        one_thread, capsys):
    body = "jobs:\n  - {name: k, prompt: a barn, seeds: 6, grid: {cfg: [6, 7]}}\n"
    for folder in ("local", "ray"):
        (tmp_path / folder).mkdir()
    local, on_ray = (write_job(tmp_path / folder, kit, body) for folder in ("local", "ray"))
    assert main([str(local), "-q", "--batch-size", "2"]) == 0
    assert main([str(on_ray), "-q", "--batch-size", "2", "--executor", "ray",
                 "--workers", "2"]) == 0
    summary = capsys.readouterr().err
    lines = re.findall(r"ray worker (\d) \(.*\): (\d+) images?, [\d.]+ s busy", summary)
    assert sorted(w for w, _ in lines) == ["0", "1"] and sum(int(n) for _, n in lines) == 12
    a, b = outputs(tmp_path / "local" / "out"), outputs(tmp_path / "ray" / "out")
    assert sorted(a) == sorted(b) and len(a) == 12
    workers = set()
    for name in a:
        # one torch thread in both: the same arithmetic, so the same bytes of pixels
        assert np.array_equal(pixels(a[name]), pixels(b[name])), name
        text_a, prov_a = metadata.read_metadata(a[name])
        text_b, prov_b = metadata.read_metadata(b[name])
        assert text_a == text_b
        executor = prov_b.pop("executor")
        assert executor["name"] == "ray" and executor["pid"] > 0 and executor["node"]
        workers.add(executor["worker"])
        assert "executor" not in prov_a
        for prov in (prov_a, prov_b):
            prov.pop("timings")
        assert prov_a == prov_b
    assert workers == {0, 1}   # both workers rendered
    with Ledger(tmp_path / "local" / "out") as la, Ledger(tmp_path / "ray" / "out") as lb:
        assert ([(r.id, r.index, r.status, r.infotext) for r in la.rows()]
                == [(r.id, r.index, r.status, r.infotext) for r in lb.rows()])
    # a re-run on Ray renders nothing and touches nothing
    before = {name: p.stat().st_mtime_ns for name, p in b.items()}
    assert main([str(on_ray), "--batch-size", "2", "--executor", "ray", "--workers", "2"]) == 0
    assert "rendered 0 images" in capsys.readouterr().out
    assert {name: p.stat().st_mtime_ns for name, p in b.items()} == before


def test_automatic_batch_sizes_on_ray_stay_within_float_noise_of_local(tmp_path, kit, cluster,
                                                                       deadline, capsys):
    """--batch-size 0: the driver cuts a grid into pieces for the workers, each worker sizes
    its batches from free memory; the pixels stay within 1/255 of the local run's."""
    body = "jobs:\n  - {name: k, prompt: a barn, seeds: 5}\n"
    for folder in ("l", "r"):
        (tmp_path / folder).mkdir()
    assert main([str(write_job(tmp_path / "l", kit, body)), "-q"]) == 0
    assert main([str(write_job(tmp_path / "r", kit, body)), "-q", "--executor", "ray",
                 "--workers", "2"]) == 0
    a, b = outputs(tmp_path / "l" / "out"), outputs(tmp_path / "r" / "out")
    assert sorted(a) == sorted(b) and len(a) == 5
    for name in a:
        assert np.abs(pixels(a[name]) - pixels(b[name])).max() <= 1, name


# -- failures --------------------------------------------------------------------------------

def run_faulty(tmp_path: Path, kit: Path, prompts: str, batch: int, seeds: int,
               capsys: pytest.CaptureFixture[str]) -> str:
    """A grid of ``prompts`` on 2 Ray workers with the fault plugin: exit 1, its stderr."""
    job = write_job(tmp_path, kit, f"jobs:\n  - name: k\n    prompt: x\n    seeds: {seeds}\n"
                                   f"    grid: {{prompt: [{prompts}]}}\n")
    code = main([str(job), "-q", "--batch-size", str(batch), "--executor", "ray",
                 "--workers", "2", "--plugins-dir", str(FAULTS)])
    assert code == 1
    return capsys.readouterr().err


def test_a_failing_task_fails_alone_on_ray(tmp_path, kit, cluster, deadline, capsys):
    err = run_faulty(tmp_path, kit, "a barn, a cursed barn, a house", 2, 2, capsys)
    assert "2 failed" in err and "ValueError: cursed prompt 'a cursed barn'" in err
    with Ledger(tmp_path / "out") as ledger:
        rows = ledger.rows(job="k")
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 2 and all("cursed prompt" in r.error for r in failed)
    provs = check_done_images(tmp_path / "out", "k", 4)
    assert sorted(p["task"]["prompt"] for p in provs.values()) == ["a barn"] * 2 + ["a house"] * 2


def test_a_task_that_kills_every_worker_it_meets_fails_alone(tmp_path, kit, cluster, deadline,
                                                             capsys):
    """A task whose render kills the process (a CUDA crash, a segfault): its batch goes to a
    second worker, then its tasks one by one, each again on two workers; the poisonous one
    fails alone with that error, Ray restarts the workers and every other task renders."""
    err = run_faulty(tmp_path, kit, "a barn, a poison barn, a house", 3, 1, capsys)
    assert "1 failed" in err
    assert re.search(r"died, on workers (0, 1|1, 0)", err), err
    # the batch, then the task alone, on each worker: each worker restarted twice
    assert len(re.findall(r"ray worker \d .*, died 2x$", err, re.M)) == 2, err
    with Ledger(tmp_path / "out") as ledger:
        (failed,) = ledger.rows(job="k", status="failed")
    assert "died" in failed.error
    provs = check_done_images(tmp_path / "out", "k", 2)
    assert sorted(p["task"]["prompt"] for p in provs.values()) == ["a barn", "a house"]


def test_kill_9_of_a_worker_mid_run_loses_nothing_and_a_rerun_renders_nothing(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, seeds: 12}\n")
    args = (str(job), "--batch-size", "1", "--executor", "ray", "--workers", "2",
            "--plugins-dir", str(FAULTS))
    proc = render_process(*args, env={"RENDER_TEST_DELAY": "0.4"})
    try:
        out = tmp_path / "out"
        wait_for(lambda: done_count(out) >= 2, proc, timeout=TIMEOUT)
        victims = ray_workers(proc.pid)
        assert len(victims) == 2, victims
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "rendered 12 images" in stdout and "0 failed" in stdout
    assert "died 1x" in stdout   # the summary tells which worker was lost
    check_whole_and_recorded(out, "k", 12)
    again = rerun(*args)
    assert again.returncode == 0, again.stderr
    assert "rendered 0 images" in again.stdout and "skipped 12 already done" in again.stdout


def test_sigterm_on_the_driver_finishes_the_batches_in_flight_and_stops(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, seeds: 16}\n")
    proc = render_process(str(job), "--batch-size", "1", "--executor", "ray", "--workers", "2",
                          "--plugins-dir", str(FAULTS), env={"RENDER_TEST_DELAY": "0.4"})
    out = tmp_path / "out"
    try:
        wait_for(lambda: done_count(out) >= 2, proc, timeout=TIMEOUT)
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "SIGTERM: finishing" in stderr and "interrupted" in stdout
    done = done_count(out)
    assert 2 <= done < 16
    check_whole_and_recorded(out, "k", done)   # what it sent out was written and recorded
    time.sleep(1)
    assert not [pid for pid in below if Path(f"/proc/{pid}").exists()
                and b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # Ray shut down
    resumed = rerun(str(job), "--batch-size", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"rendered {16 - done} images" in resumed.stdout
    check_whole_and_recorded(out, "k", 16)


def rerun(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run to its end in a child process (with a timeout)."""
    return render_run(*args, timeout=TIMEOUT)


# -- user mistakes: one line, exit 2, nothing written -----------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--workers", "2"], "--address and --workers need --executor ray"),
    (["--executor", "ray", "--workers", "0"], "--workers must be >= 1"),
])
def test_ray_options_without_ray_are_usage_errors(tmp_path, kit, args, words, capsys):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn}\n")
    with pytest.raises(SystemExit) as exc:
        main([str(job), *args])
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["--device", "cuda:1"], "--device cuda:1 with --executor ray: Ray gives each worker"),
    (["--workers", "3"], "--workers 3: the Ray cluster has 2 CPUs (one per worker)"),
    (["--device", "cuda"], "--device cuda: the Ray cluster has no GPU"),
])
def test_a_cluster_that_cannot_hold_the_workers_is_one_line(tmp_path, kit, cluster, capsys,
                                                            args, words):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn}\n")
    assert main([str(job), "--executor", "ray", *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {words}"] or words in err.splitlines()[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("address", "words"), [
    ("127.0.0.1:1", "--address 127.0.0.1:1: no Ray cluster answers there (Connection refused)"),
    ("ray://127.0.0.1:1", "--address ray://127.0.0.1:1: no Ray cluster answers there"),
    ("head-node", "--address head-node: expected auto, HOST:PORT or ray://HOST:PORT"),
])
def test_a_cluster_address_that_does_not_answer_is_one_line_not_a_hang(address, words):
    """Ray itself retries an unreachable address for minutes; a cron job must not sit there."""
    from render.errors import UserError
    from render.executors.ray_workers import _check_reachable

    with pytest.raises(UserError, match="^" + re.escape(words)):
        _check_reachable(address)


def test_without_ray_installed_the_ray_executor_is_one_line(tmp_path, kit, capsys,
                                                            monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn}\n")
    assert main([str(job), "--executor", "ray"]) == 2
    assert capsys.readouterr().err == f"error: {RAY_MISSING}\n"
    assert not (tmp_path / "out").exists()


# -- dispatch: model affinity and the retry policy (the driver's bookkeeping) ----------------

def _batch(model: str, n: int = 1) -> Batch:
    task = Task(job="k", index=n, prompt="p", negative="", seed=n, model=model, width=64,
                height=64, steps=2, cfg=7.0, sampler="Euler a", id=f"{model}{n}")
    return Batch((model,), (task,))


def test_a_worker_keeps_its_model_and_a_free_one_takes_a_model_nobody_holds():
    queue = _Queue([_batch("A", 1), _batch("A", 2), _batch("B", 3), _batch("C", 4),
                    _batch("A", 5)])
    w0, w1 = _Worker(0, None), _Worker(1, None)
    first = queue.take(w0, held=set(), others_alive=True)
    w0.model = first.batch.key[0]
    assert first.batch.key == ("A",)
    second = queue.take(w1, held={"A"}, others_alive=True)   # not A: w0 holds it
    w1.model = second.batch.key[0]
    assert second.batch.key == ("B",)
    assert [queue.take(w0, {"B"}, True).batch.first.index for _ in range(2)] == [2, 5]
    assert queue.take(w1, {"A"}, True).batch.key == ("C",)   # B is done: C, which no one holds
    assert not queue and queue.take(w0, {"C"}, True) is None


def test_when_only_held_models_are_left_a_free_worker_helps_with_the_longest():
    queue = _Queue([_batch("A", 1), _batch("B", 2), _batch("B", 3), _batch("B", 4)])
    w0 = _Worker(0, None, model="C")
    assert queue.take(w0, held={"A", "B"}, others_alive=True).batch.key == ("B",)


def test_a_batch_lost_on_a_worker_goes_to_another_one_first():
    from render.executors.ray_workers import RayExecutor

    executor = RayExecutor(SimpleNamespace(), SimpleNamespace())
    w0, w1 = _Worker(0, None, model="A"), _Worker(1, None, model="A")
    executor.workers = [w0, w1]
    queue = _Queue([])
    batch = Batch(("A",), tuple(_batch("A", i).first for i in range(2)))
    died = RuntimeError("The actor died unexpectedly")
    executor._went_down(w0, "ref-0", died)
    assert w0.deaths == 1 and w0.model is None and w0.alive and not w0.up
    assert executor._lost(w0, _Item(batch), queue, died, culprit=True) == []
    assert queue.take(w0, {"A"}, others_alive=True) is None   # not again on worker 0
    again = queue.take(w1, set(), others_alive=True)
    assert again.batch is batch and again.lost_on == (0,)
    # lost on a second worker: its tasks go one by one
    assert executor._lost(w1, again, queue, died, culprit=True) == []
    singles = [queue.take(w0, set(), others_alive=False) for _ in range(2)]
    assert [len(s.batch.tasks) for s in singles] == [1, 1] and not queue
    # a single task lost on two workers fails alone, with the error
    item = _Item(singles[0].batch, (0,))
    (failure,) = executor._lost(w1, item, queue, died, culprit=True)
    assert failure.task is singles[0].batch.first
    assert failure.message.startswith("the Ray worker rendering this task died, on workers 0, 1")
    # a batch only waiting behind the lost one goes back as it was, blameless
    waiting = _Item(_batch("A", 9))
    assert executor._lost(w0, waiting, queue, died, culprit=False) == []
    assert queue.take(w0, set(), True) is waiting


def test_a_worker_that_died_too_often_is_out():
    from render.executors.ray_workers import RayExecutor

    executor = RayExecutor(SimpleNamespace(), SimpleNamespace())
    w0 = _Worker(0, None)
    executor.workers = [w0, _Worker(1, None)]
    for _ in range(MAX_RESTARTS):
        executor._went_down(w0, None, RuntimeError("gone"))
    assert w0.alive
    executor._went_down(w0, None, RuntimeError("gone"))
    assert not w0.alive
