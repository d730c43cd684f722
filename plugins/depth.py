"""Depth-to-image: ``depth:`` renders an SD2-depth model from an image and its depth.

Job file::

    model: stable-diffusion-2-depth       # a model whose UNet takes 5 channels (latents + depth)
    depth:
      image: refs/room.jpg                 # the init image, relative to the job file
      strength: 0.7                        # default 0.75 (A1111's img2img default)
      depth_map: refs/room-depth.png       # optional: your own depth map, white = near

``task.sections["depth"]`` is ``{"image": "/abs/refs/room.jpg", "strength": 0.7,
"depth_map": "/abs/refs/room-depth.png" or None}``.

Without ``depth_map`` the model's own depth estimator (the ``depth_estimator/`` folder of a
diffusers SD2-depth model, as the engine loads it) predicts the depth; with it, the map is
passed to StableDiffusionDepth2ImgPipeline as its ``depth_map`` tensor (the pipeline
rescales it to -1..1, so any brightness range works; 16-bit PNGs keep their precision). The
init image is resized to the task's size (A1111's "Just resize").

A model without a depth UNet cannot take ``depth:``: preflight says so and points to a
ControlNet unit with a depth preprocessor (``plugins/controlnet/``: ``preprocessor: depth``
with MiDaS weights, or ``depth_anything`` with a transformers folder), which works with any
SD1.x/SDXL model. ``depth:`` and ``controlnet:`` do not combine (diffusers has no depth
ControlNet pipeline), and ``depth:`` brings its own image, so the task's ``image:``/``mask:``
must not be set. (A depth model with a plain ``image:`` and no ``depth:`` is the core's
img2img on that model, which also uses the model's estimator; a depth model with neither
``depth:`` nor ``image:`` is refused at preflight, at its ``model`` key.) Preflight also
decodes ``image`` and ``depth_map`` once, so a damaged file is an error at its key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from render.api import (
    DEFAULT_STRENGTH,
    FieldContext,
    FieldError,
    checkpoint_info,
    describe,
    expect_file,
    expect_number,
    format_number,
    hookimpl,
    load_image,
    section_axis_label,
)

KEY = "depth"
SECTION_KEYS = ("image", "strength", "depth_map")
PIPELINE = "StableDiffusionDepth2ImgPipeline"


# -- validation (pure Python) -----------------------------------------------------------------

def validate_section(value: Any, ctx: FieldContext) -> dict[str, Any] | None:
    """``depth:`` -> ``{image, strength, depth_map}`` with paths absolute."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FieldError(f"expected a mapping (image, strength, depth_map), got {describe(value)}")
    for key in value:
        if key not in SECTION_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), SECTION_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FieldError(f"unknown key{hint}; depth takes {', '.join(SECTION_KEYS)}",
                             str(key))
    if value.get("image") is None:
        raise FieldError("missing; give the init image path", "image")
    out: dict[str, Any] = {}
    for key, check in (
        ("image", lambda v: expect_file(v, ctx, what="an image path")),
        ("strength", lambda v: expect_number(v, minimum=0, maximum=1)),
        ("depth_map", lambda v: None if v is None else expect_file(v, ctx, what="an image path")),
    ):
        try:
            out[key] = check(value.get(key, DEFAULT_STRENGTH if key == "strength" else None))
        except FieldError as exc:
            raise FieldError(exc.message, key) from None
    if out["strength"] == 0:
        raise FieldError("strength 0 would return the init image unchanged; use 0 < strength"
                         " <= 1", "strength")
    return out


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section, doc="depth-to-image: image, strength, depth_map")


def section(task: Any) -> dict[str, Any] | None:
    return task.sections.get(KEY) or None


# -- preflight --------------------------------------------------------------------------------

@hookimpl
def task_files(task: Any, models: Any) -> dict[str, Any] | None:
    """Check the model has a depth UNet (and an estimator unless a map is given)."""
    depth = section(task)
    if depth is None:
        _check_plain_task(task)
        return None
    if task.sections.get("controlnet"):
        raise FieldError("depth: cannot be combined with controlnet: (diffusers has no depth"
                         " ControlNet pipeline); use a ControlNet unit with preprocessor: depth"
                         " instead of depth:")
    if task.image or task.mask:
        raise FieldError("depth: brings its own image: remove the task's image:/mask: (or drop"
                         " depth: to render image: as img2img with the model's own depth"
                         " estimate)")
    model = task.files.get("model")
    if model is not None and not model.hub:
        channels = _in_channels(model)
        if channels is not None and channels != 5:
            raise FieldError(
                f"model '{task.model}' has no depth UNet (its UNet takes {channels} input"
                f" channels; a depth-to-image UNet takes 5): depth: needs an SD2-depth model"
                f" such as stable-diffusion-2-depth. With this model use a ControlNet unit with"
                f" a depth preprocessor instead, e.g. controlnet: [{{model:"
                f" <a depth ControlNet>, image: {Path(depth['image']).name},"
                f" preprocessor: depth}}]")
        if depth["depth_map"] is None and not _has_estimator(model):
            raise FieldError(
                f"model '{task.model}' comes without a depth estimator (no depth_estimator/"
                " folder in its diffusers folder or config): give depth_map: an image of the"
                " depth (white = near)")
    files = {}
    for key in ("image", "depth_map"):
        if depth[key]:
            try:   # a file that cannot be decoded is refused here, at its key
                files[f"depth:{key}"] = models.file_ref("image", depth[key], depth[key])
            except FieldError as exc:
                raise FieldError(exc.message, key) from None
    return files


def _check_plain_task(task: Any) -> None:
    """A depth model (5-channel UNet) without ``depth:`` renders only from an ``image:`` (the
    core's img2img on it); text alone would fail at render time, after the model loaded."""
    model = task.files.get("model")
    if model is None or model.hub or task.image or task.sections.get("controlnet"):
        return
    if _in_channels(model) == 5:
        raise FieldError(
            f"model '{task.model}' is a depth-to-image model (its UNet takes 5 input channels:"
            " latents and depth), which renders only from an image: add depth: {image: ...}"
            " (or image: ...), or use a text-to-image model", key="model")


def _in_channels(model: Any) -> int | None:
    """The UNet's input channels: from resolve_model's extra, else unet/config.json or the
    single file's tensor shapes."""
    channels = (model.extra or {}).get("in_channels")
    if channels:
        return int(channels)
    try:
        return checkpoint_info(model.path).in_channels
    except (FieldError, OSError, ValueError):
        return None


def _has_estimator(model: Any) -> bool:
    """Whether the model's diffusers folder (or a single file's config folder) has one."""
    folders = [Path(model.path)]
    config = (model.extra or {}).get("config")
    if config:
        folders.append(Path(config))
    return any((f / "depth_estimator" / "config.json").is_file() for f in folders if f.is_dir())


# -- plan and render --------------------------------------------------------------------------

@hookimpl
def group_key(task: Any) -> Any:
    """One call takes one strength and one depth map (or none) for all its images."""
    depth = section(task)
    if depth is None:
        return None
    return (KEY, float(depth["strength"]), depth["depth_map"])


@hookimpl
def pipeline_class(task: Any, family: str) -> str | None:
    return PIPELINE if section(task) is not None else None


@hookimpl
def task_inputs(task: Any, pipe: Any) -> dict[str, Any] | None:
    """The init image (one per task), the strength and the depth map (shared by the batch,
    passed once by the engine because every task gets the same object)."""
    depth = section(task)
    if depth is None:
        return None
    inputs: dict[str, Any] = {
        "image": load_image(depth["image"], task.width, task.height),
        "strength": float(depth["strength"]),
    }
    if depth["depth_map"]:
        inputs["depth_map"] = depth_tensor(depth["depth_map"])
    return inputs


_LOCK = threading.Lock()
_MAPS: OrderedDict[tuple[str, int, int], Any] = OrderedDict()


def depth_tensor(path: str) -> Any:
    """A depth map file as a float tensor (1, H, W), cached by (path, size, mtime)."""
    import numpy as np
    import torch
    from PIL import Image

    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _MAPS:
            _MAPS.move_to_end(key)
            return _MAPS[key]
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float maps
            array = np.asarray(im, dtype=np.float32)
        else:
            array = np.asarray(im.convert("L"), dtype=np.float32)
    tensor = torch.from_numpy(array.copy())[None]
    with _LOCK:
        _MAPS[key] = tensor
        while len(_MAPS) > 8:
            _MAPS.popitem(last=False)
    return tensor


# -- write ------------------------------------------------------------------------------------

@hookimpl
def result_metadata(task: Any, result: Any) -> dict[str, str] | None:
    """A1111's ``Denoising strength`` (depth-to-image is img2img on a depth model there)."""
    depth = section(task)
    if depth is None:
        return None
    return {"Denoising strength": format_number(depth["strength"])}


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "Depth", {"strength": "Denoising", "image": "Depth image"})
