"""plugins/depth.py on the tiny kit's SD2-depth model (5-channel UNet, tiny DPT estimator),
through the real stages: job file -> expand -> preflight -> batches -> Engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from render import expand
from render.errors import JobErrors
from render.plan import make_batches
from render.run import resolve_tasks

HEADER = """version: 1
model_dirs: [{kit}]
defaults: {{model: tiny-sd2-depth, size: 64x64, steps: 3, sampler: DDIM, seed: 1}}
"""


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    from PIL import Image

    from render.testing import write_reference_images

    folder = tmp_path_factory.mktemp("refs")
    found = write_reference_images(folder)
    # A 16-bit depth map (far at the left, near at the right) and its 8-bit twin.
    ramp = [[x * 1000 for x in range(64)] for _ in range(64)]
    wide = Image.new("I;16", (64, 64))
    wide.putdata([v for row in ramp for v in row])
    wide.save(folder / "ramp16.png")
    found["ramp16.png"] = folder / "ramp16.png"
    return found


def job(tmp_path: Path, kit: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(HEADER.format(kit=kit) + body, encoding="utf-8")
    return path


def plan(path: Path, plugins) -> list:
    """Load, expand and preflight a job file: the tasks as the renderer gets them."""
    return resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)


def errors(path: Path, plugins) -> list[str]:
    with pytest.raises(JobErrors) as info:
        plan(path, plugins)
    return [str(e) for e in info.value.errors]


def render(engine, plugins, tasks, batch_size: int = 1) -> dict[tuple[str, int], object]:
    import numpy as np

    out = {}
    for batch in make_batches(tasks, plugins.pm.hook, batch_size):
        for result in engine.render(batch):
            out[result.task.job, result.task.index] = np.asarray(result.images[0], dtype=float)
    return out


def diff(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).mean())


def test_section_is_normalised(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: d
    depth: {{image: {refs['house.png']}}}
  - name: e
    depth: {{image: {refs['house.png']}, strength: 0.5, depth_map: {refs['gradient.png']}}}
""")
    tasks = [t for p in expand.load_job_file(path, plugins).jobs for t in expand.iter_tasks(p)]
    assert [t.sections["depth"] for t in tasks] == [
        {"image": str(refs["house.png"]), "strength": 0.75, "depth_map": None},
        {"image": str(refs["house.png"]), "strength": 0.5, "depth_map": str(refs["gradient.png"])},
    ]


def test_section_errors_are_located(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: a
    depth:
      image: {refs['house.png']}
      strenght: 0.5
  - name: b
    depth: {{strength: 0.5}}
  - name: c
    depth: {{image: {refs['house.png']}, strength: 1.5}}
""")
    with pytest.raises(JobErrors) as info:
        expand.load_job_file(path, plugins)
    got = [str(e).split(": ", 1)[1] for e in info.value.errors]
    assert got == [
        "jobs[0].depth.strenght: unknown key (did you mean 'strength'?); depth takes image,"
        " strength, depth_map",
        "jobs[1].depth.image: missing; give the init image path",
        "jobs[2].depth.strength: expected a number in [0, 1], got 1.5",
    ]


def test_depth_on_a_model_without_depth_unet_is_a_preflight_error(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: flat
    model: tiny-sd15
    depth: {{image: {refs['house.png']}}}
""")
    assert errors(path, plugins) == [
        f"{path}:7:5: jobs[0].depth: model 'tiny-sd15' has no depth UNet (its UNet takes 4"
        " input channels; a depth-to-image UNet takes 5): depth: needs an SD2-depth model such"
        " as stable-diffusion-2-depth. With this model use a ControlNet unit with a depth"
        " preprocessor instead, e.g. controlnet: [{model: <a depth ControlNet>, image:"
        " house.png, preprocessor: depth}]"]


def test_depth_does_not_combine_with_controlnet_or_an_image(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: cn
    depth: {{image: {refs['house.png']}}}
    controlnet: [{{model: tiny-controlnet-sd15, image: {refs['house.png']}}}]
  - name: img
    image: {refs['house.png']}
    depth: {{image: {refs['house.png']}}}
""")
    got = [e.split(": ", 2)[2] for e in errors(path, plugins)]
    # Whichever plugin's preflight runs first says it.
    assert "cannot be combined with" in got[0] and "preprocessor: depth" in got[0]
    # (preflight reports every problem of a task now: the cn job's ControlNet also does not
    # fit the depth model; the img job's problem follows)
    assert got[-1].startswith("depth: brings its own image: remove the task's image:/mask:")


def test_depth2img_renders_and_strength_changes_it(tmp_path, kit, refs, plugins, engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: room
    prompt: a cosy room
    depth: {{image: {refs['checker.png']}}}
    grid:
      depth.strength: [0.5, 1.0]
""")
    tasks = plan(path, plugins)
    assert plugins.pm.hook.pipeline_class(task=tasks[0], family="sd2") == \
        "StableDiffusionDepth2ImgPipeline"
    images = render(engine, plugins, tasks)
    low, high = images["room", 0], images["room", 1]
    assert low.shape == (64, 64, 3)
    assert diff(low, high) > 3
    import numpy as np

    checker = np.asarray(__import__("PIL.Image").Image.open(refs["checker.png"]), dtype=float)
    assert diff(low, checker) < diff(high, checker)  # less strength stays nearer the image


def test_user_depth_map_is_used(tmp_path, kit, refs, plugins, engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: own
    prompt: a cosy room
    depth: {{image: {refs['checker.png']}, strength: 0.9}}
    grid:
      depth.depth_map: [{refs['gradient.png']}, {refs['ramp16.png']}]
  - name: estimated
    prompt: a cosy room
    depth: {{image: {refs['checker.png']}, strength: 0.9}}
""")
    tasks = plan(path, plugins)
    assert tasks[0].files["depth:depth_map"].path == str(refs["gradient.png"])
    images = render(engine, plugins, tasks)
    vertical, horizontal, estimated = (images["own", 0], images["own", 1],
                                       images["estimated", 0])
    assert diff(vertical, horizontal) > 1
    assert diff(vertical, estimated) > 1


def test_a_batch_shares_one_depth_map(tmp_path, kit, refs, plugins, engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: seeds
    prompt: a cosy room
    seeds: [1, 2, 3]
    depth: {{image: {refs['checker.png']}, strength: 0.8, depth_map: {refs['gradient.png']}}}
""")
    tasks = plan(path, plugins)
    (batch,) = make_batches(tasks, plugins.pm.hook, 0)
    assert len(batch.tasks) == 3
    batched = {r.task.index: r.images[0] for r in engine.render(batch)}
    single = render(engine, plugins, tasks, batch_size=1)
    import numpy as np

    for index, image in batched.items():
        assert np.abs(np.asarray(image, dtype=float) - single["seeds", index]).max() <= 2
    assert diff(single["seeds", 0], single["seeds", 1]) > 1


def test_infotext_has_the_denoising_strength(tmp_path, kit, refs, plugins):
    from render import metadata

    path = job(tmp_path, kit, f"""jobs:
  - name: info
    prompt: a room
    depth: {{image: {refs['house.png']}, strength: 0.6}}
""")
    (task,) = plan(path, plugins)
    fields = {}
    for part in plugins.pm.hook.result_metadata(task=task, result=None):
        fields.update(part or {})
    assert fields == {"Denoising strength": "0.6"}
    text = metadata.infotext(task, model_name="tiny-sd2-depth", model_hash="0123456789",
                             extra=fields, version="render test")
    assert "Model: tiny-sd2-depth, Denoising strength: 0.6, Version: render test" in text
