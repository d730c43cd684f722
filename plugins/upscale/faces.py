"""The ``restore_faces:`` key: a face-restoration model over each rendered image.

Job file::

    restore_faces: GFPGANv1.4                     # a file in GFPGAN/ or facerestore_models/
    restore_faces: {model: RestoreFormer, weight: 0.5}
    grid: {restore_faces.weight: [0, 0.5, 1]}

- ``model``: a face-restorer file spandrel loads: GFPGAN 1.3/1.4 (the "clean" architecture),
  RestoreFormer; CodeFormer with spandrel-extra-arches installed (non-commercial licence).
- ``weight`` (default 1, in [0, 1]): how much of the restored image shows, blended over the
  original (A1111's GFPGAN/CodeFormer "visibility"); 0 leaves the image untouched and loads
  nothing. Default 1: A1111's "Restore faces" checkbox restores at full strength.

What it does, honestly: A1111, ComfyUI's FaceRestore and facexlib first *detect* each face
(RetinaFace), align it to a 512x512 crop by its landmarks, restore the crop and paste it
back. The detector's weights are a download, and render never downloads, so there is no
detection here: the whole image is padded to a square (edge pixels repeated), resized to the
restorer's 512x512 input, restored, resized back and cropped, then blended by ``weight``. It
works as intended on a portrait whose face fills the frame (what these models were trained
on); on a wide shot with small faces the model sees them at the wrong scale and unaligned,
and also "restores" the background: expect little gain or artefacts there, and use a low
weight or none. CodeFormer's own fidelity input is left at its default, 0.5 (A1111's default
CodeFormer weight); ``weight`` is the visibility for every model.

Order (``postprocess``): after the hires fix, before ``upscale:`` (A1111 restores faces as part
of generation; the extras-tab upscale runs on the saved image).

Infotext: A1111 writes ``Face restoration: <restorer>`` (``modules/processing.py``:
``opts.face_restoration_model``, i.e. ``GFPGAN`` or ``CodeFormer``); we write the model's
architecture (``GFPGAN``, ``CodeFormer``, ``RestoreFormer``), and, for a weight other than 1,
its visibility as A1111's extras tab names it (``GFPGAN visibility: 0.5``; A1111's txt2img
writes no weight). Nothing at weight 0 (A1111 skips a restorer at visibility 0).

``task.sections["restore_faces"]`` is ``{"model": str, "weight": float}`` (None for
``restore_faces: null``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render.api import (
    FieldContext,
    FieldError,
    FileRef,
    Result,
    Task,
    expect_number,
    expect_str,
    format_number,
)

from .schema import expect_section, subfield
from .spandrel_models import FACE_RESTORER, inspect, load

KEY = "restore_faces"
LABEL = f"{KEY}:model"
SUBKEYS = ("model", "weight")
DEFAULT_WEIGHT = 1.0
#: The restorers' input: GFPGAN's minimum, CodeFormer's multiple, RestoreFormer's training size.
FACE_SIZE = 512


def validate_restore_faces(value: Any, ctx: FieldContext) -> dict[str, Any] | None:
    """``restore_faces:`` -> ``{"model": str, "weight": float}`` (a bare name: weight 1)."""
    if value is None or value is False:
        return None
    if value is True:
        raise FieldError("name the face restorer: restore_faces: GFPGANv1.4 (a file in "
                         "GFPGAN/ or facerestore_models/), or {model: ..., weight: 0.5}")
    value = expect_section(value, SUBKEYS, name_key="model",
                           what="a face restorer name or a mapping (model, weight)")
    if value.get("model") is None:
        raise FieldError("missing; give a face restorer file name (GFPGANv1.4, ...)", "model")
    model = subfield(value, "model", lambda v: expect_str(v, what="a face restorer name",
                                                          allow_empty=False).strip())
    weight = subfield(value, "weight", lambda v: expect_number(v, minimum=0, maximum=1),
                      DEFAULT_WEIGHT)
    return {"model": model, "weight": float(weight)}


def restore_files(task: Task, models: Any) -> dict[str, FileRef]:
    """``{"restore_faces:model": FileRef}``, the file checked (its architecture in
    ``extra["arch"]`` when its tensor names, or in a run spandrel, tell)."""
    section = task.sections.get(KEY)
    if not section:
        return {}
    name = section["model"]
    try:
        path = Path(models.find(FACE_RESTORER.name, name))
        found = inspect(path, purpose="face", deep=getattr(models, "deep_checks", False))
    except FieldError as exc:
        raise FieldError(exc.message, "model", key=KEY) from None
    ref = models.file_ref(FACE_RESTORER.name, name, path)
    if found.arch:
        import dataclasses

        ref = dataclasses.replace(ref, extra={**ref.extra, "arch": found.arch})
    return {LABEL: ref}


def restore_image(image: Any, descriptor: Any, weight: float) -> Any:
    """One image restored as a whole (see the module docstring), blended by ``weight``."""
    import numpy as np
    import torch
    from PIL import Image

    from .resize import to_image, to_tensor

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if weight <= 0:
        return rgb.copy()
    w, h = rgb.size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    array = np.asarray(rgb)
    square = np.pad(array, ((top, side - h - top), (left, side - w - left), (0, 0)),
                    mode="edge")
    face = Image.fromarray(square)
    if side != FACE_SIZE:
        face = face.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.LANCZOS)
    x = to_tensor(face).to(descriptor.device, descriptor.dtype)
    with torch.inference_mode():
        restored = to_image(descriptor(x).float().cpu())
    if side != FACE_SIZE:
        restored = restored.resize((side, side), Image.Resampling.LANCZOS)
    restored = restored.crop((left, top, left + w, top + h))
    if weight >= 1:
        return restored
    return Image.blend(rgb, restored, weight)


def apply_restore(result: Result, task: Task, renderer: Any) -> Result:
    """Every image of ``result`` (frames too) restored at the section's weight."""
    section = task.sections.get(KEY)
    if not section or section["weight"] <= 0:
        return result
    ref = task.files.get(LABEL)
    if ref is None:
        raise RuntimeError(f"task {task.job}#{task.index}: face restorer "
                           f"{section['model']!r} has no file; was the task preflighted?")
    descriptor = load(ref, renderer, purpose="face")
    result.images = [restore_image(image, descriptor, section["weight"])
                     for image in result.images]
    return result


def restorer_name(task: Task) -> str:
    """The restorer A1111 would name: the architecture, else the name as written."""
    section = task.sections.get(KEY) or {}
    ref = task.files.get(LABEL)
    arch = (ref.extra.get("arch") if ref is not None else None) or None
    return str(arch or section.get("model", ""))


def restore_infotext(task: Task) -> dict[str, str]:
    """``Face restoration: <architecture>`` (and ``<arch> visibility`` below weight 1)."""
    section = task.sections.get(KEY)
    if not section or section["weight"] <= 0:
        return {}
    name = restorer_name(task)
    fields = {"Face restoration": name}
    if section["weight"] < 1:
        fields[f"{name} visibility"] = format_number(round(section["weight"], 3))
    return fields
