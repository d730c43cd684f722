"""Issue 12, the disk is the truth over the ledger: what a run finds on disk decides what it
renders, and nothing it did not provably write is deleted, overwritten or written outside
the output folder.

Every case runs the real CLI (in-process, or as a subprocess where it is killed) on the
tiny kit; faults are injected where the disk would fail (the image save, the ledger commit).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.ledger import Ledger
from render.testing.processes import render_process as cli
from render.testing.processes import wait_for

ROOT = Path(__file__).resolve().parents[2]
SLOW_WRITER = ROOT / "tests" / "fixtures" / "slow_writer"


def write_job(tmp_path: Path, kit: Path, body: str, *, out: str = "out/{job}") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   f'output: {{dir: "{out}", name: "{{index}}", grid: false}}\n'
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}\n"
                   "jobs:\n" + body)
    return job


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args, "--batch-size", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def done_rows(out: Path, job: str = "k") -> dict[int, Path]:
    with Ledger(out) as ledger:
        return {row.index: row.paths[0] for row in ledger.rows(job=job, status="done")}


def whole_and_ours(path: Path, index: int) -> bool:
    with Image.open(path) as im:
        im.load()
    _, prov = metadata.read_metadata(path)
    return prov is not None and prov["task"]["index"] == index


def dry_done(capsys: pytest.CaptureFixture[str], job: Path) -> int:
    assert main([str(job), "--dry-run", "--json"]) == 0
    return sum(json.loads(line)["done"] for line in capsys.readouterr().out.splitlines())


# -- 1: a deleted, truncated or changed output ------------------------------------------------
def test_missing_truncated_or_changed_outputs_are_rendered_again(tmp_path, kit, capsys,
                                                                  one_thread):
    """Issue 12: delete two finished images, truncate a third, edit a fourth: the next run
    renders those four again (it said "skipped 6 already done"), --dry-run agrees, and the
    truncated and the edited file are kept beside the new ones, never destroyed."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 6}\n")
    assert run(capsys, str(job))[0] == 0
    folder = tmp_path / "out" / "k"
    files = {i: folder / f"{i}.png" for i in range(6)}
    files[0].unlink()
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:200])
    edited = Image.open(files[3]).convert("RGB")
    edited.putpixel((0, 0), (255, 0, 255))
    edited.save(files[3])                                  # the user's edit
    edited_bytes, truncated_bytes = files[3].read_bytes(), files[2].read_bytes()
    untouched = files[4].stat().st_mtime_ns
    os.utime(files[5], ns=(1, 1))                          # same bytes, another mtime: still done
    assert dry_done(capsys, job) == 2

    code, stdout, stderr = run(capsys, str(job))
    assert code == 0, stderr
    assert "rendered 4 images" in stdout and "skipped 2 already done" in stdout
    assert "2 finished files missing and 2 changed on disk" in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("kept it as" in line for line in warnings)
    for i, path in files.items():
        assert whole_and_ours(path, i)
    kept = {p.read_bytes() for p in folder.glob("*.changed-*.png")}
    assert kept == {edited_bytes, truncated_bytes}
    assert files[4].stat().st_mtime_ns == untouched
    assert dry_done(capsys, job) == 6
    code, stdout, _ = run(capsys, str(job))
    assert code == 0 and "rendered 0 images" in stdout and "skipped 6 already done" in stdout


def test_a_file_render_did_not_write_is_never_overwritten(tmp_path, kit, capsys, one_thread):
    """Issue 12: a user's file under a task's final name (no ledger record, no render
    metadata of that task) fails that task with one line; it was silently replaced."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 3}\n")
    folder = tmp_path / "out" / "k"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "1.png")
    (folder / "2.png").mkdir()                                      # a folder under the name
    mine = (folder / "1.png").read_bytes()
    code, stdout, stderr = run(capsys, str(job))
    assert code == 1 and "Traceback" not in stderr
    assert "rendered 1 image" in stdout and "2 failed" in stdout
    assert "render did not write it" in stdout and "folder render did not make" in stdout
    assert (folder / "1.png").read_bytes() == mine and (folder / "2.png").is_dir()
    assert whole_and_ours(folder / "0.png", 0)


# -- 2: the stale-temp sweep ------------------------------------------------------------------
def test_the_temp_sweep_removes_only_temps_this_program_made(tmp_path, kit):
    """Issue 12: with a user's files in the output root (as with dir: ~/{job}), a temp-like
    name of another program (`notes/.draft.tmp-99999-abcdef.txt`) survives the sweep; the
    temp a killed run left is removed, and no partial file sits under a final name."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 4}\n")
    out = tmp_path / "out"
    notes = out / "notes"
    notes.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    theirs = [notes / ".draft.tmp-99999-abcdef.txt", notes / f".x.tmp-{dead.pid}-0a1b2c.png",
              out / "k" / f".0.tmp-{dead.pid}-abcdef.png"]
    for path in theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's")
    args = (str(job), "--batch-size", "1", "--plugins-dir", str(SLOW_WRITER), "-q")
    proc = cli(*args)
    ours = lambda: [p for p in (out / "k").glob(".*.tmp-*") if p not in theirs]  # noqa: E731
    wait_for(lambda: bool(ours()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = ours()
    assert left and all(p.name.startswith(".") or whole_and_ours(p, int(p.stem))
                        for p in (out / "k").iterdir())
    proc = cli(*args)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "the user's" for p in theirs)
    assert sorted(done_rows(out)) == [0, 1, 2, 3]


# -- 3: a damaged ledger, an image without its row, an unusable output folder -------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_ledger_is_set_aside_and_rebuilt_from_the_images(tmp_path, kit, capsys,
                                                                    one_thread, damage):
    """Issue 12: a truncated, overwritten or emptied render.db gave a sqlite traceback and
    blocked the folder; now it is moved aside with one line and the ledger is rebuilt from
    the images' provenance: nothing is rendered again (another job's images included)."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 3}\n"
                                   "  - {name: other, prompt: a boat, seeds: 2}\n")
    assert run(capsys, str(job))[0] == 0
    out = tmp_path / "out"
    images = sorted(out.glob("*/*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    db = out / "render.db"
    original = db.read_bytes()
    db.write_bytes({"truncated": original[:len(original) // 2], "empty": b"",
                    "garbage": os.urandom(len(original))}[damage])
    damaged = db.read_bytes()
    capsys.readouterr()
    assert main([str(job), "--dry-run"]) == 0                      # a warning, not a traceback
    assert "is damaged" in capsys.readouterr().err

    code, stdout, stderr = run(capsys, str(job), "--only", "k")
    assert code == 0, stderr
    assert "rendered 0 images" in stdout and "skipped 3 already done" in stdout
    (line,) = [x for x in stderr.splitlines() if "was damaged" in x]
    assert "5 images recovered" in line
    (aside,) = out.glob("render.db.corrupt-*")
    assert aside.read_bytes() == damaged and aside.name in line
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    assert len(done_rows(out)) == 3 and len(done_rows(out, "other")) == 2
    code, stdout, _ = run(capsys, str(job))
    assert code == 0 and "skipped 5 already done" in stdout


KILL_AFTER_RENAME = '''
import os, signal
from pathlib import Path
from render import hookimpl
from render.metadata import save_image
from render.output import atomic_write

@hookimpl
def write_output(result, path, fmt):
    written = atomic_write(Path(path), lambda tmp: save_image(result.images[0], tmp, "png",
                                                              result.provenance))
    if result.task.index == 1:
        os.kill(os.getpid(), signal.SIGKILL)   # after the rename, before the ledger commit
    return [written]
'''


def test_an_image_written_before_its_row_is_adopted_not_rendered_again(tmp_path, kit):
    """Issue 12: kill -9 between the rename and the ledger commit leaves a whole image with
    no row; the next run adopts it (the same file, untouched) instead of rendering again."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "kill_after_rename.py").write_text(KILL_AFTER_RENAME)
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 3}\n")
    proc = cli(str(job), "--batch-size", "1", "--plugins-dir", str(plugin))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    image = out / "k" / "1.png"
    assert whole_and_ours(image, 1) and sorted(done_rows(out)) == [0]
    before = image.stat()
    proc = cli(str(job), "--batch-size", "1")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "rendered 1 image" in stdout and "skipped 2 already done" in stdout
    assert "had no ledger row" in stderr
    after = image.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(done_rows(out)) == [0, 1, 2]


@pytest.mark.parametrize("problem", ["root-is-a-file", "render.db-is-a-folder",
                                     "render.lock-is-a-folder", "root-under-a-file"])
def test_an_unusable_output_folder_is_one_line_before_any_model_loads(tmp_path, kit, capsys,
                                                                       problem):
    """Issue 12: the output root being a file, or holding a folder named render.db or
    render.lock, was a traceback; now one located line, exit 2, for the run and the dry run,
    and nothing is written."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn}\n")
    out = tmp_path / "out"
    if problem == "root-is-a-file":
        out.write_text("a file")
    elif problem == "root-under-a-file":
        out.write_text("a file")
        job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn}\n", out="out/sub/{job}")
    else:
        (out / problem.split("-is-")[0]).mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for args in ([str(job)], [str(job), "--dry-run"]):
        assert main(args) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: {job}:") and "output.dir: " in line
        assert "Traceback" not in captured.err and "move it away" in line
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_an_output_folder_behind_a_dangling_link_is_refused(tmp_path, kit, capsys):
    """Issue 12 (seen while reviewing): an output folder linked to a disk that is not mounted
    (`out -> /mnt/big/renders`, the target gone) was resolved and created, so the night went
    onto the wrong disk; now one located line, exit 2, and the target is not created."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn}\n")
    target = tmp_path / "unmounted" / "renders"
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    for args in ([str(job)], [str(job), "--dry-run"]):
        assert main(args) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: {job}:") and "output.dir: " in line
        assert "not mounted" in line and str(target) in line
        assert not (tmp_path / "unmounted").exists()


def test_a_read_only_output_folder_is_one_line(tmp_path, kit):
    """Issue 12: a read-only output folder was a PermissionError traceback from the lock."""
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn}\n")
    out = tmp_path / "out"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:   # root writes through mode bits: a read-only mount is the real case
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without a way to mount a read-only folder")
    else:
        out.chmod(0o555)
    try:
        for args in ([str(job)], [str(job), "--dry-run"]):
            proc = cli(*args)
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 2, stderr
            (line,) = stderr.strip().splitlines()
            assert line.startswith(f"error: {job}:") and "cannot write to the output folder" in line
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
        out.chmod(0o755)


# -- 4: a full disk ------------------------------------------------------------------------------
def test_a_full_disk_stops_cleanly_and_the_next_run_resumes(tmp_path, kit, capsys, one_thread,
                                                            monkeypatch):
    """Issue 12: ENOSPC while an image is saved stops the run (nothing new is finished): one
    message naming the folder, the summary, exit 1, no temp file; the next run renders the
    rest. It used to fail every later task one by one."""
    from render import output

    saves = []
    real_save = output.save_image

    def save(image, path, *args, **kw):
        saves.append(path)
        if len(saves) >= 3:
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(image, path, *args, **kw)

    monkeypatch.setattr(output, "save_image", save)
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 6}\n")
    code, stdout, stderr = run(capsys, str(job))
    out = tmp_path / "out"
    assert code == 1 and "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert f"the disk holding {out} is full (No space left on device)" in line
    assert "run the same command again" in line
    assert "rendered 2 images" in stdout and "0 failed" in stdout and len(saves) == 3
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert sorted(done_rows(out)) == [0, 1]
    monkeypatch.setattr(output, "save_image", real_save)
    code, stdout, _ = run(capsys, str(job))
    assert code == 0 and "rendered 4 images" in stdout and "skipped 2 already done" in stdout


def test_a_full_disk_at_the_ledger_commit_is_reconciled(tmp_path, kit, capsys, one_thread,
                                                       monkeypatch):
    """Issue 12: "database or disk is full" from sqlite after an image is in place ended in
    a traceback, the image on disk with no row; now a clean stop, and the next run adopts
    that image instead of rendering it again."""
    calls = []
    real = Ledger.record_done

    def record_done(self, task, *args, **kw):
        calls.append(task.index)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, task, *args, **kw)

    monkeypatch.setattr(Ledger, "record_done", record_done)
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 4}\n")
    code, stdout, stderr = run(capsys, str(job))
    out = tmp_path / "out"
    assert code == 1 and "Traceback" not in stderr and "is full" in stderr
    assert "rendered 1 image" in stdout
    image = out / "k" / "1.png"
    assert whole_and_ours(image, 1) and sorted(done_rows(out)) == [0]
    stamp = image.stat().st_mtime_ns
    monkeypatch.setattr(Ledger, "record_done", real)
    code, stdout, stderr = run(capsys, str(job))
    assert code == 0 and "rendered 2 images" in stdout and "skipped 2 already done" in stdout
    assert image.stat().st_mtime_ns == stamp and sorted(done_rows(out)) == [0, 1, 2, 3]


# -- 5: a planted symlink ------------------------------------------------------------------------
def test_a_symlink_planted_in_the_output_root_cannot_lead_a_write_outside(tmp_path, kit, capsys,
                                                                          one_thread):
    """Issue 12: a symlink inside the output root was followed and the image landed outside
    it; now the task fails with one line and nothing is written there. The root itself may
    be a symlink (out -> a big disk)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    big = tmp_path / "big"
    big.mkdir()
    (tmp_path / "out").symlink_to(big)                        # the root: legitimately a link
    (big / "k").symlink_to(outside)                           # planted inside the root
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 2}\n"
                                   "  - {name: fine, prompt: a boat}\n")
    code, stdout, stderr = run(capsys, str(job))
    assert code == 1 and "Traceback" not in stderr
    assert "2 failed" in stdout and "leads outside the output folder" in stdout
    assert list(outside.iterdir()) == []
    assert whole_and_ours(big / "fine" / "0.png", 0)


# -- 6: a second signal after the images are written ---------------------------------------
SLOW_REPORT = '''
import time
from pathlib import Path
from render import hookimpl

@hookimpl
def run_finished(run):
    Path(__file__).with_name("reporting").write_text("yes")
    time.sleep(60)
'''


def test_a_second_sigterm_during_the_report_still_prints_the_summary(tmp_path, kit):
    """Issue 12: a second SIGTERM while the gallery/report was built ended with 143 and no
    summary (the handlers were already restored); now it aborts at once with the summary,
    exit 130."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "slow_report.py").write_text(SLOW_REPORT)
    job = write_job(tmp_path, kit, "  - {name: k, prompt: a barn, seeds: 20}\n")
    proc = cli(str(job), "--batch-size", "1", "--plugins-dir", str(SLOW_WRITER),
               "--plugins-dir", str(plugin))
    out = tmp_path / "out"
    wait_for(lambda: (out / "k" / "0.png").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    wait_for((plugin / "reporting").exists, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "aborted" in stderr
    assert "rendered " in stdout and "interrupted: run the same command again" in stdout
