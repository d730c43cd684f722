"""plugins/controlnet/ on the tiny kit, through the real stages: job file -> expand ->
preflight -> batches -> Engine (from_pipe views, task_inputs) -> result_metadata/postprocess.

The plugin is loaded by file path exactly as the CLI loads built-ins (only it and depth.py,
so another plugin cannot change these images); one test runs the whole CLI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from render import expand
from render.errors import JobErrors
from render.plan import make_batches
from render.run import resolve_tasks
from render.tasks import Batch

HEADER = """version: 1
model_dirs: {dirs}
defaults: {{model: tiny-sd15, size: 64x64, steps: 3, sampler: Euler a, seed: 1}}
"""


@pytest.fixture(scope="module")
def cn(plugins):
    """The loaded plugin module (its caches and counters)."""
    module = plugins.pm.get_plugin("controlnet")
    module.inputs.clear_caches()
    return module


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    from render.testing import write_reference_images

    return write_reference_images(tmp_path_factory.mktemp("refs"))


def job(tmp_path: Path, kit: Path, body: str, dirs: list[Path] | None = None) -> Path:
    path = tmp_path / "job.yaml"
    folders = "[" + ", ".join(str(d) for d in (dirs or [kit])) + "]"
    path.write_text(HEADER.format(dirs=folders) + body, encoding="utf-8")
    return path


def plan(path: Path, plugins) -> list:
    """Load, expand and preflight a job file: the tasks as the renderer gets them."""
    return resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)


def errors(path: Path, plugins) -> list[str]:
    with pytest.raises(JobErrors) as info:
        plan(path, plugins)
    return [str(e) for e in info.value.errors]


def render(engine, plugins, tasks, batch_size: int = 1) -> dict[int, object]:
    """Render through make_batches and Engine.render; index -> float array (0..255)."""
    import numpy as np

    out = {}
    for batch in make_batches(tasks, plugins.pm.hook, batch_size):
        for result in engine.render(batch):
            out[result.task.index] = np.asarray(result.images[0], dtype=np.float64)
    return out


def diff(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).mean())


def unit(refs, **extra) -> str:
    fields = {"model": "tiny-controlnet-sd15", "image": str(refs["house.png"]),
              "preprocessor": "canny", "resolution": 64, **extra}
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


# -- validation -------------------------------------------------------------------------------

def test_sections_are_normalised_lists_with_defaults(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: one
    controlnet: {{model: tiny-controlnet-sd15, image: {refs['house.png']}}}
  - name: two
    controlnet:
      - {{model: tiny-controlnet-sd15, image: {refs['house.png']}, preprocessor: Canny, low: 50,
         scale: 0.5, resize_mode: fill}}
      - {{model: tiny-controlnet-sd15, image: {refs['checker.png']}, preprocessor: hed,
         low: 20, start: 0.2, end: 0.8}}
""")
    tasks = [t for p in expand.load_job_file(path, plugins).jobs for t in expand.iter_tasks(p)]
    assert tasks[0].sections["controlnet"] == [{
        "model": "tiny-controlnet-sd15", "image": str(refs["house.png"]), "preprocessor": "none",
        "scale": 1.0, "start": 0.0, "end": 1.0, "resolution": 512,
        "resize_mode": "Crop and Resize"}]
    first, second = tasks[1].sections["controlnet"]
    assert (first["preprocessor"], first["low"], first["high"]) == ("canny", 50, 200)
    assert (first["scale"], first["resize_mode"]) == (0.5, "Resize and Fill")
    # A setting of another preprocessor is dropped, so grids over preprocessors work.
    assert second["preprocessor"] == "softedge_hed" and "low" not in second
    assert (second["start"], second["end"]) == (0.2, 0.8)


def test_unit_errors_are_located(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: a
    controlnet:
      - model: tiny-controlnet-sd15
        image: {refs['house.png']}
        scal: 1
  - name: b
    controlnet:
      - model: tiny-controlnet-sd15
        image: nowhere.png
  - name: c
    controlnet:
      - {{model: tiny-controlnet-sd15, image: {refs['house.png']}, preprocessor: cany}}
  - name: d
    controlnet:
      - {{model: tiny-controlnet-sd15, image: {refs['house.png']}, start: 0.5, end: 0.5}}
""")
    with pytest.raises(JobErrors) as info:
        expand.load_job_file(path, plugins)
    got = [str(e) for e in info.value.errors]
    assert got[0] == f"{path}:9:15: jobs[0].controlnet[0].scal: unknown key (did you mean 'scale'?)"
    assert got[1] == (f"{path}:13:16: jobs[1].controlnet[0].image: file not found: nowhere.png"
                      f" (looked at {tmp_path / 'nowhere.png'})")
    assert got[2].startswith(f"{path}:16:") and "jobs[2].controlnet[0].preprocessor: unknown" \
        " preprocessor 'cany' (did you mean 'canny'?)" in got[2]
    assert "jobs[3].controlnet[0].start: start (0.5) must be less than end (0.5)" in got[3]


def test_grid_axis_over_a_unit_field(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: g
    controlnet: [{unit(refs)}]
    grid:
      controlnet.0.scale: [0, 0.5, 1]
      controlnet.0.low: [50, 100]
""")
    tasks = plan(path, plugins)
    got = [(t.sections["controlnet"][0]["scale"], t.sections["controlnet"][0]["low"])
           for t in tasks]
    assert got == [(0, 50), (0, 100), (0.5, 50), (0.5, 100), (1, 50), (1, 100)]
    assert len({t.id for t in tasks}) == 6


def test_save_control_is_an_output_option(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""output: {{save_control: true}}
jobs:
  - name: ok
    controlnet: [{unit(refs)}]
  - name: bad
    output: {{save_control: sometimes}}
    controlnet: [{unit(refs)}]
""")
    with pytest.raises(JobErrors) as info:
        expand.load_job_file(path, plugins)
    assert [str(e).split(": ", 1)[1] for e in info.value.errors] == [
        "jobs[1].output.save_control: expected true or false, got 'sometimes'"]
    path.write_text(path.read_text().replace("sometimes", "false"))
    jf = expand.load_job_file(path, plugins)
    assert [p.job.output.options for p in jf.jobs] == [{"save_control": True},
                                                       {"save_control": False}]


# -- preflight --------------------------------------------------------------------------------

def test_missing_annotator_weights_is_a_preflight_error(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: soft
    controlnet:
      - model: tiny-controlnet-sd15
        image: {refs['house.png']}
        preprocessor: softedge_pidinet
""")
    assert errors(path, plugins) == [
        f"{path}:9:23: jobs[0].controlnet[0].preprocessor: preprocessor 'softedge_pidinet'"
        " needs table5_pidinet.pth: download"
        " https://huggingface.co/lllyasviel/Annotators/resolve/main/table5_pidinet.pth and put"
        f" it in {kit}/annotators/ (looked in: no annotators folder exists yet)"]


def test_missing_openpose_weights_lists_every_file(tmp_path, kit, refs, plugins):
    models = tmp_path / "models"
    (models / "annotators").mkdir(parents=True)
    (models / "annotators" / "hand_pose_model.pth").write_bytes(b"x")
    path = job(tmp_path, kit, f"""jobs:
  - name: pose
    controlnet: [{unit(refs, preprocessor="openpose_full")}]
""", dirs=[models, kit])
    (message,) = errors(path, plugins)
    assert message.endswith(
        "jobs[0].controlnet[0].preprocessor: preprocessor 'openpose_full' needs"
        " body_pose_model.pth and facenet.pth: download them from"
        " https://huggingface.co/lllyasviel/Annotators/tree/main and put them in"
        f" {models}/annotators/ (looked in: {models}/annotators)")


def test_preprocessor_without_controlnet_aux_is_a_preflight_error(tmp_path, kit, refs, plugins,
                                                                  cn, monkeypatch):
    monkeypatch.setattr(cn.preprocessors, "_have_aux", lambda: False)
    path = job(tmp_path, kit, f"""jobs:
  - name: edges
    controlnet: [{unit(refs)}]
  - name: plain
    controlnet: [{unit(refs, preprocessor="none")}]
""")
    (message,) = errors(path, plugins)
    assert message.endswith("jobs[0].controlnet[0].preprocessor: preprocessor 'canny' needs the"
                            " controlnet-aux package, which is not installed: pip install"
                            " controlnet-aux")


def test_missing_midas_weights_suggests_depth_anything(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: depth
    controlnet: [{unit(refs, preprocessor="depth")}]
""")
    (message,) = errors(path, plugins)
    assert "preprocessor 'depth_midas' needs dpt_hybrid-midas-501f0c75.pt: download" in message
    assert message.endswith("(looked in: no annotators folder exists yet); or use preprocessor:"
                            " depth_anything with a transformers depth folder")


def test_controlnet_of_another_family_is_a_preflight_error(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: xl-net
    controlnet:
      - model: tiny-controlnet-sdxl
        image: {refs['house.png']}
  - name: sd-net
    model: tiny-sdxl
    controlnet:
      - model: tiny-controlnet-sd15
        image: {refs['house.png']}
""")
    assert errors(path, plugins) == [
        f"{path}:7:16: jobs[0].controlnet[0].model: ControlNet 'tiny-controlnet-sdxl' is made"
        " for SDXL, but model 'tiny-sd15' is SD 1.x (its cross-attention is 80 wide, the"
        " model's 32): use a ControlNet made for SD 1.x",
        f"{path}:12:16: jobs[1].controlnet[0].model: ControlNet 'tiny-controlnet-sd15' is made"
        " for SD 1.x/2.x, but model 'tiny-sdxl' is SDXL (its cross-attention is 32 wide, the"
        " model's 80): use a ControlNet made for SDXL",
    ]


def test_missing_controlnet_model_is_a_preflight_error(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: gone
    controlnet:
      - model: tiny-controlnet-sd51
        image: {refs['house.png']}
""")
    (message,) = errors(path, plugins)
    assert message.startswith(f"{path}:7:16: jobs[0].controlnet[0].model: controlnet"
                              " 'tiny-controlnet-sd51' not found")
    assert "did you mean 'tiny-controlnet-sd15'" in message


def test_preflight_records_files_and_hashes(tmp_path, kit, refs, plugins):
    path = job(tmp_path, kit, f"""jobs:
  - name: files
    controlnet: [{unit(refs)}]
""")
    (task,) = plan(path, plugins)
    ref = task.files["controlnet:0"]
    weights = kit / "controlnet/tiny-controlnet-sd15/diffusion_pytorch_model.safetensors"
    with open(weights, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    assert ref.kind == "controlnet" and ref.extra["a1111_hash"] == legacy
    assert task.files["controlnet:0:image"].sha256 == hashlib.sha256(
        refs["house.png"].read_bytes()).hexdigest()


# -- rendering --------------------------------------------------------------------------------

def test_controlnet_changes_pixels_and_scale_zero_is_no_controlnet(tmp_path, kit, refs, plugins,
                                                                    engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: plain
    prompt: a house
  - name: cn
    prompt: a house
    controlnet: [{unit(refs)}]
    grid:
      controlnet.0.scale: [0, 1]
""")
    plain, zero, one = plan(path, plugins)
    hook = plugins.pm.hook
    assert hook.pipeline_class(task=zero, family="sd1") is None  # the core's pipeline
    assert hook.pipeline_class(task=one, family="sd1") == "StableDiffusionControlNetPipeline"
    images = {}
    for task in (plain, zero, one):
        (result,) = engine.render(Batch(("t",), (task,)))
        images[task.job, task.index] = result
    import numpy as np

    a, b, c = (np.asarray(r.images[0], dtype=np.float64) for r in images.values())
    assert np.array_equal(a, b)  # bit-exact: a scale-0 unit is skipped
    assert diff(a, c) > 5


def test_two_units_use_both_controlnets(tmp_path, kit, refs, plugins, engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: both
    prompt: a house
    controlnet:
      - {unit(refs)}
      - {unit(refs, image=refs['checker.png'], preprocessor="none", scale=0.7)}
    grid:
      controlnet.1.scale: [0, 0.7]
      controlnet.0.scale: [0, 1]
""")
    tasks = plan(path, plugins)
    images = render(engine, plugins, tasks)
    # index: (unit1, unit0) = (0,0) (0,1) (0.7,0) (0.7,1)
    none, first, second, both = (images[i] for i in range(4))
    assert diff(first, none) > 5 and diff(second, none) > 5
    assert diff(both, first) > 2 and diff(both, second) > 2
    view = engine.pipeline_for(engine.resident(tasks[3].files["model"]), tasks[3])
    assert type(view.controlnet).__name__ == "MultiControlNetModel"
    assert len(view.controlnet.nets) == 2


def test_img2img_and_inpaint_with_controlnet(tmp_path, kit, refs, plugins, engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: i2i
    prompt: a house
    image: {refs['checker.png']}
    strength: 0.8
    controlnet: [{unit(refs)}]
    grid:
      controlnet.0.scale: [0, 1]
  - name: inpaint
    prompt: a house
    image: {refs['checker.png']}
    mask: {refs['mask.png']}
    strength: 0.9
    controlnet: [{unit(refs)}]
    grid:
      controlnet.0.scale: [0, 1]
""")
    tasks = plan(path, plugins)
    hook = plugins.pm.hook
    assert [hook.pipeline_class(task=t, family="sd1") for t in tasks] == [
        None, "StableDiffusionControlNetImg2ImgPipeline",
        None, "StableDiffusionControlNetInpaintPipeline"]
    images = {}
    for batch in make_batches(tasks, hook, 1):
        for result in engine.render(batch):
            images[result.task.job, result.task.index] = result.images[0]
    import numpy as np

    arr = {k: np.asarray(v, dtype=np.float64) for k, v in images.items()}
    assert diff(arr["i2i", 0], arr["i2i", 1]) > 3
    assert diff(arr["inpaint", 0], arr["inpaint", 1]) > 1
    # Inpainting keeps the unmasked border of the init image in both.
    mask = np.asarray(__import__("PIL.Image").Image.open(refs["mask.png"])) > 127
    assert diff(arr["inpaint", 0][~mask], arr["inpaint", 1][~mask]) < \
        diff(arr["inpaint", 0][mask], arr["inpaint", 1][mask])


def test_sdxl_controlnet_txt2img_img2img_inpaint(tmp_path, kit, refs, plugins, engine):
    xl_unit = unit(refs, model="tiny-controlnet-sdxl")
    path = tmp_path / "xl.yaml"
    path.write_text(f"""version: 1
model_dirs: [{kit}]
defaults: {{model: tiny-sdxl, size: 64x64, steps: 3, seed: 1, sampler: Euler a,
  prompt: a house, controlnet: [{xl_unit}], grid: {{controlnet.0.scale: [0, 1]}}}}
jobs:
  - name: t2i
  - name: i2i
    image: {refs['checker.png']}
    strength: 0.8
  - name: inpaint
    image: {refs['checker.png']}
    mask: {refs['mask.png']}
    strength: 0.9
""", encoding="utf-8")
    tasks = plan(path, plugins)
    assert [plugins.pm.hook.pipeline_class(task=t, family="sdxl") for t in tasks[1::2]] == [
        "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline"]
    images = {}
    for batch in make_batches(tasks, plugins.pm.hook, 1):
        for result in engine.render(batch):
            images[result.task.job, result.task.index] = result.images[0]
    import numpy as np

    arr = {k: np.asarray(v, dtype=np.float64) for k, v in images.items()}
    for name in ("t2i", "i2i", "inpaint"):
        assert diff(arr[name, 0], arr[name, 1]) > 1, name


def test_batch_shares_control_inputs_and_matches_single_calls(tmp_path, kit, refs, plugins,
                                                               engine):
    path = job(tmp_path, kit, f"""jobs:
  - name: seeds
    prompt: a house
    seeds: [1, 2, 3]
    controlnet: [{unit(refs, scale=0.8)}]
""")
    tasks = plan(path, plugins)
    (batch,) = make_batches(tasks, plugins.pm.hook, 0)
    assert len(batch.tasks) == 3
    batched = {r.task.index: r.images[0] for r in engine.render(batch)}
    single = render(engine, plugins, tasks, batch_size=1)
    import numpy as np

    for index, image in batched.items():
        assert np.abs(np.asarray(image, dtype=np.float64) - single[index]).max() <= 2


# -- preprocessing ----------------------------------------------------------------------------

def test_canny_thresholds_change_the_control_image(tmp_path, kit, refs, plugins, cn):
    import numpy as np

    path = job(tmp_path, kit, f"""jobs:
  - name: c
    controlnet: [{unit(refs, image=refs['gradient.png'])}]
    grid:
      controlnet.0.low: [100, 5]
      controlnet.0.high: [200, 20]
""")
    tasks = plan(path, plugins)
    maps = [np.asarray(cn.inputs.control_image(t, 0, t.sections["controlnet"][0])) for t in tasks]
    assert maps[0].shape == (64, 64, 3)
    strict, loose = (maps[0] > 127).sum(), (maps[3] > 127).sum()
    assert loose > strict  # a smooth ramp is an edge only for low thresholds
    assert not np.array_equal(maps[1], maps[3])


def test_preprocessed_image_is_computed_once_across_grid_cells(tmp_path, kit, refs, plugins, cn,
                                                                engine, monkeypatch):
    calls = []
    original = cn.preprocessors.RUNNERS["canny"]
    monkeypatch.setitem(cn.preprocessors.RUNNERS, "canny",
                        lambda run: calls.append(run) or original(run))
    cn.inputs.clear_caches()
    path = job(tmp_path, kit, f"""jobs:
  - name: cells
    prompt: a house
    seeds: [1, 2]
    controlnet: [{unit(refs, low=90)}]
    grid:
      controlnet.0.scale: [0.5, 1]
      controlnet.0.end: [0.5, 1]
""")
    tasks = plan(path, plugins)
    render(engine, plugins, tasks, batch_size=0)
    assert len(calls) == 1
    assert cn.inputs.STATS["runs"] == 1 and cn.inputs.STATS["hits"] >= 3


def test_shuffle_is_seeded_by_the_task(tmp_path, kit, refs, plugins, cn):
    import numpy as np

    path = job(tmp_path, kit, f"""jobs:
  - name: s
    seeds: [1, 1, 2]
    controlnet: [{unit(refs, preprocessor="shuffle")}]
""")
    a, b, c = (np.asarray(cn.inputs.control_image(t, 0, t.sections["controlnet"][0]))
               for t in plan(path, plugins))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_weights_load_from_a1111_extension_downloads(tmp_path, kit, refs, plugins, cn, engine):
    """softedge_pidinet with (random) weights where A1111's ControlNet extension keeps them."""
    import torch
    from controlnet_aux.pidi.model import pidinet

    webui = tmp_path / "webui"
    (webui / "models").mkdir(parents=True)
    downloads = webui / "extensions/sd-webui-controlnet/annotator/downloads/pidinet"
    downloads.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"state_dict": pidinet().state_dict()}, downloads / "table5_pidinet.pth")
    path = job(tmp_path, kit, f"""jobs:
  - name: soft
    prompt: a house
    controlnet: [{unit(refs, preprocessor="pidi")}]
    grid:
      controlnet.0.scale: [0, 1]
""", dirs=[webui / "models", kit])
    tasks = plan(path, plugins)
    assert tasks[1].files["controlnet:0:annotator:table5_pidinet.pth"].path == \
        str(downloads / "table5_pidinet.pth")
    edges = cn.inputs.control_image(tasks[1], 0, tasks[1].sections["controlnet"][0])
    assert edges.size == (64, 64)
    images = render(engine, plugins, tasks)
    assert diff(images[0], images[1]) > 5


def test_depth_anything_preprocessor_from_a_transformers_folder(tmp_path, kit, refs, plugins,
                                                                 cn, engine):
    """The depth-as-ControlNet path for models without a depth UNet."""
    import numpy as np

    models = tmp_path / "models"
    folder = models / "annotators" / "depth-anything-small-hf"
    shutil.copytree(kit / "checkpoints/tiny-sd2-depth/depth_estimator", folder)
    shutil.copy(kit / "checkpoints/tiny-sd2-depth/feature_extractor/preprocessor_config.json",
                folder)
    path = job(tmp_path, kit, f"""jobs:
  - name: depth-cn
    prompt: a room
    controlnet: [{unit(refs, image=refs['gradient.png'], preprocessor="depth_anything")}]
    grid:
      controlnet.0.scale: [0, 1]
""", dirs=[kit, models])
    tasks = plan(path, plugins)
    depth = np.asarray(cn.inputs.control_image(tasks[1], 0, tasks[1].sections["controlnet"][0]))
    assert depth.shape == (64, 64, 3) and depth.min() == 0 and depth.max() == 255
    assert np.array_equal(depth[..., 0], depth[..., 2])  # grey: one channel repeated
    images = render(engine, plugins, tasks)
    assert diff(images[0], images[1]) > 5


def test_single_file_controlnet_renders_like_its_folder(tmp_path, kit, refs, plugins, engine):
    """A one-file ControlNet (diffusers names) loads offline with a config derived from the
    model's UNet and the file's hint block."""
    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    (models / "ControlNet").mkdir(parents=True)
    state = load_file(kit / "controlnet/tiny-controlnet-sd15/diffusion_pytorch_model.safetensors")
    save_file(state, models / "ControlNet" / "tiny-cn-single.safetensors")
    path = job(tmp_path, kit, f"""jobs:
  - name: folder
    prompt: a house
    controlnet: [{unit(refs)}]
  - name: single
    prompt: a house
    controlnet: [{unit(refs, model="tiny-cn-single")}]
""", dirs=[kit, models])
    tasks = plan(path, plugins)
    images = {}
    for task in tasks:
        (result,) = engine.render(Batch(("t",), (task,)))
        images[task.job] = result.images[0]
    import numpy as np

    assert np.array_equal(np.asarray(images["folder"]), np.asarray(images["single"]))


# -- writing ----------------------------------------------------------------------------------

def test_infotext_fields_as_sd_webui_controlnet_writes_them(tmp_path, kit, refs, plugins):
    from render import metadata

    path = job(tmp_path, kit, f"""jobs:
  - name: info
    prompt: a house
    controlnet:
      - {unit(refs, scale=0.8, low=50, resolution=512)}
      - {unit(refs, preprocessor="none", start=0.25, end=0.75, resize_mode="resize")}
""")
    (task,) = plan(path, plugins)
    digest = task.files["controlnet:0"].extra["a1111_hash"]
    fields = {}
    for part in plugins.pm.hook.result_metadata(task=task, result=None):
        fields.update(part or {})
    assert fields == {
        "ControlNet 0": '"Module: canny, Model: tiny-controlnet-sd15 [' + digest + '],'
                        ' Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512,'
                        ' Threshold A: 50.0, Threshold B: 200.0, Guidance Start: 0.0,'
                        ' Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"',
        "ControlNet 1": '"Module: none, Model: tiny-controlnet-sd15 [' + digest + '],'
                        ' Weight: 1.0, Resize Mode: Just Resize, Processor Res: 64,'
                        ' Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.25,'
                        ' Guidance End: 0.75, Pixel Perfect: False, Control Mode: Balanced"',
    }
    text = metadata.infotext(task, model_name="tiny-sd15", model_hash="0123456789",
                             extra=fields, version="render test")
    assert (f'Model: tiny-sd15, ControlNet 0: "Module: canny, Model: tiny-controlnet-sd15'
            f' [{digest}], Weight: 0.8, ') in text
    _prompt, _negative, params = metadata.parse_infotext(text)
    assert params["ControlNet 1"] == json.loads(fields["ControlNet 1"])


def test_postprocess_puts_control_images_into_extras(tmp_path, kit, refs, plugins, cn):
    from render.tasks import Result

    path = job(tmp_path, kit, f"""jobs:
  - name: extras
    controlnet:
      - {unit(refs)}
      - {unit(refs, scale=0)}
      - {unit(refs, preprocessor="invert", image=refs['checker.png'])}
""")
    (task,) = plan(path, plugins)
    result = Result(task=task, images=[])
    result = plugins.chain("postprocess", "result", result, task=task, renderer=None)
    assert sorted(result.extras) == ["control-0", "control-2"]  # unit 1 (scale 0) does nothing
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in result.extras.values())


def test_cli_renders_and_writes_infotext_and_control_image(tmp_path, kit, refs):
    """The whole program, every built-in plugin loaded, as a user runs it."""
    import torch
    from PIL import Image

    from render.cli import main

    torch.set_num_threads(1)
    path = tmp_path / "cli.yaml"
    path.write_text(HEADER.format(dirs=f"[{kit}]") + f"""output:
  dir: out/{{job}}
  name: "{{index}}"
  save_control: true
jobs:
  - name: house
    prompt: a house
    controlnet: [{unit(refs, scale=0.8)}]
""", encoding="utf-8")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out" / "house"
    with Image.open(out / "0.png") as im:
        infotext = im.info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: tiny-controlnet-sd15 [' in infotext
    assert "Weight: 0.8, Resize Mode: Crop and Resize" in infotext
    with Image.open(out / "0-control-0.png") as control:
        assert control.size == (64, 64)
    provenance = json.loads(Image.open(out / "0.png").info["render"])
    assert "controlnet:0" in json.dumps(provenance)


def test_cli_writes_no_control_image_without_save_control(tmp_path, kit, refs):
    import torch

    from render.cli import main

    torch.set_num_threads(1)
    path = tmp_path / "cli.yaml"
    path.write_text(HEADER.format(dirs=f"[{kit}]") + f"""output:
  dir: out/{{job}}
  name: "{{index}}"
jobs:
  - name: house
    prompt: a house
    controlnet: [{unit(refs, scale=0.8)}]
""", encoding="utf-8")
    assert main([str(path), "-q", "--device", "cpu"]) == 0
    out = tmp_path / "out" / "house"
    assert (out / "0.png").is_file()
    assert not (out / "0-control-0.png").exists()


def test_prompt_editing_composes_with_controlnet(tmp_path, kit, refs, plugins, engine):
    """A ControlNet pipeline switches the prompt between steps like the core's: the edited
    prompt renders between its two ends; one that never switches equals the plain prompt."""
    path = job(tmp_path, kit, f"""jobs:
  - name: cat
    prompt: a cat
    controlnet: [{unit(refs)}]
  - name: dog
    prompt: a dog
    controlnet: [{unit(refs)}]
  - name: edited
    prompt: "a [cat:dog:0.5]"
    controlnet: [{unit(refs)}]
  - name: never
    prompt: "a [cat:dog:99]"
    controlnet: [{unit(refs)}]
""")
    images = {}
    for task in plan(path, plugins):
        (result,) = engine.render(Batch(("t",), (task,)))
        import numpy as np

        images[task.job] = np.asarray(result.images[0], dtype=np.float64)
    assert np.array_equal(images["never"], images["cat"])
    assert diff(images["edited"], images["cat"]) > 0 and diff(images["edited"], images["dog"]) > 0
