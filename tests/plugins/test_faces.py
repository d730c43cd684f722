"""``restore_faces:`` (plugins/upscale/faces.py) on the kit's tiny RestoreFormer: weight 0 is
the input exactly and loads nothing, weight 1 changes it, sizes are kept, the weight blends,
A1111's ``Face restoration`` field, preflight errors, and the whole CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from render.builtin_plugins.upscale import faces
from render.builtin_plugins.upscale import spandrel_models as sm

from render import testing as tk
from render.api import FieldContext, FieldError, FileRef, Result, Task
from render.cli import main
from render.models import ModelResolver

CTX = FieldContext(file="job.yaml", base_dir=Path("."))
KINDS = {sm.UPSCALER.name: sm.UPSCALER, sm.FACE_RESTORER.name: sm.FACE_RESTORER}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def r():
    import torch

    from render.engine import Renderer

    return Renderer("cpu", torch.float32)


def face_ref(kit: Path) -> FileRef:
    path = kit / tk.PATHS["tiny-restoreformer"]
    return FileRef("face_restorer", "tiny-restoreformer", str(path), sha256="kit:face",
                   extra={"arch": "RestoreFormer"})


def task(weight: float, kit: Path) -> Task:
    section = faces.validate_restore_faces({"model": "tiny-restoreformer", "weight": weight},
                                           CTX)
    return Task(job="j", index=0, prompt="a face", negative="", seed=1, model="tiny-sd15",
                width=64, height=48, steps=2, cfg=5, sampler="Euler",
                sections={"restore_faces": section},
                files={"restore_faces:model": face_ref(kit)})


def restore(weight: float, kit: Path, images: list[Any], r: Any) -> list[Any]:
    t = task(weight, kit)
    return faces.apply_restore(Result(task=t, images=list(images)), t, r).images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


# -- the section -------------------------------------------------------------------------------

def test_the_section_is_normalised():
    assert faces.validate_restore_faces("GFPGANv1.4", CTX) == {"model": "GFPGANv1.4",
                                                               "weight": 1.0}
    assert faces.validate_restore_faces({"model": "RF", "weight": 0}, CTX) == {
        "model": "RF", "weight": 0.0}
    assert faces.validate_restore_faces(None, CTX) is None


@pytest.mark.parametrize(("value", "subkey", "words"), [
    ({"model": "x", "wieght": 0.5}, "wieght", "did you mean 'weight'"),
    ({"model": "x", "weight": 1.5}, "weight", "[0, 1]"),
    ({"weight": 0.5}, "model", "missing"),
    (True, "", "name the face restorer"),
    (3.5, "", "expected a face restorer name or a mapping"),
])
def test_bad_sections_name_the_subkey(value, subkey, words):
    with pytest.raises(FieldError) as caught:
        faces.validate_restore_faces(value, CTX)
    assert caught.value.subkey == subkey and words in caught.value.message


# -- restoring ---------------------------------------------------------------------------------

def test_weight_0_is_the_input_exactly_and_loads_nothing(kit, house, r):
    before = r.components.builds
    out = restore(0, kit, [house], r)
    assert np.array_equal(pixels(out[0]), pixels(house)) and out[0].size == house.size
    assert r.components.builds == before
    assert faces.restore_infotext(task(0, kit)) == {}


def test_weight_1_changes_the_image_keeps_its_size_and_half_blends(kit, house, r):
    square = house.resize((64, 64))
    full = restore(1, kit, [house, square], r)
    assert [im.size for im in full] == [house.size, square.size]
    assert [im.mode for im in full] == ["RGB", "RGB"]
    assert tk.pixel_diff(pixels(full[0]), pixels(house)) > 5
    assert tk.pixel_diff(pixels(full[1]), pixels(square)) > 5
    half = restore(0.5, kit, [house], r)[0]
    expected = (pixels(house) + pixels(full[0])) / 2
    assert np.abs(pixels(half) - expected).max() <= 1
    assert faces.restore_infotext(task(1, kit)) == {"Face restoration": "RestoreFormer"}
    assert faces.restore_infotext(task(0.5, kit)) == {"Face restoration": "RestoreFormer",
                                                      "RestoreFormer visibility": "0.5"}


# -- preflight ---------------------------------------------------------------------------------

def test_restore_files_find_check_and_record_the_architecture(kit):
    models = ModelResolver([kit], kinds=KINDS)
    t = task(1, kit)
    ref = faces.restore_files(t, models)["restore_faces:model"]
    assert ref.path == str(kit / tk.PATHS["tiny-restoreformer"]) and ref.sha256
    assert ref.extra["arch"] == "RestoreFormer"
    wrong = dataclasses.replace(t, sections={"restore_faces": faces.validate_restore_faces(
        "tiny-compact-x2", CTX)})
    with pytest.raises(FieldError) as caught:
        faces.restore_files(wrong, models)
    assert caught.value.subkey == "model" and "not found" in caught.value.message
    kit_face = ModelResolver([kit], {"up": str(kit / tk.PATHS["tiny-compact-x2"])},
                             kinds=KINDS)
    aliased = dataclasses.replace(t, sections={"restore_faces": faces.validate_restore_faces(
        "up", CTX)})
    with pytest.raises(FieldError) as caught:
        faces.restore_files(aliased, kit_face)
    assert caught.value.subkey == "model" and "not a face restorer" in caught.value.message


# -- the whole program -------------------------------------------------------------------------

def test_cli_restores_faces_and_writes_the_infotext(kit, write_job, tmp_path):
    path = write_job(f"""version: 1
model_dirs: [{kit}]
output: {{dir: "out/{{job}}", name: "{{index}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler, seed: 1, prompt: a face}}
jobs:
  - name: plain
  - name: restored
    restore_faces: {{model: tiny-restoreformer, weight: 0.5}}
""")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    with Image.open(out / "plain" / "0.png") as a, Image.open(out / "restored" / "0.png") as b:
        assert a.size == b.size == (64, 64)
        assert tk.pixel_diff(pixels(a.convert("RGB")), pixels(b.convert("RGB"))) > 2
        infotext, provenance = b.info["parameters"], json.loads(b.info["render"])
    assert "Seed: 1, Face restoration: RestoreFormer, Size: 64x64" in infotext   # A1111's place
    assert ", RestoreFormer visibility: 0.5" in infotext
    assert "restore_faces:model" in json.dumps(provenance)
