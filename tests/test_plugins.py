"""The plugin system: built-ins loaded like user plugins, entry points, failures, misspellings."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from render.errors import JobErrors
from render.expand import load_job_file
from render.plugins import hook_names, load_plugins
from render.run import list_plugins


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_builtins_are_the_repository_plugin_files_loaded_like_user_plugins():
    """In a checkout (editable install) they load from the top-level plugins/ folder."""
    plugins = load_plugins()
    folder = Path(__file__).resolve().parent.parent / "plugins"
    files = {"lora": "lora.py", "embeddings": "embeddings.py",
             "controlnet": "controlnet/__init__.py", "depth": "depth.py"}
    for name, file in files.items():
        assert plugins.sources[name] == str(folder / file)
    keys = {key for (_, key) in plugins.fields()}
    assert {"lora", "embeddings", "controlnet", "depth", "save_control"} <= keys
    assert not plugins.failures


def test_plugins_dir_plugin_claims_a_key(tmp_path, write_job):
    write(tmp_path / "mine", "grain.py", """
        from render import hookimpl
        from render.fields import expect_number

        @hookimpl
        def register_task_fields(register):
            register("grain", lambda v, ctx: expect_number(v, minimum=0, maximum=1))
    """)
    plugins = load_plugins([tmp_path / "mine"])
    job = write_job("version: 1\ndefaults: {model: m}\njobs:\n  - {name: a, grain: 0.5}\n"
                    "  - {name: b, grain: 3}\n")
    with pytest.raises(JobErrors) as info:
        load_job_file(job, plugins)
    assert [str(e) for e in info.value.errors] == [
        f"{job}:5:22: jobs[1].grain: expected a number in [0, 1], got 3"]


def test_a_plugin_that_fails_to_import_only_fails_jobs_using_its_key(tmp_path, write_job):
    write(tmp_path / "mine", "grain.py", "import no_such_module_here\n")
    plugins = load_plugins([tmp_path / "mine"])
    (failure,) = plugins.failures
    assert failure.name == "grain" and failure.source.endswith("grain.py")
    assert "No module named 'no_such_module_here'" in failure.error
    job = write_job("version: 1\ndefaults: {model: m}\njobs:\n  - {name: a, grain: 0.5}\n"
                    "  - {name: b, prompt: y}\n")
    jf = load_job_file(job, plugins)   # a plugin's failure is not the file's mistake
    assert [plan.job.name for plan in jf.jobs] == ["b"]
    (message,) = [str(e) for e in jf.broken["a"]]
    assert message.startswith(f"{job}:4:15: jobs[0].grain: needs plugin 'grain' (")
    assert "failed to load: ModuleNotFoundError" in message
    fine = write_job("version: 1\ndefaults: {model: m}\njobs:\n  - {name: a, prompt: x}\n",
                     "fine.yaml")
    assert load_job_file(fine, plugins).task_count == 1


def test_a_misspelled_hook_is_rejected_with_a_suggestion(tmp_path):
    write(tmp_path / "mine", "typo.py", """
        from render import hookimpl

        @hookimpl
        def postproces(result, task):
            return result
    """)
    plugins = load_plugins([tmp_path / "mine"])
    (failure,) = plugins.failures
    assert failure.name == "typo"
    assert failure.error == "unknown hook 'postproces' (did you mean 'postprocess'?)"
    assert not plugins.pm.has_plugin("typo")


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write(site, "render_shout.py", """
        from render import hookimpl

        @hookimpl
        def register_task_fields(register):
            register("shout", lambda v, ctx: str(v).upper())
    """)
    dist = site / "render_shout-1.0.dist-info"
    write(dist, "METADATA", "Metadata-Version: 2.1\nName: render-shout\nVersion: 1.0\n")
    write(dist, "entry_points.txt", "[render]\nshout = render_shout\n")
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    assert plugins.pm.has_plugin("shout")
    assert plugins.sources["shout"] == "render-shout 1.0"
    assert ("task", "shout") in plugins.fields()
    sys.modules.pop("render_shout", None)


def test_list_plugins_shows_keys_hooks_and_failures(tmp_path, capsys):
    write(tmp_path / "mine", "broken.py", "raise RuntimeError('boom')\n")

    class Args:
        plugins_dir = [str(tmp_path / "mine")]

    assert list_plugins(Args()) == 1
    out = capsys.readouterr().out
    assert "lora" in out and "keys: lora" in out and "configure_pipeline" in out
    assert "broken" in out and "FAILED" in out and "RuntimeError: boom" in out


def test_every_hook_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in hook_names():
        assert f"`{name}(" in readme, name


def test_a_file_dropped_into_the_builtin_folder_loads_with_the_builtins(tmp_path, monkeypatch):
    """plugins/ in a checkout is where users drop plugins; the package's path is that folder."""
    import render.builtin_plugins as builtin

    dropped = write(tmp_path / "extra", "grain.py", """
        from render import hookimpl

        @hookimpl
        def register_task_fields(register):
            register("grain", lambda v, ctx: v)
    """)
    monkeypatch.setattr(builtin, "__path__", [*builtin.__path__, str(dropped.parent)])
    plugins = load_plugins()
    assert plugins.sources["grain"] == str(dropped)
    assert ("task", "grain") in plugins.fields()
