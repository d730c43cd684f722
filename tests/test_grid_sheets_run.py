"""Grid sheets as a night's run leaves them: chosen axes, a failed cell filled on resume, no
sheets when turned off, other jobs' sheets kept in the gallery (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.ledger import Ledger
from render.testing.checks import gallery_data

FLAKY = '''
from pathlib import Path

from render.api import hookimpl


@hookimpl
def task_inputs(task, pipe):
    flag = Path(__file__).parent / "fail-cfg-9"
    if flag.exists() and task.cfg == 9:
        raise RuntimeError("injected fault at cfg 9")
'''


def write_job(tmp_path: Path, kit: Path, jobs: str, output: str = "") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nmodel_dirs: [{kit}]\n"
                   f'output: {{dir: "out/{{job}}", name: "{{index}}"{output}}}\n'
                   "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler a}\n"
                   "jobs:\n" + jobs)
    return job


def chunk(path: Path) -> tuple[dict, str, np.ndarray]:
    with Image.open(path) as im:
        return (json.loads(im.text["render-grid"]), im.text["parameters"],
                np.asarray(im.convert("RGB")))


def contains(sheet: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``image`` is pasted somewhere in ``sheet``, pixel for pixel."""
    h, w = image.shape[:2]
    ys, xs = np.nonzero(np.all(sheet == image[0, 0], axis=-1))
    return any(np.array_equal(sheet[y:y + h, x:x + w], image) for y, x in zip(ys, xs, strict=True))


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "flaky.py").write_text(FLAKY)
    return folder


def test_chosen_axes_a_failed_cell_and_its_repair_on_resume(tmp_path, kit, plugin, one_thread):
    job = write_job(tmp_path, kit, "  - name: g\n    prompt: a red barn\n    seeds: [1, 2]\n"
                                   "    grid: {cfg: [5, 9]}\n"
                                   "    output: {grid: {x: seed, y: cfg}}\n")
    (plugin / "fail-cfg-9").touch()
    assert main([str(job), "--plugins-dir", str(plugin), "--batch-size", "1", "-q"]) == 1
    grids = tmp_path / "out" / "g" / "grids"
    (sheet,) = grids.iterdir()
    assert sheet.name == "g-grid.png"
    data, text, before = chunk(sheet)
    assert data["x"]["values"] == ["Seed: 1", "Seed: 2"]
    assert data["y"]["values"] == ["CFG Scale: 5", "CFG Scale: 9"]
    assert data["z"] is None
    why = "failed: plugin 'flaky' failed in task_inputs: RuntimeError: injected fault at cfg 9"
    assert data["blank"] == [[0, 1, why], [1, 1, why]]
    # A1111's grid fields after the first cell's infotext, which reads back
    prompt, _negative, params = metadata.parse_infotext(text)
    assert prompt == "a red barn" and params["Script"] == "X/Y/Z plot"
    assert params["X Type"] == "Seed" and params["X Values"] == "1, 2"
    assert params["Y Type"] == "CFG Scale" and params["Y Values"] == "5, 9"
    assert params["CFG scale"] == "5" and params["Seed"] == "1"

    (plugin / "fail-cfg-9").unlink()
    assert main([str(job), "--plugins-dir", str(plugin), "--batch-size", "1", "-q"]) == 0
    (again,) = grids.iterdir()
    data, _text, after = chunk(again)
    assert data["blank"] == []
    # the images of cfg 9 are in the sheet now, and were not before
    for seed_index in (0, 1):
        image = np.asarray(Image.open(tmp_path / "out" / "g" / f"{2 + seed_index}.png")
                           .convert("RGB"))
        assert contains(after, image) and not contains(before, image)
    first = np.asarray(Image.open(tmp_path / "out" / "g" / "0.png").convert("RGB"))
    assert contains(before, first) and contains(after, first)
    with Ledger(tmp_path / "out") as ledger:
        assert list(ledger.sheets(job="g")) == [again]


def test_output_grid_false_writes_no_sheet(tmp_path, kit, one_thread):
    job = write_job(tmp_path, kit, "  - name: g\n    prompt: a barn\n    grid: {cfg: [5, 9]}\n",
                    output=", grid: false")
    assert main([str(job), "--batch-size", "2", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "g").iterdir()) == ["0.png", "1.png"]
    assert [j["sheets"] for j in gallery_data(tmp_path / "out" / "index.html")["jobs"]] == [[]]


def test_a_run_of_one_job_keeps_the_other_jobs_sheets_in_the_gallery(tmp_path, kit,
                                                                     one_thread):
    job = write_job(tmp_path, kit,
                    "  - {name: a, prompt: a barn, grid: {cfg: [5, 9]}}\n"
                    "  - {name: b, prompt: a boat, grid: {steps: [1, 2]}}\n")
    assert main([str(job), "--only", "a", "--batch-size", "2", "-q"]) == 0
    assert main([str(job), "--only", "b", "--batch-size", "2", "-q"]) == 0
    data = gallery_data(tmp_path / "out" / "index.html")
    sheets = {j["name"]: [s["n"] for s in j["sheets"]] for j in data["jobs"]}
    assert sheets == {"a": ["a-grid.png"], "b": ["b-grid.png"]}
    assert {im["j"] for im in data["images"]} == {0, 1} and data["total_done"] == 4
