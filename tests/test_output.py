"""Output names (fields, sanitising, hostile input), atomic writes and the core writers."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from render import hookspecs, output
from render.errors import Location
from render.metadata import infotext, parse_infotext, provenance, read_metadata
from render.output import (
    allowed_fields,
    atomic_write,
    check_output_spec,
    check_template,
    job_dir,
    output_path,
    output_root,
    template_fields,
    unique_paths,
)
from render.tasks import Job, OutputSpec, Result, Task

NOW = datetime(2026, 11, 21, 3, 0, 1)


def make_task(**kw: object) -> Task:
    base: dict[str, object] = dict(
        job="demo", index=3, prompt="A cozy cabin, (winter:1.2) <lora:add_detail:0.6>",
        negative="", seed=42, model="models/majicmix_v7.safetensors", width=512, height=768,
        steps=25, cfg=7.0, sampler="DPM++ 2M", schedule="Karras",
    )
    base.update(kw)
    task = Task(**base)  # type: ignore[arg-type]
    return dataclasses.replace(task, id=task.compute_id())


def make_job(dir: str = "out/{job}", name: str = "{index:05}-{seed}", fmt: str = "png",
             base: Path = Path("/srv/jobs"), grid_axes: tuple[str, ...] = (),
             name_: str = "demo") -> Job:
    return Job(name=name_, file=str(base / "job.yaml"), base_dir=base, where=Location("j"),
               output=OutputSpec(dir=dir, name=name, format=fmt), grid_axes=grid_axes)


def path_for(task: Task, job: Job) -> Path:
    root = output_root(job.output.dir, job.base_dir)
    return output_path(task, job, root, now=NOW)


# -- roots and fields -------------------------------------------------------------------------
@pytest.mark.parametrize(("template", "expected"), [
    ("out/{job}", "/srv/jobs/out"),
    ("out/run-{date}/{job}", "/srv/jobs/out"),
    ("{job}", "/srv/jobs"),
    ("out", "/srv/jobs/out"),
    ("../renders/{job}", "/srv/renders"),
    ("/data/renders/{job}", "/data/renders"),
    ("./out//{job}", "/srv/jobs/out"),
])
def test_output_root_is_the_static_prefix(template: str, expected: str) -> None:
    assert output_root(template, Path("/srv/jobs")) == Path(expected)


def test_default_template() -> None:
    assert path_for(make_task(), make_job()) == Path("/srv/jobs/out/demo/00003-42.png")


def test_every_builtin_field() -> None:
    task = make_task(axes={"lora.add_detail": 0.5, "cfg": 7.0})
    job = make_job(dir="out/{job}/{date}", fmt="webp", name=(
        "{index}_{seed}_{id}_{prompt}_{model}_{sampler}_{steps}_{cfg}_{width}x{height}_{time}"
        "_{lora.add_detail}"))
    path = path_for(task, job)
    assert path.parent == Path("/srv/jobs/out/demo/2026-11-21")
    assert path.name == (f"3_42_{task.short_id}_a-cozy-cabin-winter-1-2_majicmix_v7_"
                         "DPM++ 2M Karras_25_7_512x768_03-00-01_0.5.webp")


def test_format_specs() -> None:
    task = make_task(cfg=7.5)
    job = make_job(name="{prompt:.12}|{cfg:.2f}|{seed:08}|{index:>4}|{{lit}}")
    assert path_for(task, job).name == "a-cozy-cabin_7.50_00000042_   3_{lit}.png"


def test_template_fields_and_checks() -> None:
    assert template_fields("{index:05}-{seed}/{lora.add_detail}{{x}}-{seed}") == [
        "index", "seed", "lora.add_detail"]
    allowed = allowed_fields(make_job(grid_axes=("lora.add_detail", "cfg")))
    check_template("{job}/{lora.add_detail}-{cfg:.1f}", allowed)
    with pytest.raises(ValueError, match=r"\{lora\.film\}"):
        check_template("{job}/{lora.film}", allowed)
    with pytest.raises(ValueError, match=r"\{bogus\}"):
        check_output_spec(OutputSpec(name="{bogus}-{seed}"), allowed)
    with pytest.raises(ValueError, match="format spec"):
        check_template("{seed:!r}", allowed)
    with pytest.raises(ValueError, match="above 255"):
        check_template("{seed:99999999}", allowed)
    with pytest.raises(ValueError, match="literal brace"):
        check_template("{seed", allowed)
    with pytest.raises(ValueError, match="leave the output root"):
        check_template("out/{job}/../..", allowed)
    with pytest.raises(ValueError, match="relative file name"):
        check_output_spec(OutputSpec(name="/etc/{seed}"), allowed)


def test_unknown_field_at_render_time_names_it() -> None:
    with pytest.raises(ValueError, match=r"\{controlnet\.0\.scale\}"):
        path_for(make_task(), make_job(name="{controlnet.0.scale}"))


def test_spec_that_does_not_fit_the_value() -> None:
    with pytest.raises(ValueError, match=r"\{prompt:d\}"):
        path_for(make_task(), make_job(name="{prompt:d}"))


def test_job_dir_stops_at_the_first_per_task_field() -> None:
    root = Path("/r")
    assert job_dir(make_job(dir="out/{job}"), root) == Path("/r/demo")
    assert job_dir(make_job(dir="out/{job}/{seed}"), root) == Path("/r/demo")
    assert job_dir(make_job(dir="out/{model}/{job}"), root) == Path("/r")
    assert job_dir(make_job(dir="out"), root) == Path("/r")


# -- hostile input ------------------------------------------------------------------------------
HOSTILE = [
    "../../../etc/passwd", "/etc/passwd", "..", ".", "...", "", " ", "CON", "nul.txt",
    "a\x00b\x1b[31m", "\u202eevil\u202cgnp.exe", "C:\\Windows\\x", "x" * 1000, "雪" * 300,
    ".hidden", "name.", "a/../../b", "~/.ssh/id_rsa", "${HOME}", "*?<>|:\"",
]


def _assert_safe(path: Path, root: Path) -> None:
    rel = path.relative_to(root)
    for part in rel.parts:
        assert part not in ("", ".", "..")
        assert not part.startswith(".")
        assert "/" not in part and "\\" not in part and "\x00" not in part
        assert len(part.encode()) <= 255
    assert os.path.commonpath([root, os.path.normpath(path)]) == str(root)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_inside_the_root(value: str) -> None:
    task = make_task(prompt=value, model=value, sampler=value, axes={"style": value})
    job = make_job(dir="out/{job}/{model}/{style}", name="{style}{prompt}-{sampler}",
                   grid_axes=("style",))
    root = Path("/srv/jobs/out")
    path = path_for(task, job)
    _assert_safe(path, root)
    assert path.suffix == ".png"


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=300), job=st.text(max_size=40),
       spec=st.sampled_from(["", ":.40", ":>20", ":_<300"]))
def test_any_value_stays_inside_the_root(value: str, job: str, spec: str) -> None:
    task = make_task(prompt=value, job=job, axes={"x": value})
    tmpl = make_job(dir="o/{job}/{x}", name="{x" + spec + "}/{prompt" + spec + "}-{job}",
                    grid_axes=("x",))
    try:
        path = path_for(task, tmpl)
    except ValueError as exc:  # only a spec that a width limit refuses
        assert "above 255" in str(exc)
        return
    _assert_safe(path, Path("/srv/jobs/o"))


def test_windows_reserved_and_trailing_dots() -> None:
    job = make_job(name="{prompt}", dir="out")
    assert path_for(make_task(prompt="con"), job).name == "_con.png"
    job = make_job(name="{x}", dir="out", grid_axes=("x",))
    assert path_for(make_task(axes={"x": "name. "}), job).name == "name.png"


# -- unique names -------------------------------------------------------------------------------
def test_collisions_get_the_short_id_deterministically() -> None:
    job = make_job(name="{seed}")
    root = Path("/srv/jobs/out")
    tasks = [make_task(index=i, seed=1 if i < 3 else i, cfg=5.0 + i) for i in range(5)]
    paths = unique_paths([(t, job, root) for t in tasks], now=NOW)
    assert len({str(p).casefold() for p in paths}) == 5
    for task, path in zip(tasks[:3], paths[:3], strict=True):
        assert path.name == f"1-{task.short_id}.png"
    assert [p.name for p in paths[3:]] == ["3.png", "4.png"]
    shuffled = list(zip(tasks, paths, strict=True))
    random.Random(1).shuffle(shuffled)
    again = unique_paths([(t, job, root) for t, _ in shuffled], now=NOW)
    assert again == [p for _, p in shuffled]


def test_case_insensitive_and_same_id_collisions() -> None:
    root = Path("/r")
    job_a = make_job(name="{prompt}", dir="out", name_="a")
    job_b = make_job(name="{prompt}", dir="out", name_="b")
    t1 = make_task(job="a", index=0, prompt="cabin")
    t2 = make_task(job="b", index=0, prompt="cabin")   # same settings: same id
    t3 = make_task(job="a", index=1, prompt="CABIN")   # another id, same name but the case
    paths = unique_paths([(t1, job_a, root), (t2, job_b, root), (t3, job_a, root)], now=NOW)
    assert len(set(paths)) == 3
    assert paths[0].name == f"cabin-{t1.short_id}-a-0.png"
    assert paths[1].name == f"cabin-{t1.short_id}-b-0.png"
    assert paths[2].name == f"cabin-{t3.short_id}.png"


# -- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.txt"
    atomic_write(target, lambda tmp: tmp.write_text("hello"))
    assert target.read_text() == "hello"
    assert os.listdir(target.parent) == ["x.txt"]


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.png"

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda tmp: (tmp.write_bytes(b"new"), _raise(KeyboardInterrupt)))
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


def _raise(exc: type[BaseException]) -> None:
    raise exc


def test_temp_names_are_hidden_and_keep_the_extension(tmp_path: Path) -> None:
    seen: list[Path] = []
    atomic_write(tmp_path / "a.webp", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    assert seen[0].name.startswith(".a.tmp-") and seen[0].suffix == ".webp"
    assert output.TEMP_RE.match(seen[0].name)


def test_remove_stale_temps(tmp_path: Path) -> None:
    """Only temps registered by a dead process of ours go (issue 12: never a file that only
    looks like one)."""
    from render.ledger import Ledger

    stale = tmp_path / "job" / ".00001-1.tmp-1-abcdef.png"
    live = tmp_path / f".00002-1.tmp-{os.getpid()}-abcdef.png"
    lookalike = tmp_path / "notes" / ".draft.tmp-99999-abcdef.txt"
    for path in (stale, live, lookalike):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "keep.png").write_bytes(b"x")
    code = ("import sys; from render.ledger import Ledger; "
            "Ledger(sys.argv[1]).register_temp(sys.argv[2])")   # a process that then died
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(stale)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    with Ledger(tmp_path) as ledger:
        ledger.register_temp(live)
        assert output.remove_stale_temps(tmp_path, ledger) == 1
        assert [p.name for p, _, _ in ledger.temps()] == [live.name]
    assert not stale.exists() and live.exists() and (tmp_path / "keep.png").exists()
    assert lookalike.exists()


# -- the core writers as a plugin ---------------------------------------------------------------
def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("render")
    pm.add_hookspecs(hookspecs)
    pm.register(output.core_writers, "core-writers")
    pm.check_pending()
    return pm


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_core_writer_hook_writes_image_and_metadata(tmp_path: Path, fmt: str) -> None:
    task = make_task(prompt='a "cabin",\nsnow')
    job = make_job(fmt=fmt, base=tmp_path)
    text = infotext(task, model_name="majicmix_v7", model_hash="0123456789", version="render 0.1.0")
    result = Result(task=task, images=[Image.new("RGB", (16, 16), (10, 200, 10))])
    result.provenance = provenance(task, versions={}, device="cpu", timings={}, infotext=text)
    path = output_path(task, job, output_root(job.output.dir, tmp_path), now=NOW)
    written = _plugin_manager().hook.write_output(result=result, path=path, fmt=fmt)
    assert written == [path] and path.exists()
    got_text, got_prov = read_metadata(path)
    assert got_text == text and got_prov is not None
    assert parse_infotext(got_text)[0] == task.prompt
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_core_writer_declines_other_formats_and_needs_metadata(tmp_path: Path) -> None:
    task = make_task()
    result = Result(task=task, images=[Image.new("RGB", (8, 8))])
    pm = _plugin_manager()
    assert pm.hook.write_output(result=result, path=tmp_path / "x.mp4", fmt="mp4") is None
    with pytest.raises(ValueError, match="infotext"):
        pm.hook.write_output(result=result, path=tmp_path / "x.png", fmt="png")
    assert list(tmp_path.iterdir()) == []


def test_output_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import render.metadata, render.output, render.ledger, render.grids, render.gallery\n"
        "import render.progress\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
