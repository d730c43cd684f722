"""ControlNet: one or more ``controlnet:`` units steer a txt2img, img2img or inpaint task.

Job file (a list of units, or one mapping for a single unit)::

    controlnet:
      - model: control_v11p_sd15_canny     # a file or diffusers folder in ControlNet/
        image: refs/house.png              # relative to the job file
        preprocessor: canny                # default none: the image is the control image
        low: 100                           # canny only: thresholds (A1111's Threshold A/B)
        high: 200
        scale: 0.8                         # default 1.0 (A1111's Weight)
        start: 0.0                         # default 0.0, 1.0: the part of the steps it acts on
        end: 1.0
        resolution: 512                    # default 512 (A1111's Processor Res)
        resize_mode: crop                  # crop (default) | resize | fill, as A1111

``task.sections["controlnet"]`` is always a list of units with every default filled in and
the preprocessor's settings only, e.g. ``[{"model": "control_v11p_sd15_canny", "image":
"/abs/refs/house.png", "preprocessor": "canny", "scale": 0.8, "start": 0.0, "end": 1.0,
"resolution": 512, "resize_mode": "Crop and Resize", "low": 100, "high": 200}]``. A grid axis
names a unit field: ``controlnet.0.scale: [0, 0.5, 1]`` (``controlnet.scale`` for a single
mapping). A setting of another preprocessor (``low`` with ``preprocessor: mlsd``) is ignored,
so a grid over preprocessors works; a key no preprocessor knows is an error.

Preprocessors (A1111 names and their old aliases): ``none``, ``invert``, ``canny``,
``shuffle`` (seeded with the task's seed), ``lineart_standard`` need no weights; these load
controlnet-aux models from an annotators folder: ``softedge_hed`` (``hed``),
``softedge_hedsafe``, ``scribble_hed``, ``softedge_pidinet`` (``pidi``, ``pidinet``),
``softedge_pidisafe``, ``scribble_pidinet``, ``lineart_realistic`` (``lineart``),
``lineart_coarse``, ``lineart_anime``, ``mlsd``, ``openpose``, ``openpose_hand``,
``openpose_face``, ``openpose_faceonly``, ``openpose_full``, ``depth_midas`` (``depth``),
``normal_midas`` (``normal_map``), ``normal_bae`` (``normal``), ``depth_leres``,
``depth_leres++``, ``depth_zoe``, and ``depth_anything``: any transformers depth-estimation
folder (Depth Anything v1/v2, DPT) named ``depth_anything*`` or ``depth-anything*``.

Where annotator weights go (searched in this order, file names as in the hub repo
``lllyasviel/Annotators``, subfolders allowed): for every ``model_dirs`` entry, its
``annotators/`` (or ``annotator/``, ``ControlNetPreprocessor/``, any case) folder, then
``../extensions/sd-webui-controlnet/annotator/downloads/`` beside it (A1111's extension keeps
``downloads/<module>/<file>`` there), then ComfyUI's
``../custom_nodes/comfyui_controlnet_aux/ckpts/``. A missing file is a preflight error that
names the file, where to download it and where to put it. The files are pickles, read by
controlnet-aux with ``torch.load``, which is weights-only in torch >= 2.6.

Decisions:

- Every unit goes through a ``MultiControlNetModel`` (one unit too): one code path for the
  six SD/SDXL txt2img/img2img/inpaint pipelines. A unit with scale 0 is skipped entirely
  (no model, no preprocessing), so scale 0 renders exactly like no ControlNet; when every
  unit has scale 0 the core's own pipeline renders the task.
- Tasks of a batch share their control images (the group key holds them): diffusers' img2img
  and inpaint ControlNet pipelines take one image per unit for the whole batch. Per-call values
  are returned as the *same* objects for every task of a batch, so the engine passes them once.
- A preprocessed image is cached in-process per (image sha256, preprocessor, settings,
  resolution); grid cells that differ only in scale or prompt preprocess once.
- ``output.save_control: true`` saves each unit's control image beside the output as
  ``<name>-control-<unit>.png``. The hooks only see the task, so this plugin always puts the
  control images into ``result.extras["control-<unit>"]``; the writer saves them only when
  the job's ``output.save_control`` is true.
- Infotext: ``ControlNet <i>: "Module: ..., Model: <stem> [<hash>], Weight: ..."`` with the
  eleven fields of sd-webui-controlnet >= 1.1.44x (``ControlNetUnit.infotext_fields``), values
  formatted as it does (floats as ``1.0``), the model hash being A1111's 8-character
  ``model_hash`` (sha256 of 64 KiB at offset 1 MiB) that the extension shows after model
  names.
"""

from __future__ import annotations

from typing import Any

from render.api import FieldError, ModelKind, hookimpl, raise_all, section_axis_label

from .annotators import annotator_refs
from .infotext import infotext_fields
from .inputs import call_inputs, control_image, image_identity, image_ref
from .models import PIPELINES, controlnet_ref, model_identity, multi_controlnet
from .preprocessors import PREPROCESSORS
from .schema import (
    KEY,
    active_units,
    image_label,
    model_label,
    units,
    validate_save_control,
    validate_section,
)

# The hooks, in the order the stages call them; the work is in the modules:
# schema (the section), preprocessors (the table and the runners), annotators (their weight
# files), models (ControlNet files, loading, pipeline classes), inputs (control images and the
# call's inputs, with their caches), infotext (result_metadata).


# -- load -------------------------------------------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    # sd-webui-controlnet shows A1111's old 8-digit hash after the model's name.
    register(ModelKind("controlnet", folders=("ControlNet", "controlnet"), family=True,
                       hashes={"a1111_hash": "legacy"}, infotext="ControlNet 0"))
    # Preprocessor weights; found by file name in these folders (see annotator_roots).
    register(ModelKind("annotator", folders=("annotator", "Annotators", "ControlNetPreprocessor")))


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section,
             doc="ControlNet units: model, image, preprocessor, scale, start, end, resolution")
    register("save_control", validate_save_control, where="output",
             doc="save each ControlNet unit's control image beside the output")


# -- preflight --------------------------------------------------------------------------------

@hookimpl
def task_files(task: Any, models: Any) -> dict[str, Any] | None:
    """Find each unit's ControlNet, image and annotator weights; check the model family.
    (``depth:`` with ``controlnet:`` is refused by the depth plugin, once.)"""
    found: dict[str, Any] = {}
    errors: list[FieldError] = []
    for i, unit in enumerate(units(task)):   # every unit is checked: all problems at once
        try:
            found[model_label(i)] = controlnet_ref(task, models, i, unit)
            found[image_label(i)] = image_ref(models, i, unit)
            found.update(annotator_refs(models, i, PREPROCESSORS[unit["preprocessor"]]))
        except FieldError as exc:
            errors.extend(getattr(exc, "errors", [exc]))
    raise_all(errors)
    return found or None


# -- plan -------------------------------------------------------------------------------------

@hookimpl
def group_key(task: Any) -> Any:
    """Tasks of one call share ControlNets, scales, guidance ranges and control images."""
    acting = active_units(task)
    if not acting:
        return None
    return (KEY, tuple((model_identity(task, i, u), float(u["scale"]), float(u["start"]),
                        float(u["end"]), image_identity(task, i, u)) for i, u in acting))


# -- render -----------------------------------------------------------------------------------

@hookimpl
def pipeline_class(task: Any, family: str) -> str | None:
    if not active_units(task):
        return None
    return PIPELINES[(family == "sdxl", task.kind)]


@hookimpl
def pipeline_components(task: Any, family: str, loader: Any) -> dict[str, Any] | None:
    """A ``MultiControlNetModel`` of the acting units, cached (so the engine's view is too)."""
    acting = active_units(task)
    if not acting:
        return None
    return {"controlnet": multi_controlnet(task, acting, loader)}


@hookimpl
def task_inputs(task: Any, pipe: Any) -> dict[str, Any] | None:
    """Control images and per-unit scales and guidance ranges for the pipeline call.

    Every task of a batch gets the same objects (cached by what decides them), which the
    engine passes once: diffusers wants one list per call, one entry per unit.
    """
    acting = active_units(task)
    if not acting:
        return None
    return call_inputs(task, acting, pipe)


# -- post and write ---------------------------------------------------------------------------

@hookimpl
def postprocess(result: Any, task: Any) -> Any:
    """Control images into ``result.extras`` (``control-<unit>``) for ``save_control``."""
    acting = active_units(task)
    if not acting:
        return None
    for i, unit in acting:
        # Cached by task_inputs; an image evicted since is made again on the device it was
        # made on the first time, which the image cache records (device=None).
        result.extras[f"control-{i}"] = control_image(task, i, unit, device=None)
    return result


@hookimpl
def result_metadata(task: Any, result: Any) -> dict[str, str] | None:
    """``ControlNet <i>`` fields exactly as sd-webui-controlnet writes them."""
    return infotext_fields(task) or None


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "ControlNet", {"scale": "weight"})
