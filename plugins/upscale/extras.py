"""The ``upscale:`` key: A1111's extras-tab upscale, applied to every rendered image.

Job file::

    upscale: 4x-UltraSharp                     # a file in ESRGAN/ or upscale_models/: 2x
    upscale: {model: RealESRGAN_x4plus, scale: 4, tile: 512, overlap: 32}
    upscale: {model: lanczos, scale: 1.5}      # or nearest: a plain resize, no file
    grid: {upscale.model: [lanczos, RealESRGAN_x4plus], upscale.scale: [2, 4]}

- ``model``: an upscaler file (any architecture spandrel loads; extension optional) or
  ``lanczos`` / ``nearest`` (any case, A1111's ``Lanczos`` / ``Nearest``).
- ``scale`` (default 2, in (0, 8]): the image becomes ``round(w * scale) x round(h * scale)``
  whatever the model's own factor (a 4x model asked for 2x upscales, then resizes down; a 2x
  one asked for 4x runs twice). Default 2, not the extras tab's slider default of 4: it is the
  default of A1111's ``process()`` and its "Simple Upscale", of the hires fix, and the most
  common choice; A1111's rounding (down to a multiple of 8) is not copied: the size is the
  one asked for.
- ``tile`` (default 512, 0 = the whole image at once, else >= 64) and ``overlap`` (default 32,
  less than half the tile): see ``resize``.

Every image of the result (each frame of an animation too) is upscaled. The infotext gets
A1111's ``Postprocess upscale by: 2, Postprocess upscaler: <name>`` (A1111 writes them in
``scripts/postprocessing_upscale.py``; the name is the file's stem, as A1111 lists upscaler
files, or ``Lanczos`` / ``Nearest``). A1111 writes no hash for an upscaler; the file's sha256
is in the task id and the provenance.

``task.sections["upscale"]`` is ``{"model": str, "scale": float, "tile": int, "overlap": int}``
(or None for ``upscale: null``, which turns a default's upscale off).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from render.api import (
    FieldContext,
    FieldError,
    FileRef,
    Result,
    Task,
    expect_int,
    expect_number,
    expect_str,
    format_number,
)

from .resize import MIN_TILE, is_plain, upscale_to
from .schema import expect_section, subfield
from .spandrel_models import UPSCALER, check_file

KEY = "upscale"
LABEL = f"{KEY}:model"
SUBKEYS = ("model", "scale", "tile", "overlap")
DEFAULTS: dict[str, Any] = {"scale": 2.0, "tile": 512, "overlap": 32}
MAX_SCALE = 8
MAX_TILE = 8192
PLAIN_NAMES = {"lanczos": "Lanczos", "nearest": "Nearest"}


def _field(raw: Mapping[str, Any], key: str, check: Any) -> Any:
    return subfield(raw, key, check, DEFAULTS.get(key))


def validate_tiling(raw: Mapping[str, Any]) -> tuple[int, int]:
    """``tile`` (0, or MIN_TILE..MAX_TILE) and ``overlap`` (0 .. less than half the tile)."""
    tile = _field(raw, "tile", lambda v: expect_int(v, minimum=0, maximum=MAX_TILE))
    if 0 < tile < MIN_TILE:
        raise FieldError(f"expected 0 (the whole image at once) or at least {MIN_TILE} "
                         f"pixels, got {tile}", "tile")
    overlap = _field(raw, "overlap", lambda v: expect_int(v, minimum=0, maximum=MAX_TILE))
    if tile and overlap * 2 >= tile:
        raise FieldError(f"must be less than half the tile ({tile}), got {overlap}", "overlap")
    return tile, overlap


def validate_upscale(value: Any, ctx: FieldContext) -> dict[str, Any] | None:
    """``upscale:`` -> ``{"model", "scale", "tile", "overlap"}`` (a bare name: scale 2)."""
    if value is None:
        return None
    value = expect_section(value, SUBKEYS, name_key="model", what="an upscaler name or a "
                           "mapping (model, scale, tile, overlap)")
    if value.get("model") is None:
        raise FieldError("missing; give an upscaler file name, lanczos or nearest", "model")
    model = _field(value, "model", lambda v: expect_str(v, what="an upscaler name",
                                                        allow_empty=False).strip())
    scale = _field(value, "scale", lambda v: expect_number(v, minimum=0, maximum=MAX_SCALE))
    if scale <= 0:
        raise FieldError(f"expected a number in (0, {MAX_SCALE}], got {scale}", "scale")
    tile, overlap = validate_tiling(value)
    return {"model": model, "scale": float(scale), "tile": tile, "overlap": overlap}


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def upscaler_ref(models: Any, name: str, subkey: str = "model") -> FileRef:
    """The upscaler file ``name``, found and checked; FieldError at ``subkey``."""
    try:
        path = Path(models.find(UPSCALER.name, name))
        check_file(path, purpose="upscaler", deep=getattr(models, "deep_checks", False))
    except FieldError as exc:
        raise FieldError(exc.message, subkey) from None
    return models.file_ref(UPSCALER.name, name, path)


def upscale_files(task: Task, models: Any) -> dict[str, FileRef]:
    """``{"upscale:model": FileRef}`` for a model file; nothing for lanczos / nearest."""
    section = task.sections.get(KEY)
    if not section or is_plain(section["model"]):
        return {}
    try:
        return {LABEL: upscaler_ref(models, section["model"])}
    except FieldError as exc:
        raise FieldError(exc.message, exc.subkey, key=KEY) from None


def apply_upscale(result: Result, task: Task, renderer: Any) -> Result:
    """Every image of ``result`` upscaled by the section's scale (frames too)."""
    section = task.sections.get(KEY)
    if not section:
        return result
    ref = None if is_plain(section["model"]) else task.files.get(LABEL)
    if ref is None and not is_plain(section["model"]):
        raise RuntimeError(f"task {task.job}#{task.index}: upscaler {section['model']!r} has "
                           "no file; was the task preflighted?")
    result.images = [
        upscale_to(image, target_size(image.width, image.height, section["scale"]),
                   section["model"], ref, renderer, tile=section["tile"],
                   overlap=section["overlap"])
        for image in result.images]
    return result


def upscaler_name(model: str, ref: FileRef | None) -> str:
    """The name A1111 shows: ``Lanczos`` / ``Nearest``, else the file's stem."""
    if is_plain(model):
        return PLAIN_NAMES[model.strip().lower()]
    return Path(ref.path).stem if ref is not None and not ref.hub else model


def upscale_infotext(task: Task) -> dict[str, str]:
    """A1111's ``Postprocess upscale by`` and ``Postprocess upscaler``."""
    section = task.sections.get(KEY)
    if not section:
        return {}
    return {"Postprocess upscale by": format_number(section["scale"]),
            "Postprocess upscaler": upscaler_name(section["model"], task.files.get(LABEL))}
