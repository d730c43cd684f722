"""Animation outputs (plugins/animation.py): gif, animated webp, mp4, png-frames, save_frames.

Real runs of the tiny kit through the CLI; tests/fixtures/frames_plugin turns each image into
4 frames (shifted and tinted per frame) and sets fps and loop, as AnimateDiff will.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.ledger import Ledger
from render.testing.checks import gallery_data

FIXTURE = Path(__file__).parent / "fixtures" / "frames_plugin"
FORMATS = ("gif", "webp", "mp4", "png-frames")
FRAMES = 4
FPS = 10
PROMPT = "a lighthouse at dusk"


def _job_text(kit: Path) -> str:
    jobs = []
    for fmt in FORMATS:
        loop = "false" if fmt == "webp" else "true"
        save = ", save_frames: true" if fmt == "gif" else ""
        jobs.append(f"""
  - name: {fmt}
    output: {{format: {fmt}{save}}}
    frames: {{count: {FRAMES}, fps: {FPS}, loop: {loop}}}""")
    return f"""
version: 1
model_dirs: [{kit}]
output: {{dir: "out/{{job}}", name: "{{index}}", grid: false}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a, seed: 7,
           prompt: {PROMPT}}}
jobs:{"".join(jobs)}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, kit):
    import torch

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("anim")
    job = work / "job.yaml"
    job.write_text(_job_text(kit))
    code = main([str(job), "--plugins-dir", str(FIXTURE), "-q"])
    return code, job, work / "out"


def _main_file(out: Path, fmt: str) -> Path:
    return out / fmt / ("0-0000.png" if fmt == "png-frames" else f"0.{fmt}")


def _frames(path: Path) -> tuple[list[np.ndarray], list[float], bool | None]:
    """(frames as arrays, per-frame durations in ms, loops) as a player reads them back."""
    if path.suffix == ".mp4":
        import av

        with av.open(str(path)) as container:
            decoded = list(container.decode(video=0))
        times = [float(f.time) for f in decoded]
        durations = [round((b - a) * 1000) for a, b in zip(times, times[1:], strict=False)]
        return [f.to_ndarray(format="rgb24") for f in decoded], durations, None
    if path.name.endswith("-0000.png"):
        files = sorted(path.parent.glob(path.name.replace("0000", "[0-9][0-9][0-9][0-9]")))
        return [np.asarray(Image.open(f).convert("RGB")) for f in files], [], None
    frames, durations = [], []
    with Image.open(path) as im:
        loop = im.info.get("loop")
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    if path.suffix == ".gif":
        return frames, durations, loop == 0     # no NETSCAPE block: plays once
    return frames, durations, loop == 0         # WebP: 0 forever, 1 once


def test_the_run_writes_every_format(run):
    code, _, out = run
    assert code == 0
    for fmt in FORMATS:
        assert _main_file(out, fmt).is_file(), fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_frame_count_timing_and_loop_read_back(run, fmt):
    path = _main_file(run[2], fmt)
    frames, durations, loops = _frames(path)
    assert len(frames) == FRAMES
    if durations:   # png-frames has no timing of its own: the provenance has it
        assert all(abs(d - 1000 / FPS) <= 10 for d in durations), durations
        if fmt != "mp4":
            assert sum(durations) == FRAMES * 1000 // FPS
    if loops is not None:
        assert loops is (fmt != "webp")
    _, prov = metadata.read_metadata(path)
    assert prov["animation"] == {"frames": FRAMES, "fps": FPS, "loop": fmt != "webp"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_frames_differ_from_each_other(run, fmt):
    frames, _, _ = _frames(_main_file(run[2], fmt))
    assert len(frames) == FRAMES
    for a, b in zip(frames, frames[1:], strict=False):
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_infotext_and_provenance_read_back(run, fmt, capsys):
    path = _main_file(run[2], fmt)
    text, prov = metadata.read_metadata(path)
    prompt, _, fields = metadata.parse_infotext(text)
    assert prompt == PROMPT and fields["Seed"] == "7" and fields["Steps"] == "2"
    assert prov["format"] == metadata.PROVENANCE_FORMAT
    assert prov["task"]["job"] == fmt and prov["task"]["frames"]["count"] == FRAMES
    assert prov["infotext"].startswith(PROMPT)
    assert main(["--show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert PROMPT in shown and "Seed: 7" in shown and f"render task {prov['task']['id'][:12]}"[
        :12] in shown


def test_gif_infotext_is_the_comment_a1111_reads(run):
    with Image.open(_main_file(run[2], "gif")) as im:
        comment = im.info["comment"].decode("utf-8")
    assert comment.startswith(PROMPT) and "Seed: 7" in comment and "{" not in comment


def test_mp4_carries_the_infotext_as_its_comment_tag(run):
    import av

    with av.open(str(_main_file(run[2], "mp4"))) as container:
        tags = dict(container.metadata)
        assert container.streams.video[0].codec_context.name == "h264"
    assert tags["comment"].startswith(PROMPT)


def test_save_frames_writes_each_frame_with_its_infotext(run):
    out = run[2]
    files = sorted((out / "gif").glob("0-frames-*.png"))
    assert [f.name for f in files] == [f"0-frames-{i:04}.png" for i in range(FRAMES)]
    gif_frames, _, _ = _frames(_main_file(out, "gif"))
    for i, f in enumerate(files):
        text, _ = metadata.read_metadata(f)
        assert text.startswith(PROMPT) and text.endswith(f"Frame: {i + 1}/{FRAMES}")
        assert metadata.parse_infotext(text)[2]["Frame"] == f"{i + 1}/{FRAMES}"
    # the saved frames are the animation's (GIF quantises, so roughly)
    png = np.asarray(Image.open(files[1]).convert("RGB")).astype(int)
    assert np.abs(png - gif_frames[1].astype(int)).mean() < 12
    # without save_frames no frame files
    assert not list((out / "mp4").glob("*-frames-*"))


def test_png_frames_each_carry_their_infotext(run):
    files = sorted((run[2] / "png-frames").glob("0-*.png"))
    assert len(files) == FRAMES
    for i, f in enumerate(files):
        text, prov = metadata.read_metadata(f)
        assert text.endswith(f"Frame: {i + 1}/{FRAMES}")
        assert (prov is not None) == (i == 0)   # the first frame holds the provenance
    from render import reconcile

    assert metadata.EXTRA_KEY == reconcile.EXTRA_KEY
    task = metadata.read_metadata(files[0])[1]["task"]
    key = (task["id"], task["job"])
    assert reconcile.names_task(reconcile.read_provenance(files[0]), key, main=True)
    marker = reconcile.read_provenance(files[1])
    assert reconcile.names_task(marker, key) and not reconcile.names_task(marker, key, main=True)


def test_the_ledger_records_every_file_and_a_second_run_skips(run):
    code, job, out = run
    recorded = {}
    for fmt in FORMATS:
        with Ledger(out) as ledger:
            (row,) = ledger.rows(job=fmt)
        assert row.status == "done"
        recorded[fmt] = sorted(Path(p).name for p in row.paths)
        on_disk = sorted(p.name for p in (out / fmt).iterdir() if not p.name.startswith("."))
        assert recorded[fmt] == on_disk, fmt
    assert len(recorded["gif"]) == 1 + FRAMES and len(recorded["png-frames"]) == FRAMES
    stamps = {p: p.stat().st_mtime_ns for fmt in FORMATS for p in (out / fmt).iterdir()}
    assert main([str(job), "--plugins-dir", str(FIXTURE), "-q"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("fmt", ["gif", "webp", "png-frames", "mp4"])
def test_replay_of_an_animation_writes_it_again_in_its_format(run, fmt, tmp_path, capsys):
    """The replay is the whole animation, in the original's format, with its metadata;
    png-frames (lossless) are compared frame by frame, the lossy formats are not."""
    path = _main_file(run[2], fmt)
    code = main(["--replay", str(path), "--plugins-dir", str(FIXTURE), "--out", str(tmp_path),
                 "-q"])
    captured = capsys.readouterr()
    said = captured.out
    assert code == 0, said
    assert "Traceback" not in captured.err
    if fmt == "png-frames":
        replayed = tmp_path / f"{path.stem}-replay-0000.png"
        assert "identical pixels" in said or "within" in said
    else:
        (replayed,) = tmp_path.glob(f"*-replay.{fmt}")
        assert "not compared" in said
    before, after = _frames(path)[0], _frames(replayed)[0]
    assert len(after) == len(before) > 1
    tolerance = 1 if fmt == "png-frames" else 12   # gif/webp/mp4 are lossy
    for a, b in zip(before, after, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() <= tolerance
    assert metadata.read_metadata(replayed)[0] == metadata.read_metadata(path)[0]


def test_an_mp4_is_adopted_when_the_ledger_is_lost(tmp_path, kit):
    """The disk is the truth: a whole mp4 render wrote is kept, not re-rendered or refused."""
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(kit))
    args = [str(job), "--plugins-dir", str(FIXTURE), "-q", "--only", "mp4"]
    assert main(args) == 0
    video = _main_file(tmp_path / "out", "mp4")
    stamp = video.stat().st_mtime_ns
    for leftover in (tmp_path / "out").glob("render.db*"):
        leftover.unlink()
    assert main(args) == 0
    assert video.stat().st_mtime_ns == stamp
    with Ledger(tmp_path / "out") as ledger:
        (row,) = ledger.rows(job="mp4")
    assert row.status == "done"


def test_animations_of_tasks_gone_from_the_job_are_recovered_into_a_lost_ledger(tmp_path,
                                                                               kit):
    """The disk is the truth: with the ledger damaged and the job's prompt changed, the
    rebuild records every whole GIF and MP4 it finds (and leaves a cut GIF alone)."""
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(kit))
    args = [str(job), "--plugins-dir", str(FIXTURE), "-q"]
    assert main(args) == 0
    out = tmp_path / "out"
    old = {fmt: _main_file(out, fmt) for fmt in ("gif", "mp4")}
    cut = old["gif"].with_name("cut.gif")
    cut.write_bytes(old["gif"].read_bytes()[: old["gif"].stat().st_size * 2 // 3])
    db = out / "render.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    job.write_text(_job_text(kit).replace(PROMPT, "a different prompt")
                   .replace('name: "{index}"', 'name: "{index}-b"'))
    assert main(args) == 0
    for fmt, path in old.items():
        with Ledger(out) as ledger:
            rows = ledger.rows(job=fmt)
        recorded = {p.name for row in rows for p in row.paths}
        assert len(rows) == 2 and path.name in recorded and "cut.gif" not in recorded
    assert cut.exists()        # not ours to delete either


def test_a_truncated_mp4_is_not_taken_for_whole(tmp_path, run):
    from render.reconcile import read_provenance

    whole = _main_file(run[2], "mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_provenance(whole, whole=True) is not None
    assert read_provenance(cut, whole=True) is None


def test_a_bad_format_is_one_located_line_with_a_did_you_mean(write_job, kit, capsys):
    job = write_job(f"""
        version: 1
        model_dirs: [{kit}]
        jobs:
          - name: j
            prompt: x
            model: tiny-sd15
            output:
              format: mp5
        """)
    assert main([str(job), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {job}:8:") and "output.format" in err[0]
    assert "did you mean 'mp4'?" in err[0] and "png-frames" in err[0]


def test_formats_are_registered_by_plugins():
    from render.plugins import load_plugins

    formats = load_plugins().formats()
    assert {"png", "webp", "jpg", "gif", "mp4", "png-frames"} <= set(formats)
    assert formats["gif"].plugin == "animation" and formats["gif"].extension == ".gif"
    assert formats["png"].plugin == "core_writers" and not formats["png"].animated


def test_a_plugin_format_taken_twice_unloads_the_second(tmp_path):
    from render.plugins import load_plugins

    (tmp_path / "dup.py").write_text(
        "from render.api import hookimpl\n\n"
        "@hookimpl\ndef register_output_formats(register):\n"
        "    register('gif', '.gif')\n")
    plugins = load_plugins([tmp_path])
    assert plugins.formats()["gif"].plugin == "animation"
    (failure,) = plugins.failures
    assert failure.name == "dup" and "already claimed by plugin 'animation'" in failure.error


def test_grid_sheet_and_gallery_use_the_first_frame_of_an_mp4(tmp_path, kit):
    import torch

    torch.set_num_threads(1)
    job = tmp_path / "job.yaml"
    job.write_text(f"""
version: 1
model_dirs: [{kit}]
output: {{dir: "out/{{job}}", name: "{{index}}", format: mp4}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a, seed: 7}}
jobs:
  - name: g
    prompt: a lighthouse at dusk
    frames: {{count: 3, fps: 8}}
    grid: {{cfg: [3, 7]}}
""")
    assert main([str(job), "--plugins-dir", str(FIXTURE), "-q"]) == 0
    out = tmp_path / "out"
    (sheet,) = (out / "g" / "grids").glob("g-grid*.png")
    firsts = [_frames(out / "g" / f"{i}.mp4")[0][0] for i in range(2)]
    with Image.open(sheet) as im:
        cells = np.asarray(im.convert("RGB")).astype(int)
    # each first frame appears as a cell of the sheet (found by sliding along its rows)
    for first in firsts:
        h, w, _ = first.shape
        best = min(np.abs(cells[y:y + h, x:x + w] - first).mean()
                   for y in range(0, cells.shape[0] - h + 1, 1)
                   for x in range(0, cells.shape[1] - w + 1, 4)
                   if cells[y:y + h, x:x + w].shape == first.shape)
        assert best < 3
    from render.gallery import thumbnail

    thumb = thumbnail(out / "g" / "0.mp4", out)
    assert thumb is not None and thumb.is_file()
    small = np.asarray(Image.open(thumb).convert("RGB")).astype(int)
    assert np.abs(small - firsts[0].astype(int)).mean() < 8   # 64 px: kept at its size
    (item,) = [im for im in gallery_data(out / "index.html")["images"] if im["n"] == "0.mp4"]
    assert item["k"] == "video" and item["f"] == "g/0.mp4"     # a <video> of the file


def test_gif_and_webp_thumbnails_are_their_first_frame(run):
    from render.gallery import thumbnail

    out = run[2]
    for fmt in ("gif", "webp"):
        path = _main_file(out, fmt)
        thumb = thumbnail(path, out)
        assert thumb is not None, fmt
        small = np.asarray(Image.open(thumb).convert("RGB")).astype(int)
        errors = [np.abs(small - f.astype(int)).mean() for f in _frames(path)[0]]
        assert errors.index(min(errors)) == 0 and errors[0] < 12, (fmt, errors)


def test_the_gallery_plays_gifs_and_animated_webps_in_the_page(run):
    out = run[2]
    items = {im["f"]: im["k"] for im in gallery_data(out / "index.html")["images"]}
    for fmt in ("gif", "webp"):
        # "anim": the page shows the animation itself (an <img> of the file), not a still
        assert items[f"{fmt}/0.{fmt}"] == "anim", fmt


def test_a_single_image_webp_is_left_to_the_core_still_writer(tmp_path):
    from render.builtin_plugins import animation

    from render.tasks import Result, Task

    task = Task(job="j", index=0, prompt="p", negative="", seed=1, model="m", width=8,
                height=8, steps=1, cfg=7, sampler="Euler")
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(2)]
    prov = {"infotext": "p\nSteps: 1, Sampler: Euler, Seed: 1", "task": {"id": "x"}}
    one = Result(task=task, images=frames[:1], provenance=prov)
    assert animation.write_output(result=one, path=tmp_path / "a.webp", fmt="webp") is None
    two = Result(task=task, images=frames, provenance=prov, fps=4)
    (written,) = animation.write_output(result=two, path=tmp_path / "b.webp", fmt="webp")
    with Image.open(written) as im:
        assert im.n_frames == 2
