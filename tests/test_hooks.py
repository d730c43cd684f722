"""Every hook, exercised by a user plugin (tests/fixtures/hook_plugin/tint.py) in a real run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.ledger import Ledger

PLUGIN_DIR = Path(__file__).parent / "fixtures" / "hook_plugin"


@pytest.fixture(scope="module")
def run(tmp_path_factory, kit):
    import torch

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("hooks")
    job = work / "job.yaml"
    job.write_text(f"""
version: 1
model_dirs: [{kit}]
output: {{dir: "out/{{job}}", name: "{{index}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}}
jobs:
  - name: t
    prompt: a red barn
    grid:
      tint: [0, 0.5]
""")
    code = main([str(job), "--plugins-dir", str(PLUGIN_DIR), "--batch-size", "2", "-q"])
    module = sys.modules["render_plugin_hook_plugin_tint"]
    return code, module.CALLS, work / "out"


def test_run_succeeds(run):
    code, calls, out = run
    assert code == 0
    assert sorted(p.name for p in (out / "t").iterdir()) == ["0.png", "0.txt", "1.png", "1.txt",
                                                             "grids"]


def test_register_task_fields_claims_the_key(run):
    assert run[1]["register_task_fields"]


def test_register_model_kinds_adds_a_kind():
    from render.plugins import load_plugins

    plugins = load_plugins([PLUGIN_DIR])
    assert plugins.kinds()["tint_palette"].folders == ("palettes",)
    assert plugins.kinds_of("tint") == ["tint_palette"]


def test_the_fixture_implements_every_hook_so_this_file_exercises_each():
    """datasette's rule: every hook spec is documented (test_plugins) and exercised (here)."""
    import ast

    from render.plugins import hook_names

    tree = ast.parse((PLUGIN_DIR / "tint.py").read_text())
    implemented = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                   and any(getattr(d, "id", None) == "hookimpl" for d in node.decorator_list)}
    assert implemented == set(hook_names())


def test_expand_task_rewrites_tasks(run):
    _, calls, out = run
    assert calls["expand_task"] == [0, 1]
    _, prov = metadata.read_metadata(out / "t" / "1.png")
    assert prov["task"]["template"].endswith("[tinted]")


def test_task_files_and_group_key_split_batches(run):
    _, calls, _ = run
    assert calls["task_files"] == [0, 1]
    # tint 0 and tint 0.5 never share a pipeline call, although --batch-size is 2
    assert sorted(calls["configure_pipeline"]) == [(0,), (0.5,)]


def test_pipeline_class_and_components_see_the_family(run):
    _, calls, _ = run
    assert set(calls["pipeline_class"]) == {"sd1"}
    assert set(calls["pipeline_components"]) == {"sd1"}


def test_task_inputs_called_per_task(run):
    assert sorted(run[1]["task_inputs"]) == [0, 1]


def test_postprocess_changes_pixels(run):
    _, calls, out = run
    plain = np.asarray(Image.open(out / "t" / "0.png").convert("RGB"), dtype=float)
    tinted = np.asarray(Image.open(out / "t" / "1.png").convert("RGB"), dtype=float)
    assert sorted(calls["postprocess"]) == [0, 0.5]
    assert tinted[..., 0].mean() > plain[..., 0].mean() + 30


def test_result_metadata_reaches_the_infotext(run):
    _, _, out = run
    text, _ = metadata.read_metadata(out / "t" / "1.png")
    _, _, fields = metadata.parse_infotext(text)
    assert fields["Tint"] == "0.5"


def test_infotext_prompt_adds_the_plugins_tag(run):
    _, calls, out = run
    assert sorted(calls["infotext_prompt"]) == [0, 1]
    prompt, _, _ = metadata.parse_infotext(metadata.read_metadata(out / "t" / "1.png")[0])
    assert prompt == "a red barn <tint:0.5>"
    plain, _, _ = metadata.parse_infotext(metadata.read_metadata(out / "t" / "0.png")[0])
    assert plain == "a red barn"


def test_write_output_first_result_wins_and_side_files_are_recorded(run):
    _, calls, out = run
    assert len(calls["write_output"]) == 2
    assert (out / "t" / "1.txt").read_text().startswith("a red barn")
    with Ledger(out) as ledger:
        paths = sorted(Path(p).name for row in ledger.rows(job="t") for p in row.paths)
    assert paths == ["0.png", "0.txt", "1.png", "1.txt"]


def test_axis_label_names_the_plugins_axis_on_the_sheet(run):
    import json

    _, calls, out = run
    assert "tint" in calls["axis_label"]
    (sheet,) = (out / "t" / "grids").iterdir()
    with Image.open(sheet) as im:
        data = json.loads(im.text["render-grid"])
        parameters = im.text["parameters"]
    assert data["x"]["name"] == "Tint amount"
    assert data["x"]["values"] == ["Tint amount: 0", "Tint amount: 0.5"]
    assert "X Type: Tint amount, X Values: \"0, 0.5\"" in parameters


def test_run_finished_gets_the_counts(run):
    assert run[1]["run_finished"] == [(2, 0)]
