"""A run as cron meets it: resume after kill -9, the lock, failure isolation, replay."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
from PIL import Image

from render import metadata
from render.ledger import Ledger, RunLock
from render.testing.checks import done_count
from render.testing.processes import render_process as cli
from render.testing.processes import wait_for

SLOW_WRITER = Path(__file__).parent / "fixtures" / "slow_writer"


def write_job(tmp_path: Path, kit: Path, body: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   "output: {dir: \"out/{job}\", grid: false}\n"
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}\n"
                   + body)
    return job


def check_outputs(out: Path, n: int) -> None:
    """n whole images, each with its provenance, matching the ledger; no temp files."""
    files = sorted((out / "k").glob("*.png"))
    assert len(files) == n
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with Ledger(out) as ledger:
        rows = {row.id: row for row in ledger.rows(job="k")}
    assert len(rows) == n and all(row.status == "done" for row in rows.values())
    for path in files:
        with Image.open(path) as im:
            im.load()
        _, prov = metadata.read_metadata(path)
        assert prov["task"]["id"] in rows


def test_kill_9_at_several_points_then_resume(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, seeds: 8}\n")
    out = tmp_path / "out"
    args = (str(job), "--batch-size", "1", "--plugins-dir", str(SLOW_WRITER), "-q")
    # 1: killed while a temp file is half written
    proc = cli(*args)
    wait_for(lambda: any(".tmp-" in p.name for p in (out / "k").glob(".*"))
             if (out / "k").exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = done_count(out)
    assert first < 8
    assert all(p.name.startswith(".") or p.suffix == ".png" for p in (out / "k").iterdir())
    # 2: killed after a few more are done
    proc = cli(*args)
    wait_for(lambda: done_count(out) >= first + 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 3: the last run completes the job, rendering only what is missing
    proc = cli(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "0 failed" in stdout + stderr
    check_outputs(out, 8)
    again = cli(*args)
    stdout, stderr = again.communicate(timeout=300)
    assert "skipped 8 already done" in stdout + stderr


def test_sigterm_finishes_the_batch_in_flight(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, seeds: 30}\n")
    out = tmp_path / "out"
    proc = cli(str(job), "--batch-size", "1", "--plugins-dir", str(SLOW_WRITER))
    wait_for(lambda: done_count(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    n = done_count(out)
    assert 1 <= n < 30
    check_outputs(out, n)


def test_second_run_on_a_locked_root_exits_with_a_message(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn}\n")
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):
        proc = cli(str(job))
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert str(os.getpid()) in stderr and "Traceback" not in stderr
    assert not (out / "k").exists()


def test_a_failing_task_is_recorded_and_the_run_goes_on(tmp_path, kit):
    # A fault at render time (a bad input image is refused at preflight since issue 12).
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "boom.py").write_text(
        "from render.api import hookimpl\n\n"
        "@hookimpl\ndef task_inputs(task, pipe):\n"
        "    if task.job == 'bad':\n        raise RuntimeError('injected render fault')\n")
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, seeds: 2}\n"
                    "  - {name: bad, prompt: x}\n")
    proc = cli(str(job), "--batch-size", "1", "--plugins-dir", str(plugins))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    summary = stdout + stderr
    assert "2 images" in summary and "1 failed" in summary and "bad#0" in summary
    with Ledger(tmp_path / "out") as ledger:
        (row,) = ledger.rows(job="bad")
    assert row.status == "failed" and "injected render fault" in (row.error or "")
    assert len(list((tmp_path / "out" / "k").glob("*.png"))) == 2


def test_replay_reproduces_the_image(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - name: k\n    prompt: a (barn:1.3) at dusk\n"
                    "    sampler: DPM++ 2M Karras\n    lora: {tiny-lora-a: 0.7}\n")
    proc = cli(str(job))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    (original,) = (tmp_path / "out" / "k").glob("*.png")
    replay_dir = tmp_path / "replay"
    proc = cli("--replay", str(original), "--out", str(replay_dir))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.strip().endswith(": identical pixels")   # one task, rendered alone both times
    (copy,) = replay_dir.glob("*.png")
    a = np.asarray(Image.open(original).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(copy).convert("RGB"), dtype=int)
    assert np.abs(a - b).max() <= 2
    text_a, _ = metadata.read_metadata(original)
    text_b, _ = metadata.read_metadata(copy)
    assert text_a == text_b and "Lora hashes" in text_a


def test_show_prints_settings_and_rejects_foreign_images(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: k, prompt: a barn, cfg: 6.5}\n")
    assert cli(str(job)).wait(timeout=300) == 0
    (image,) = (tmp_path / "out" / "k").glob("*.png")
    proc = cli("--show", str(image))
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stdout.startswith("a barn\n") and "CFG scale: 6.5" in stdout
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    proc = cli("--show", str(plain))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert stderr.strip() == f"error: {plain}: no generation metadata found"


def test_two_jobs_asking_for_the_same_pixels_each_get_their_file(tmp_path, kit):
    job = write_job(tmp_path, kit, "jobs:\n  - {name: a, prompt: a barn, cfg: 7}\n"
                    "  - {name: b, prompt: a barn, grid: {cfg: [7, 5]}}\n")
    proc = cli(str(job), "--batch-size", "1")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    (a,) = (tmp_path / "out" / "a").glob("*.png")
    b = sorted((tmp_path / "out" / "b").glob("*.png"))
    assert len(b) == 2
    _, prov_a = metadata.read_metadata(a)
    same = [p for p in b if metadata.read_metadata(p)[1]["task"]["id"] == prov_a["task"]["id"]]
    assert len(same) == 1
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(same[0])))
    assert metadata.read_metadata(same[0])[1]["task"]["job"] == "b"
    with Ledger(tmp_path / "out") as ledger:
        assert len(ledger.done_keys()) == 3
    again = cli(str(job))
    stdout, stderr = again.communicate(timeout=300)
    assert "skipped 3 already done" in stdout + stderr


def test_progress_counts_what_is_written_when_it_is_written(tmp_path, kit, capsys, one_thread):
    """With a slow disk, job b starts rendering while a's images still wait for the writer;
    its "started" line must not count them as done before they are (it said 2/4 with 4 on
    disk a moment later)."""
    from render.cli import main

    job = write_job(tmp_path, kit, "jobs:\n  - {name: a, prompt: a barn, seeds: 2}\n"
                                   "  - {name: b, prompt: a boat, seeds: 2}\n")
    code = main([str(job), "--plugins-dir", str(SLOW_WRITER), "--batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "] " in line]
    started_b = next(line for line in lines if "[b] started" in line)
    assert "[b] started, 2/4 done" in started_b
    assert lines[-1].endswith("4/4 done, " + lines[-1].split("4/4 done, ")[1])


def test_replay_says_which_tolerance_it_met(tmp_path):
    from PIL import Image

    from render.replay import compare

    base = np.zeros((8, 8, 3), dtype=np.uint8)
    original = tmp_path / "o.png"
    Image.fromarray(base).save(original)
    near, far = base.copy(), base.copy()
    near[0, 0, 0], far[0, 0, 0] = 1, 3
    assert compare(str(original), Image.fromarray(base)) == ("identical pixels", True)
    verdict, ok = compare(str(original), Image.fromarray(near))
    assert ok and verdict.startswith("max difference 1/255, within the 1/255 tolerance")
    verdict, ok = compare(str(original), Image.fromarray(far))
    assert not ok and verdict.startswith("max difference 3/255, beyond")
    Image.fromarray(base).save(tmp_path / "o.jpg")
    assert compare(str(tmp_path / "o.jpg"), Image.fromarray(far))[1]
