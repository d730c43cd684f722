"""A plugin's failure is the plugin's: named in one line, contained to the jobs that need it,
and the rest of the night renders. Also: every chained hook runs in pluggy's order."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from render.cli import main
from render.expand import load_job_file
from render.plugins import load_plugins


def plugin(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


#: A plugin claiming ``grain:`` whose every hook can be made to raise by a job's value.
GRAIN = """
    from render import hookimpl

    @hookimpl
    def register_task_fields(register):
        def check(value, ctx):
            if value == "crash":
                raise ValueError("not a FieldError")
            return value
        register("grain", check)

    def wants(task, stage):
        return task.sections.get("grain") == stage

    @hookimpl
    def expand_task(task):
        if wants(task, "expand"):
            raise RuntimeError("expand broke")

    @hookimpl
    def task_files(task, models):
        if wants(task, "files"):
            raise KeyError("files broke")

    @hookimpl
    def postprocess(result, task):
        if wants(task, "post"):
            raise ZeroDivisionError("post broke")
        return result

    @hookimpl
    def run_finished(run):
        raise RuntimeError("report broke")
"""


def job_file(tmp_path: Path, kit: Path, *values: str) -> Path:
    """Job ``bad<i>`` uses ``grain: <value>``; job ``fine`` does not use the plugin."""
    lines = [f"  - {{name: bad{i}, prompt: a house, grain: {v}}}" for i, v in enumerate(values)]
    path = tmp_path / "job.yaml"
    path.write_text(
        f"version: 1\nmodel_dirs: [{kit}]\n"
        "output: {dir: \"out/{job}\", name: \"{index}\", grid: false}\n"
        "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler}\njobs:\n"
        + "\n".join(lines) + "\n  - {name: fine, prompt: a barn}\n")
    return path


def test_register_task_fields_raising_unloads_only_that_plugin(tmp_path):
    mine = plugin(tmp_path / "p", "broken", """
        from render import hookimpl

        @hookimpl
        def register_task_fields(register):
            register("half", lambda v, ctx: v)
            raise RuntimeError("boom")
    """)
    plugins = load_plugins([mine])
    (failure,) = plugins.failures
    assert failure.name == "broken"
    assert failure.error == "plugin 'broken' failed in register_task_fields: RuntimeError: boom"
    keys = {key for (_, key) in plugins.fields()}
    assert "half" not in keys and "lora" in keys
    assert not plugins.pm.has_plugin("broken")


def test_a_second_plugin_claiming_a_key_is_refused_and_the_first_keeps_it(tmp_path):
    mine = plugin(tmp_path / "p", "mylora", """
        from render import hookimpl

        @hookimpl
        def register_task_fields(register):
            register("lora", lambda v, ctx: v)
    """)
    plugins = load_plugins([mine])
    (failure,) = plugins.failures
    assert failure.name == "mylora"
    assert "key 'lora' is already claimed by plugin 'lora'" in failure.error
    assert plugins.fields()[("task", "lora")].plugin == "lora"


def test_a_plugin_calling_sys_exit_at_import_is_a_failure_not_the_end(tmp_path):
    mine = plugin(tmp_path / "p", "quitter", "import sys\nsys.exit(3)\n")
    plugins = load_plugins([mine])
    (failure,) = plugins.failures
    assert failure.name == "quitter" and failure.error == "SystemExit: 3"
    assert plugins.pm.has_plugin("lora")


def test_a_missing_plugins_dir_is_a_one_line_error(tmp_path, capsys):
    code = main(["--list-plugins", "--plugins-dir", str(tmp_path / "nope")])
    assert code == 2
    assert capsys.readouterr().err == f"error: --plugins-dir {tmp_path / 'nope'}: no such folder\n"


def test_a_validator_raising_valueerror_breaks_only_its_job(tmp_path, kit):
    plugins = load_plugins([plugin(tmp_path / "p", "grain", GRAIN)])
    jf = load_job_file(job_file(tmp_path, kit, "crash"), plugins)
    assert [plan.job.name for plan in jf.jobs] == ["fine"]
    (error,) = jf.broken["bad0"]
    assert str(error).endswith("jobs[0].grain: plugin 'grain' failed in the validator of "
                               "'grain': ValueError: not a FieldError")


@pytest.mark.parametrize(("stage", "message"), [
    ("expand", "plugin 'grain' failed in expand_task: RuntimeError: expand broke"),
    ("files", "plugin 'grain' failed in task_files: KeyError: 'files broke'"),
    ("crash", "plugin 'grain' failed in the validator of 'grain': ValueError: not a FieldError"),
])
def test_a_dry_run_names_the_plugin_and_lists_the_other_jobs(tmp_path, kit, capsys, stage,
                                                            message):
    mine = plugin(tmp_path / "p", "grain", GRAIN)
    code = main([str(job_file(tmp_path, kit, stage)), "--plugins-dir", str(mine), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 1
    line, left_out = err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'job.yaml'}:") and message in line
    assert left_out == "left out because a plugin failed: bad0 (every other job renders)"
    assert any(row.startswith("fine ") for row in out.splitlines())
    assert not (tmp_path / "out").exists()


def test_a_night_with_a_broken_plugin_renders_everything_else(tmp_path, kit, capsys,
                                                              one_thread):
    """task_files and postprocess fail their tasks; run_finished's failure is a warning."""
    mine = plugin(tmp_path / "p", "grain", GRAIN)
    job = job_file(tmp_path, kit, "files", "post", "none")
    code = main([str(job), "--plugins-dir", str(mine), "-q"])
    out, err = capsys.readouterr()
    assert code == 1
    folders = {p.name: sorted(c.name for c in p.iterdir())
               for p in (tmp_path / "out").iterdir() if p.is_dir() and p.name[0] != "."}
    assert folders == {"bad2": ["0.png"], "fine": ["0.png"]}
    assert "plugin 'grain' failed in task_files: KeyError: 'files broke'" in err
    assert "plugin 'grain' failed in postprocess: ZeroDivisionError: post broke" in out + err
    assert "warning: plugin 'grain' failed in run_finished: RuntimeError: report broke" in err
    assert "Traceback" not in out + err


def test_a_failing_axis_label_costs_only_the_label(tmp_path, kit, capsys, one_thread):
    """Issue 15: ``axis_label`` raising is a warning naming the plugin; the sheet is written
    with the key as its label."""
    import json

    from PIL import Image

    mine = plugin(tmp_path / "p", "grain", """
        from render import hookimpl

        @hookimpl
        def register_task_fields(register):
            register("grain", lambda value, ctx: value)

        @hookimpl
        def axis_label(key):
            raise RuntimeError("label broke")
    """)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"version: 1\nmodel_dirs: [{kit}]\noutput: {{dir: \"out/{{job}}\"}}\n"
        "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler}\njobs:\n"
        "  - {name: g, prompt: a barn, grid: {grain: [a, b]}}\n")
    assert main([str(path), "--plugins-dir", str(mine), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: plugin 'grain' failed in axis_label: RuntimeError: label broke" in err
    (sheet,) = (tmp_path / "out" / "g" / "grids").iterdir()
    with Image.open(sheet) as im:
        assert json.loads(im.text["render-grid"])["x"]["values"] == ["grain: a", "grain: b"]
    assert "Traceback" not in err


# -- hook order ------------------------------------------------------------------------------

ORDERED = """
    from render import hookimpl

    NAME = {name!r}

    @hookimpl({opts})
    def postprocess(result, task):
        return result + [NAME]

    @hookimpl({opts})
    def result_metadata(task, result):
        return {{NAME: "x"}}

    @hookimpl({opts})
    def expand_task(task):
        return [task + [NAME]]
"""


def test_chained_hooks_run_in_pluggys_order_tryfirst_first_trylast_last(tmp_path):
    folder = tmp_path / "p"
    for name, opts in (("a_first", "tryfirst=True"), ("b_plain", ""), ("c_last", "trylast=True"),
                       ("d_plain", "")):
        plugin(folder, name, ORDERED.format(name=name, opts=opts))
    plugins = load_plugins([folder], builtins=False)
    expected = ["a_first", "d_plain", "b_plain", "c_last"]   # last registered first
    assert plugins.chain("postprocess", "result", [], task=None) == expected
    names = [next(iter(m)) for m in plugins.hook.result_metadata(task=None, result=None)]
    assert names == expected
    from render.expand import plugin_expand

    (expanded,) = plugin_expand([], plugins)
    assert expanded == expected
