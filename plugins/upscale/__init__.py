"""Upscaling after rendering, A1111's hires fix, and face restoration (spandrel models).

Job file::

    upscale: {model: RealESRGAN_x4plus, scale: 2, tile: 512}        # after rendering
    hires: {scale: 2, upscaler: RealESRGAN_x4plus, steps: 10, strength: 0.4}  # second pass
    restore_faces: {model: GFPGANv1.4, weight: 0.5}

Each section acts on the rendered images only (registered ``stage="post"``): tasks that
differ only in them render their first pass once (a grid over upscalers or hires strengths
renders one first pass). ``postprocess`` applies them in A1111's order: the hires fix (part
of generation), face restoration, then the extras tab's upscale.

Upscaler and face-restorer files load with spandrel (as ComfyUI and A1111 >= 1.8 do): any
architecture its main registry knows (ESRGAN/RRDBNet in both key layouts, Real-ESRGAN
Compact, SwinIR, HAT, DAT, SPAN, ...; GFPGAN and RestoreFormer). ``.pth`` files go through
torch's weights-only unpickler: a pickle that would run code is refused and never runs.
CodeFormer needs ``spandrel-extra-arches`` (non-commercial licence), which render does not
install.

The modules: ``spandrel_models`` (the kinds, preflight checks, loading), ``resize`` (tiled
model upscaling and plain resizes), ``extras`` (``upscale:``), ``faces``
(``restore_faces:``), ``hires`` (``hires:``).
"""

from __future__ import annotations

from typing import Any

from render.api import FieldError, hookimpl, raise_all, section_axis_label

from . import extras, faces, hires
from .resize import upscale_to
from .spandrel_models import FACE_RESTORER, UPSCALER

# -- load -------------------------------------------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    register(UPSCALER)
    register(FACE_RESTORER)


@hookimpl
def register_task_fields(register: Any) -> None:
    register(extras.KEY, extras.validate_upscale, stage="post",
             doc="upscale after rendering: model (a file, lanczos, nearest), scale, tile")
    register(hires.KEY, hires.validate_hires, stage="post",
             doc="A1111 hires fix: scale or resize, upscaler, steps, strength, sampler, "
                 "prompt, negative, cfg, checkpoint")
    register(faces.KEY, faces.validate_restore_faces, stage="post",
             doc="face restoration: model (GFPGAN, RestoreFormer ...), weight")


# -- preflight --------------------------------------------------------------------------------

@hookimpl
def task_files(task: Any, models: Any) -> dict[str, Any] | None:
    """The upscaler, hires checkpoint and face-restorer files, each checked; every problem
    of the three sections reported at once."""
    found: dict[str, Any] = {}
    errors: list[FieldError] = []
    for files in (lambda: hires.hires_files(task, models, extras.upscaler_ref),
                  lambda: faces.restore_files(task, models),
                  lambda: extras.upscale_files(task, models)):
        try:
            found.update(files() or {})
        except FieldError as exc:
            errors.extend(getattr(exc, "errors", [exc]))
    raise_all(errors)
    return found or None


# -- post -------------------------------------------------------------------------------------

@hookimpl
def postprocess(result: Any, task: Any, renderer: Any) -> Any:
    """Hires fix, then face restoration, then upscaling (A1111's order)."""
    sections = task.sections
    if not any(sections.get(k) for k in (hires.KEY, faces.KEY, extras.KEY)):
        return None
    if sections.get(hires.KEY):
        result = hires.apply_hires(result, task, renderer, upscale_to)
    if sections.get(faces.KEY):
        result = faces.apply_restore(result, task, renderer)
    if sections.get(extras.KEY):
        result = extras.apply_upscale(result, task, renderer)
    return result


# -- write ------------------------------------------------------------------------------------

@hookimpl
def result_metadata(task: Any, result: Any) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    if task.sections.get(hires.KEY):
        fields.update(hires.hires_infotext(task))
    if task.sections.get(faces.KEY):
        fields.update(faces.restore_infotext(task))
    if task.sections.get(extras.KEY):
        fields.update(extras.upscale_infotext(task))
    return fields or None


@hookimpl
def axis_label(key: str) -> str | None:
    """A1111's names: ``Upscaler``, ``Hires upscaler``, ``Denoising strength`` ..."""
    return (section_axis_label(key, extras.KEY, "Upscale",
                               {"model": "Upscaler", "scale": "Upscale by"})
            or section_axis_label(key, hires.KEY, "Hires",
                                  {"strength": "Denoising strength", "scale": "Hires upscale",
                                   "upscaler": "Hires upscaler", "steps": "Hires steps"})
            or section_axis_label(key, faces.KEY, "Face restoration",
                                  {"weight": "Face restoration weight"}))
