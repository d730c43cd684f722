"""The hires fix (``hires:``): A1111's sizes and fields, a real second pass on the tiny kit,
the first pass shared by tasks that differ only after it, replay, preflight errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from render.builtin_plugins.upscale import hires

from render import metadata
from render.api import FieldContext, FieldError
from render.cli import main
from render.runner import share_first_passes
from render.tasks import Batch, Task
from render.testing.checks import one_located_error

CTX = FieldContext(base_dir=Path("."), file="job.yaml")


def validate(**section: Any) -> dict[str, Any]:
    return hires.validate_hires(section, CTX)


# -- the section ------------------------------------------------------------------------------

def test_defaults_are_a1111s():
    spec = validate()
    assert spec == {"scale": 2, "resize": None, "upscaler": "Latent", "steps": 0,
                    "strength": 0.7, "sampler": None, "schedule": None, "prompt": None,
                    "negative": None, "cfg": None, "checkpoint": None}
    spec = validate(resize="1024x0", upscaler="latent (NEAREST)", sampler="DPM++ 2M Karras")
    assert spec["scale"] is None and spec["resize"] == [1024, 0]
    assert spec["upscaler"] == "Latent (nearest)"
    assert (spec["sampler"], spec["schedule"]) == ("DPM++ 2M", "Karras")
    assert hires.validate_hires(spec, CTX) == spec   # normalised stays normalised (replay)
    assert validate(sampler="Euler", schedule="karras")["schedule"] == "Karras"
    assert validate(upscaler="lanczos")["upscaler"] == "Lanczos"
    assert validate(resize={"width": 0, "height": 96})["resize"] == [0, 96]


@pytest.mark.parametrize(("section", "key", "words"), [
    ({"scale": 2, "resize": "128x128"}, "resize", "scale or resize, not both"),
    ({"stength": 0.5}, "stength", "did you mean 'strength'"),
    ({"strength": 1.5}, "strength", "in [0, 1]"),
    ({"resize": "0x0"}, "resize", "not both 0"),
    ({"resize": "wide"}, "resize", "WxH"),
    ({"scale": 0.5}, "scale", "in [1, 8]"),
    ({"prompt": "a <lora:tiny-lora-a:1> cat"}, "prompt", "task's networks"),
    ({"sampler": "Eulerr"}, "sampler", "Euler"),
    ({"sampler": "DPM++ 2M Karras", "schedule": "Exponential"}, "schedule", "Karras"),
])
def test_bad_sections_name_the_key(section, key, words):
    with pytest.raises(FieldError) as caught:
        hires.validate_hires(section, CTX)
    errors = getattr(caught.value, "errors", [caught.value])
    assert any(e.subkey == key and words in e.message for e in errors), errors


@pytest.mark.parametrize(("size", "section", "up", "final"), [
    ((64, 64), {"scale": 2}, (128, 128), (128, 128)),
    ((64, 64), {"scale": 1.5}, (96, 96), (96, 96)),
    ((512, 768), {"scale": 1.3}, (664, 998 // 8 * 8), (664, 992)),
    ((64, 48), {"resize": [128, 0]}, (128, 96), (128, 96)),
    ((64, 48), {"resize": [0, 96]}, (128, 96), (128, 96)),
    # both sides: cover, keeping the aspect, then crop (A1111's truncate)
    ((64, 64), {"resize": [128, 96]}, (128, 128), (128, 96)),
    ((64, 48), {"resize": [96, 96]}, (128, 96), (96, 96)),
])
def test_target_sizes_follow_a1111(size, section, up, final):
    spec = {"scale": None, "resize": None, **section}
    assert hires.target_sizes(*size, spec) == (up, final)


def test_crop_is_centred_in_latent_units():
    assert hires.crop_box((128, 128), (128, 96)) == (0, 16, 128, 112)
    assert hires.crop_box((128, 96), (96, 96)) == (16, 0, 112, 96)
    # an odd number of latent units: the extra one comes off the right (A1111's truncate)
    assert hires.crop_box((120, 64), (96, 64)) == (8, 0, 104, 64)


def test_infotext_fields_only_when_they_differ():
    task = Task(job="j", index=0, prompt="a house", negative="", seed=1, model="m", width=64,
                height=64, steps=4, cfg=7, sampler="Euler")
    same = dataclasses.replace(task, sections={"hires": validate(sampler="Euler", cfg=7,
                                                                 prompt="a house")})
    assert hires.hires_infotext(same) == {"Denoising strength": "0.7", "Hires upscale": "2",
                                          "Hires upscaler": "Latent"}
    other = dataclasses.replace(task, sections={"hires": validate(
        resize="128x96", steps=3, strength=0.35, upscaler="Lanczos", sampler="DPM++ 2M",
        prompt="a big house", negative="blur", cfg=5)})
    assert hires.hires_infotext(other) == {
        "Denoising strength": "0.35", "Hires resize": "128x96", "Hires steps": "3",
        "Hires upscaler": "Lanczos", "Hires sampler": "DPM++ 2M", "Hires prompt": "a big house",
        "Hires negative prompt": "blur", "Hires CFG Scale": "5"}


# -- sharing the first pass ---------------------------------------------------------------

def test_tasks_differing_only_in_post_sections_share_a_first_pass():
    base = Task(job="j", index=0, prompt="a", negative="", seed=1, model="m", width=64,
                height=64, steps=4, cfg=7, sampler="Euler")

    def make(index: int, **sections: Any) -> Task:
        task = dataclasses.replace(base, index=index, sections=sections)
        return dataclasses.replace(task, id=task.compute_id())

    a = make(0, hires={"strength": 0.3})
    b = make(1, hires={"strength": 0.6})
    c = make(2, hires={"strength": 0.3}, lora={"x": 1})   # a different first pass
    d = make(3)                                             # no hires: the same first pass
    firsts, shared = share_first_passes([a, b, c, d], frozenset({"hires", "upscale"}))
    assert firsts == [a, c]
    assert shared == {a.id: [b, d]}
    assert share_first_passes([a, b], frozenset()) == ([a, b], {})


# -- rendering --------------------------------------------------------------------------------

def png(out: Path, job: str) -> list[Path]:
    return sorted((out / job).glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def settings(path: Path) -> dict[str, str]:
    text, _ = metadata.read_metadata(path)
    assert text is not None
    return metadata.parse_infotext(text)[2]


def test_latent_hires_renders_at_the_target_size_with_a1111_fields(tmp_path, job, one_thread):
    path = job("  - name: h\n"
               "    hires: {scale: 2, steps: 2, strength: 0.6}\n"
               "  - name: plain\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    (image,) = png(out, "h")
    (plain,) = png(out, "plain")
    with Image.open(image) as im:
        assert im.size == (128, 128)
    with Image.open(plain) as im:
        assert im.size == (64, 64)
    fields = settings(image)
    assert fields["Size"] == "64x64"                    # the first pass's, as A1111 writes
    assert fields["Hires upscale"] == "2" and fields["Hires upscaler"] == "Latent"
    assert fields["Hires steps"] == "2" and fields["Denoising strength"] == "0.6"
    assert "Hires sampler" not in fields and "Hires prompt" not in fields
    # the second pass made new pixels: not the first pass merely resized
    first = np.asarray(Image.open(plain).convert("RGB").resize((128, 128), Image.LANCZOS),
                       dtype=np.int16)
    assert np.abs(pixels(image) - first).mean() > 3


def test_hires_fields_read_back_by_sd_prompt_reader(tmp_path, job, one_thread):
    from sd_prompt_reader.image_data_reader import ImageDataReader

    path = job("  - name: h\n"
               "    negative: blurry\n"
               "    hires: {resize: 96x80, upscaler: Lanczos, steps: 2, strength: 0.5,\n"
               "            sampler: DPM++ 2M, prompt: a tall house, cfg: 4}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    (image,) = png(tmp_path / "out", "h")
    with Image.open(image) as im:
        assert im.size == (96, 80)
    reader = ImageDataReader(str(image))
    assert reader.positive == "a house" and reader.negative == "blurry"
    assert reader.parameter["size"] == "64x64" and reader.parameter["steps"] == "3"
    # the reader's own "key: value" split of the settings line (what its CLI line uses)
    read = dict(p.split(": ", 1) for p in reader.setting.split(", ") if ": " in p)
    assert read["Hires resize"] == "96x80" and read["Hires upscaler"] == "Lanczos"
    assert read["Hires steps"] == "2" and read["Denoising strength"] == "0.5"
    assert read["Hires sampler"] == "DPM++ 2M" and read["Hires prompt"] == "a tall house"
    assert read["Hires CFG Scale"] == "4"


def test_a_grid_over_hires_settings_renders_one_first_pass_and_same_pixels(
        tmp_path, job, one_thread):
    """Cells that differ only in hires share a first pass, and each cell has the pixels it has
    when rendered alone; the sheet labels the axes."""
    path = job("  - name: g\n"
               "    hires: {scale: 1.5, steps: 4}\n"
               "    grid: {hires.strength: [0.3, 0.7], hires.upscaler: [Latent, Nearest]}\n"
               "  - name: alone\n"
               "    hires: {scale: 1.5, steps: 4, strength: 0.7, upscaler: Nearest}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    cells = png(out, "g")
    assert len(cells) == 4
    by_axes = {}
    for cell in cells:
        _, prov = metadata.read_metadata(cell)
        axes = prov["task"]["axes"]
        by_axes[(axes["hires.strength"], axes["hires.upscaler"])] = cell
        with Image.open(cell) as im:
            assert im.size == (96, 96)
    assert len({pixels(c).tobytes() for c in cells}) == 4   # every setting shows
    (alone,) = png(out, "alone")
    assert np.abs(pixels(by_axes[(0.7, "Nearest")]) - pixels(alone)).max() <= 2
    (sheet,) = (out / "g" / "grids").glob("*.png")
    with Image.open(sheet) as im:
        assert im.width > 2 * 96 and im.height > 2 * 96


def test_the_first_pass_is_rendered_once_for_a_grid_over_hires(kit, plugins, engine, job):
    """Through the runner's own planning: four cells, one pipeline call for the first pass."""
    from render.run import load_all, resolve_tasks, selected_plans

    path = job("  - name: g\n"
               "    grid: {hires.strength: [0.3, 0.5, 0.7, 0.9]}\n"
               "    hires: {scale: 1.5, steps: 4}\n")
    tasks = resolve_tasks(selected_plans(load_all([str(path)], plugins), []), plugins)
    firsts, shared = share_first_passes(tasks, plugins.post_keys())
    assert len(tasks) == 4 and len(firsts) == 1 and len(shared[firsts[0].id]) == 3


def test_replay_of_a_hires_image_reproduces_it(tmp_path, job, one_thread):
    path = job("  - name: h\n"
               "    sampler: DPM++ 2M\n"
               "    hires: {scale: 1.5, steps: 2, strength: 0.5, upscaler: Latent (bicubic)}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    (image,) = png(tmp_path / "out", "h")
    replay = tmp_path / "replay"
    assert main(["--replay", str(image), "--out", str(replay), "--device", "cpu"]) == 0
    (copy,) = replay.glob("*.png")
    assert np.abs(pixels(image) - pixels(copy)).max() <= 1
    assert metadata.read_metadata(image)[0] == metadata.read_metadata(copy)[0]


def test_second_checkpoint_loads_beside_the_first_and_nothing_reloads(
        kit, plugins, engine, write_job):
    from render.run import load_all, resolve_tasks, selected_plans

    path = write_job(f"""\
        version: 1
        model_dirs: [{kit}]
        models: {{single: {{source: tiny-sd15-single, config: tiny-sd15}}}}
        defaults: {{model: tiny-sd15, size: 64x64, steps: 3, sampler: Euler, prompt: a house}}
        jobs:
          - name: h
            seeds: 2
            hires: {{scale: 1.5, steps: 2, checkpoint: single}}
        """)
    tasks = resolve_tasks(selected_plans(load_all([str(path)], plugins), []), plugins)
    assert tasks[0].files["hires:checkpoint"].name == "single"
    loads_before = dict(engine.loads)
    for task in tasks:
        (result,) = engine.render(Batch(("h",), (task,)))
        result = plugins.chain("postprocess", "result", result, task=task,
                               renderer=engine.renderer)
        assert result.images[0].size == (96, 96)
    loaded = {p: n - loads_before.get(p, 0) for p, n in engine.loads.items()}
    assert sorted(n for n in loaded.values() if n) == [1, 1]   # each model loaded once
    fields = hires.hires_infotext(tasks[0])
    ref = tasks[0].files["hires:checkpoint"]
    assert fields["Hires checkpoint"] == f"single [{ref.short_hash}]"


def test_lora_acts_in_the_second_pass(tmp_path, job, one_thread):
    """A LoRA weight change shows in a hires image even at strength 1 (a pass that ignores
    the first pass's pixels entirely): the second pass carries the task's networks."""
    path = job("  - name: h\n"
               "    hires: {scale: 1.5, steps: 2, strength: 1.0}\n"
               "    grid: {lora.tiny-lora-a: [0, 1.5]}\n"
               "    lora: {tiny-lora-a: 0}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    a, b = png(tmp_path / "out", "h")
    assert np.abs(pixels(a) - pixels(b)).mean() > 1


# -- preflight --------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "key", "words"), [
    ("hires: {upscaler: no-such-upscaler}", "hires.upscaler", "no-such-upscaler"),
    ("hires: {checkpoint: no-such-model}", "hires.checkpoint", "no-such-model"),
    ("hires: {scale: 2, stength: 0.5}", "hires.stength", "did you mean 'strength'"),
    ("hires: {scale: 2}\n    image: refs/house.png", "hires", "txt2img"),
    ("hires: {steps: 2, strength: 0.2}", "hires.strength", "no step"),
    # the plugin's other sections, each at its own key (not at the model, nor at upscale:)
    ("restore_faces: no-such-face", "restore_faces.model", "no-such-face"),
    ("upscale: {model: no-such-x4, scale: 2}", "upscale.model", "no-such-x4"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_mistakes_are_one_located_line_before_rendering(tmp_path, job, capsys, entry, key,
                                                       words, dry):
    from render.testing import write_reference_images

    write_reference_images(tmp_path / "refs")
    path = job(f"  - name: h\n    {entry}\n")
    args = [str(path), "-q", "--device", "cpu", *(["--dry-run"] if dry else [])]
    one_located_error(args, path, key, words, capsys)


def test_dry_run_lists_hires_tasks_without_torch(tmp_path, job):
    import subprocess
    import sys

    path = job("  - name: h\n    hires: {scale: 2, upscaler: Latent}\n")
    code = (f"import sys, runpy; sys.argv = ['render.py', {str(path)!r}, '--dry-run', '--json'];\n"
            "try:\n    runpy.run_path('render.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert line["hires"]["scale"] == 2


@pytest.mark.parametrize("upscaler", ["Latent (nearest-exact)", "Lanczos"])
def test_sdxl_hires(tmp_path, job, one_thread, upscaler):
    path = job("  - name: xl\n"
               "    model: tiny-sdxl\n"
               f"    hires: {{scale: 1.5, steps: 2, strength: 0.5, upscaler: {upscaler}}}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    (image,) = png(tmp_path / "out", "xl")
    with Image.open(image) as im:
        assert im.size == (96, 96)
    assert settings(image)["Hires upscaler"] == upscaler


def test_a_grid_over_hires_scale_gets_a_sheet_sized_for_the_largest_cell(tmp_path, job,
                                                                        one_thread):
    path = job("  - name: s\n"
               "    hires: {steps: 2, strength: 0.5}\n"
               "    grid: {hires.scale: [1, 2]}\n")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    sizes = sorted(Image.open(p).size for p in png(tmp_path / "out", "s"))
    assert sizes == [(64, 64), (128, 128)]
    (sheet,) = (tmp_path / "out" / "s" / "grids").glob("*.png")
    with Image.open(sheet) as im:
        assert im.width >= 2 * 128 and im.height >= 128
