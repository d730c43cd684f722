"""The ``upscale:`` key (plugins/upscale/extras.py, resize.py) on the tiny kit: the section,
exact sizes at every scale with each kind of upscaler, model pixels unlike a Lanczos resize,
tiles that match the untiled image, a real out-of-memory halving the tile, A1111's infotext,
preflight errors, grid axes, and the whole CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from render.builtin_plugins.upscale import extras, resize
from render.builtin_plugins.upscale import spandrel_models as sm

from render import expand
from render import testing as tk
from render.api import FieldContext, FieldError, FileRef, Result, Task
from render.cli import main
from render.models import ModelResolver
from render.run import resolve_tasks

CTX = FieldContext(file="job.yaml", base_dir=Path("."))
KINDS = {sm.UPSCALER.name: sm.UPSCALER, sm.FACE_RESTORER.name: sm.FACE_RESTORER}
#: A job naming the kit's upscalers; x4 is an alias (a .pth upscaler needs no allow_pickle).
HEADER = """version: 1
model_dirs: [{kit}]
models:
  x4: tiny-esrgan-x4
output: {{dir: "out/{{job}}", name: "{{index}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 2, sampler: Euler, seed: 1, prompt: a house}}
jobs:
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def renderer():
    import torch

    from render.engine import Renderer

    return Renderer("cpu", torch.float32)


def kit_ref(kit: Path, name: str) -> FileRef:
    path = kit / tk.PATHS[name]
    return FileRef("upscaler", name, str(path), sha256=f"kit:{name}")


def task(sections: dict[str, Any], files: dict[str, FileRef] | None = None) -> Task:
    return Task(job="j", index=0, prompt="a house", negative="", seed=1, model="tiny-sd15",
                width=64, height=48, steps=2, cfg=5, sampler="Euler", sections=sections,
                files=files or {})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


# -- the section -------------------------------------------------------------------------------

def test_the_section_is_normalised_with_defaults():
    assert extras.validate_upscale("4x-UltraSharp", CTX) == {
        "model": "4x-UltraSharp", "scale": 2.0, "tile": 512, "overlap": 32}
    assert extras.validate_upscale({"model": "Lanczos", "scale": 3, "tile": 0}, CTX) == {
        "model": "Lanczos", "scale": 3.0, "tile": 0, "overlap": 32}
    assert extras.validate_upscale(None, CTX) is None
    # equal sections, however written, are equal values (one task id)
    assert (extras.validate_upscale({"model": "x", "scale": 2}, CTX)
            == extras.validate_upscale({"model": "x", "scale": 2.0, "overlap": 32}, CTX))


@pytest.mark.parametrize(("value", "subkey", "words"), [
    ({"model": "x", "scael": 2}, "scael", "did you mean 'scale'"),
    ({"scale": 2}, "model", "missing"),
    ({"model": "x", "scale": 0}, "scale", "(0, 8]"),
    ({"model": "x", "scale": 9}, "scale", "8"),
    ({"model": "x", "scale": "big"}, "scale", "a number"),
    ({"model": "x", "tile": 32}, "tile", "at least 64"),
    ({"model": "x", "tile": 64, "overlap": 32}, "overlap", "less than half the tile"),
    ({"model": ""}, "model", "empty"),
    ([1, 2], "", "expected an upscaler name or a mapping"),
])
def test_bad_sections_name_the_subkey(value, subkey, words):
    with pytest.raises(FieldError) as caught:
        extras.validate_upscale(value, CTX)
    assert caught.value.subkey == subkey and words in caught.value.message


def test_grid_axes_over_model_and_scale(kit, write_job, plugins):
    path = write_job(HEADER.format(kit=kit) + """
  - name: grid
    upscale: {model: lanczos, tile: 256}
    grid: {upscale.model: [lanczos, tiny-compact-x2, x4], upscale.scale: [1.5, 4]}
""")
    tasks = resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)
    got = [(t.sections["upscale"]["model"], t.sections["upscale"]["scale"],
            t.sections["upscale"]["tile"]) for t in tasks]
    assert sorted(got) == sorted((m, s, 256) for m in ("lanczos", "tiny-compact-x2", "x4")
                                 for s in (1.5, 4.0))
    files = {t.sections["upscale"]["model"]: t.files.get("upscale:model") for t in tasks}
    assert files["lanczos"] is None
    assert files["x4"].path == str(kit / tk.PATHS["tiny-esrgan-x4"])
    assert files["tiny-compact-x2"].sha256                  # hashed: in the id and provenance
    assert len({t.id for t in tasks}) == 6


# -- sizes and pixels --------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-esrgan-x4", "tiny-compact-x2", "lanczos", "Nearest"])
@pytest.mark.parametrize("scale", [1, 1.5, 2, 3, 4])
def test_every_scale_gives_exactly_the_size_asked(kit, house, model, scale):
    ref = None if resize.is_plain(model) else kit_ref(kit, model)
    size = extras.target_size(*house.size, scale)
    out = resize.upscale_to(house, size, model, ref, renderer())
    assert out.size == size == (round(64 * scale), round(48 * scale))
    assert out.mode == "RGB"


def test_a_2x_model_runs_twice_for_4x_and_a_4x_model_once_for_2x(kit, house):
    import torch

    r = renderer()
    calls: dict[str, list[tuple[int, int]]] = {}
    modes: list[bool] = []
    for name in ("tiny-compact-x2", "tiny-esrgan-x4"):
        descriptor = sm.load(kit_ref(kit, name), r, purpose="upscaler")
        seen = calls.setdefault(name, [])

        def hook(module, args, seen=seen):
            seen.append(tuple(args[0].shape[-2:]))
            modes.append(torch.is_inference_mode_enabled())

        handle = descriptor.model.register_forward_pre_hook(hook)
        try:
            scale = 4 if name == "tiny-compact-x2" else 2
            resize.upscale_to(house, (64 * scale, 48 * scale), name, kit_ref(kit, name), r,
                              tile=0)
        finally:
            handle.remove()
    assert calls["tiny-compact-x2"] == [(48, 64), (96, 128)]
    assert calls["tiny-esrgan-x4"] == [(48, 64)]
    assert modes == [True, True, True]


@pytest.mark.parametrize("model", ["tiny-esrgan-x4", "tiny-compact-x2"])
def test_model_pixels_differ_from_a_lanczos_resize(kit, house, model):
    size = (128, 96)
    upscaled = resize.upscale_to(house, size, model, kit_ref(kit, model), renderer())
    plain = resize.upscale_to(house, size, "lanczos", None, renderer())
    assert tk.pixel_diff(pixels(upscaled), pixels(plain)) > 5


def test_rgba_and_grey_inputs_become_rgb(kit, house):
    for mode in ("RGBA", "L", "P"):
        image = house.convert(mode)
        for model, ref in (("tiny-esrgan-x4", kit_ref(kit, "tiny-esrgan-x4")),
                           ("lanczos", None)):
            out = resize.upscale_to(image, (96, 72), model, ref, renderer())
            assert (out.mode, out.size) == ("RGB", (96, 72))


# -- tiles -------------------------------------------------------------------------------------

def test_tiles_cover_the_image_evenly_with_the_overlap():
    assert resize.tile_spans(64, 64, 16) == ([0], 64)
    assert resize.tile_spans(512, 256, 32) == ([0, 160, 320], 192)
    assert resize.tile_spans(100, 64, 16) == ([0, 42], 58)
    for n, side, overlap in ((65, 64, 16), (333, 64, 16), (2000, 512, 32), (97, 64, 31)):
        starts, length = resize.tile_spans(n, side, overlap)
        assert length <= side and starts[0] == 0 and starts[-1] + length == n
        assert all(a + length - b >= overlap for a, b in zip(starts, starts[1:], strict=False))
        fewer = len(starts) - 1   # one tile less cannot cover n with that overlap
        assert fewer * side - (fewer - 1) * overlap < n


@pytest.mark.parametrize("model", ["tiny-esrgan-x4", "tiny-compact-x2"])
def test_tiled_equals_untiled_within_tolerance(kit, house, model):
    """Tiles of 32 px with 8 of overlap over a 64x48 image (6 tiles, feathered): off by at
    most 3/255 anywhere, 0.25/255 on average (measured: max 2-3, mean 0.01-0.07)."""
    r = renderer()
    ref = kit_ref(kit, model)
    descriptor = sm.load(ref, r, purpose="upscaler")
    image = house.resize((128, 96))
    seen: list[Any] = []
    handle = descriptor.model.register_forward_pre_hook(lambda m, a: seen.append(a))
    try:
        whole = pixels(resize.model_pass(image, descriptor, r, tile=0, overlap=0))
        assert len(seen) == 1
        tiled = pixels(resize.model_pass(image, descriptor, r, tile=64, overlap=16))
    finally:
        handle.remove()
    assert len(seen) == 1 + 3 * 2          # 128x96 in tiles of <= 64 sharing 16: 3 x 2
    diff = np.abs(tiled - whole)
    assert diff.max() <= 3 and diff.mean() <= 0.25, (diff.max(), diff.mean())


def _oom_above(side: int, seen: list[int]):
    """A forward pre-hook: the model's input bigger than ``side`` asks the CPU allocator for
    4 EiB, a real out-of-memory error, as a too-large tile would on a small GPU."""

    def hook(module, args):
        import torch

        seen.append(max(args[0].shape[-2:]))
        if max(args[0].shape[-2:]) > side:
            torch.empty(1 << 62, dtype=torch.uint8)

    return hook


def test_out_of_memory_halves_the_tile_and_later_images_start_there(kit, house):
    r = renderer()
    ref = kit_ref(kit, "tiny-esrgan-x4")
    descriptor = sm.load(ref, r, purpose="upscaler")
    image = house.resize((128, 96))
    expected = pixels(resize.upscale_to(image, (256, 192), "x4", ref, r, tile=0))
    seen: list[int] = []
    handle = descriptor.model.register_forward_pre_hook(_oom_above(64, seen))
    try:
        out = resize.upscale_to(image, (256, 192), "x4", ref, r, tile=256)
        assert seen[:2] == [128, 128] and set(seen[2:]) == {64}   # 256 (whole), 128, 64
        assert np.abs(pixels(out) - expected).mean() <= 0.25
        key = (ref.sha256, "cpu", "torch.float32")
        assert resize._WORKING_TILE[key] == 64
        seen.clear()
        resize.upscale_to(image, (256, 192), "x4", ref, r, tile=512)
        assert set(seen) == {64}                       # no second out-of-memory
    finally:
        handle.remove()
        resize._WORKING_TILE.clear()


def test_out_of_memory_below_the_floor_says_what_to_do(kit, house):
    r = renderer()
    ref = kit_ref(kit, "tiny-esrgan-x4")
    descriptor = sm.load(ref, r, purpose="upscaler")
    handle = descriptor.model.register_forward_pre_hook(_oom_above(8, []))
    try:
        with pytest.raises(RuntimeError) as caught:
            resize.upscale_to(house.resize((128, 96)), (256, 192), "x4", ref, r, tile=128)
    finally:
        handle.remove()
        resize._WORKING_TILE.clear()
    message = str(caught.value)
    assert "ran out of memory" in message and "64-pixel tiles" in message
    assert "tiny-esrgan-x4.pth" in message and r.is_oom(caught.value.__cause__)


# -- the stage ---------------------------------------------------------------------------------

def test_apply_upscale_scales_every_frame_and_writes_a1111s_fields(kit, house):
    ref = kit_ref(kit, "tiny-compact-x2")
    section = extras.validate_upscale({"model": "tiny-compact-x2", "scale": 1.5}, CTX)
    t = task({"upscale": section}, {"upscale:model": ref})
    frames = [house, house.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    result = extras.apply_upscale(Result(task=t, images=list(frames)), t, renderer())
    assert [im.size for im in result.images] == [(96, 72), (96, 72)]
    assert tk.pixel_diff(pixels(result.images[0]), pixels(result.images[1])) > 5
    assert extras.upscale_infotext(t) == {"Postprocess upscale by": "1.5",
                                          "Postprocess upscaler": "tiny-compact-x2"}
    plain = task({"upscale": extras.validate_upscale({"model": "lanczos", "scale": 2}, CTX)})
    assert extras.upscale_infotext(plain) == {"Postprocess upscale by": "2",
                                              "Postprocess upscaler": "Lanczos"}


def test_upscale_files_find_check_and_report_at_the_model_subkey(kit, tmp_path):
    models = ModelResolver([tmp_path, kit], kinds=KINDS)
    t = task({"upscale": extras.validate_upscale("tiny-compact-x2", CTX)})
    assert extras.upscale_files(t, models)["upscale:model"].path == str(
        kit / tk.PATHS["tiny-compact-x2"])
    assert extras.upscale_files(task({"upscale": extras.validate_upscale("lanczos", CTX)}),
                                models) == {}
    with pytest.raises(FieldError) as caught:
        extras.upscale_files(task({"upscale": extras.validate_upscale("tiny-compat-x2", CTX)}),
                             models)
    assert caught.value.subkey == "model" and "not found" in caught.value.message
    assert "did you mean 'tiny-compact-x2'" in caught.value.message
    (tmp_path / "ESRGAN").mkdir()
    lora = tmp_path / "ESRGAN" / "4x-Sharp.safetensors"
    shutil.copy(kit / tk.PATHS["tiny-lora-a"], lora)
    for deep in (False, True):
        models = ModelResolver([tmp_path, kit], kinds=KINDS)
        models.deep_checks = deep
        with pytest.raises(FieldError) as caught:
            extras.upscale_files(task({"upscale": extras.validate_upscale("4x-Sharp", CTX)}),
                                 models)
        assert caught.value.subkey == "model" and str(lora) in caught.value.message


# -- the whole program -------------------------------------------------------------------------

def test_cli_upscales_and_writes_the_infotext(kit, write_job, tmp_path):
    path = write_job(HEADER.format(kit=kit) + """
  - name: up
    upscale: {model: x4, scale: 2}
  - name: plain
    upscale: {model: lanczos, scale: 1.5}
""")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    with Image.open(tmp_path / "out" / "up" / "0.png") as im:
        assert im.size == (128, 128)
        infotext, provenance = im.info["parameters"], json.loads(im.info["render"])
    assert "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-x4" in infotext
    assert "upscale:model" in json.dumps(provenance)
    with Image.open(tmp_path / "out" / "plain" / "0.png") as im:
        assert im.size == (96, 96)
        assert "Postprocess upscaler: Lanczos" in im.info["parameters"]


def test_cli_dry_run_names_a_lora_put_in_esrgan(kit, write_job, tmp_path, capsys):
    (tmp_path / "ESRGAN").mkdir()
    lora = tmp_path / "ESRGAN" / "4x-Sharp.safetensors"
    shutil.copy(kit / tk.PATHS["tiny-lora-a"], lora)
    path = write_job(HEADER.format(kit=f"{tmp_path}, {kit}") + """
  - name: up
    upscale: 4x-Sharp
""")
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "upscale.model" in err and str(lora) in err and "a LoRA" in err
    assert "Traceback" not in err
