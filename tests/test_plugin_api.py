"""The plugin boundary: built-ins use only ``render.api``; a user plugin, written only against
it as a package, adds its own kind of model file and key and gets its file found in A1111
and ComfyUI layouts, hashed, recorded in the task id, the infotext and the provenance."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render import metadata
from render.cli import main
from render.plugins import load_plugins

ROOT = Path(__file__).resolve().parent.parent
LUT_PLUGIN = Path(__file__).parent / "fixtures" / "lut_plugin"


def render_imports(path: Path) -> set[str]:
    """Every ``render...`` module a file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "render" or m.startswith("render.")}


def test_builtin_plugins_import_only_the_plugin_api():
    files = sorted((ROOT / "plugins").rglob("*.py"))
    assert files
    for path in files:
        assert render_imports(path) <= {"render.api"}, path


def test_the_plugin_api_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, render.api; assert 'torch' not in sys.modules and "
            "'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_plugin_package_loads_and_registers_its_kind_and_key():
    plugins = load_plugins([LUT_PLUGIN])
    assert not plugins.failures
    assert plugins.sources["lut"] == str(LUT_PLUGIN / "lut")
    assert ("task", "lut") in plugins.fields()
    assert plugins.kinds()["lut"].extensions == (".cube",)
    assert plugins.kinds_of("lut") == ["lut"]


def cube(path: Path, rgb: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{rgb}\n0 0 0\n")
    return path


@pytest.fixture
def lut_job(tmp_path, kit):
    a1111 = tmp_path / "a1111" / "models"
    comfy = tmp_path / "comfy" / "models"
    warm = cube(a1111 / "LUTs" / "warm.cube", "1 0.5 0")
    cube(comfy / "luts" / "film" / "cold.cube", "0 0.3 1")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"version: 1\nmodel_dirs: [{a1111}, {comfy}, {kit}]\n"
        "output: {dir: \"out/{job}\", name: \"{index}\", grid: false}\n"
        "defaults: {model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler, seed: 3}\n"
        "jobs:\n  - {name: graded, prompt: a house, grid: {lut: [warm, cold]}}\n"
        "  - {name: plain, prompt: a house}\n"
        "  - {name: missing, prompt: a house, lut: sepia}\n")
    return job, warm


def test_a_missing_file_of_a_plugin_kind_is_a_located_error(lut_job, capsys):
    job, _ = lut_job
    assert main([str(job), "--plugins-dir", str(LUT_PLUGIN), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {job}:8:43: ")
    assert "jobs[2].lut: lut 'sepia' not found" in line and "LUTs" in line and "luts" in line


def test_a_plugin_kind_is_found_hashed_and_recorded(lut_job, capsys, one_thread):
    job, warm = lut_job
    text = job.read_text().replace("  - {name: missing, prompt: a house, lut: sepia}\n", "")
    job.write_text(text)
    assert main([str(job), "--plugins-dir", str(LUT_PLUGIN), "--dry-run", "--json"]) == 0
    tasks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    graded = [t for t in tasks if t["job"] == "graded"]
    want = hashlib.sha256(warm.read_bytes()).hexdigest()
    assert graded[0]["files"]["lut"]["sha256"] == want
    assert graded[1]["files"]["lut"]["path"].endswith("luts/film/cold.cube")
    assert len({t["id"] for t in tasks}) == 3          # the LUT is part of what decides pixels

    assert main([str(job), "--plugins-dir", str(LUT_PLUGIN), "-q"]) == 0
    out = job.parent / "out"
    infotext, prov = metadata.read_metadata(out / "graded" / "0.png")
    assert f"LUT: warm [{want[:10]}]" in infotext
    assert prov["task"]["files"]["lut"]["sha256"] == want
    warm_px = np.asarray(Image.open(out / "graded" / "0.png"), dtype=float)
    plain_px = np.asarray(Image.open(out / "plain" / "0.png"), dtype=float)
    assert np.abs(warm_px - plain_px).mean() > 20      # the tint reached the pixels
