"""The ``controlnet:`` section: its validation, a task's units, and the labels of their files.

Pure Python (no torch): validation and ``--dry-run`` run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from render.api import (
    FieldContext,
    FieldError,
    describe,
    expect_bool,
    expect_file,
    expect_int,
    expect_number,
    expect_str,
)

from .preprocessors import ALIASES, ALL_PARAMS, PREPROCESSORS, Param, Preprocessor

KEY = "controlnet"
UNIT_KEYS = ("model", "image", "preprocessor", "scale", "start", "end", "resolution",
             "resize_mode")
DEFAULTS: dict[str, Any] = {"preprocessor": "none", "scale": 1.0, "start": 0.0, "end": 1.0,
                            "resolution": 512, "resize_mode": "Crop and Resize"}

#: A1111's resize modes and the short names accepted for them.
RESIZE_MODES = {
    "crop and resize": "Crop and Resize", "crop": "Crop and Resize",
    "inner fit (scale to fit)": "Crop and Resize",
    "just resize": "Just Resize", "resize": "Just Resize", "stretch": "Just Resize",
    "resize and fill": "Resize and Fill", "fill": "Resize and Fill",
    "outer fit (shrink to fit)": "Resize and Fill",
}


# -- validation -------------------------------------------------------------------------------

def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_preprocessor(name: str) -> Preprocessor:
    """The preprocessor a user's name means (A1111 names, labels and aliases accepted)."""
    key = name.strip()
    key = ALIASES.get(key, ALIASES.get(key.lower(), key.lower()))
    if key not in PREPROCESSORS:
        raise FieldError(f"unknown preprocessor {name!r}"
                         + _did_you_mean(name, [*PREPROCESSORS, *ALIASES])
                         + f"; one of {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[key]


def _unit(raw: Any, ctx: FieldContext, prefix: str) -> dict[str, Any]:
    """One normalised unit; ``prefix`` ("0." or "") makes error subkeys point into it."""

    def fail(message: str, key: str = "") -> FieldError:
        return FieldError(message, (prefix + key) if key else prefix.rstrip("."))

    if not isinstance(raw, Mapping):
        raise fail(f"expected a mapping (model, image, preprocessor, ...), got {describe(raw)}")
    for key in raw:
        if key not in UNIT_KEYS and key not in ALL_PARAMS:
            raise fail("unknown key" + _did_you_mean(str(key), [*UNIT_KEYS, *ALL_PARAMS]),
                       str(key))
    for key in ("model", "image"):
        if raw.get(key) is None:
            what = "a ControlNet model name" if key == "model" else "the control image path"
            raise fail(f"missing; give {what}", key)

    def field(key: str, check: Any, default: Any = None) -> Any:
        try:
            return check(raw.get(key, DEFAULTS.get(key, default)))
        except FieldError as exc:
            raise fail(exc.message, key) from None

    unit: dict[str, Any] = {
        "model": field("model", lambda v: expect_str(v, what="a ControlNet model name",
                                                     allow_empty=False)),
        # an image, an animation or video, or a folder of frames
        "image": field("image", lambda v: expect_file(v, ctx, what="an image path",
                                                      folders=True)),
    }
    spec = field("preprocessor", lambda v: resolve_preprocessor(
        expect_str(v, what="a preprocessor name", allow_empty=False)))
    unit["preprocessor"] = spec.name
    unit["scale"] = field("scale", lambda v: expect_number(v, minimum=0, maximum=2))
    unit["start"] = field("start", lambda v: expect_number(v, minimum=0, maximum=1))
    unit["end"] = field("end", lambda v: expect_number(v, minimum=0, maximum=1))
    if unit["start"] >= unit["end"]:
        raise fail(f"start ({unit['start']}) must be less than end ({unit['end']})", "start")
    unit["resolution"] = field("resolution", lambda v: expect_int(v, minimum=64, maximum=8192))
    unit["resize_mode"] = field("resize_mode", _resize_mode)
    for param in spec.params:
        unit[param.name] = field(param.name, lambda v, p=param: _param(v, p), param.default)
    return unit


def _resize_mode(value: Any) -> str:
    text = expect_str(value, what="a resize mode", allow_empty=False)
    mode = RESIZE_MODES.get(text.strip().lower())
    if mode is None:
        raise FieldError(f"expected crop, resize or fill (A1111: Crop and Resize, Just Resize,"
                         f" Resize and Fill), got {describe(value)}")
    return mode


def _param(value: Any, param: Param) -> float:
    if param.integer:
        return expect_int(value, minimum=int(param.minimum), maximum=int(param.maximum))
    return expect_number(value, minimum=param.minimum, maximum=param.maximum)


def validate_section(value: Any, ctx: FieldContext) -> list[dict[str, Any]]:
    """``controlnet:`` -> a list of normalised units (a single mapping is one unit)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [_unit(value, ctx, "")]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_unit(item, ctx, f"{i}.") for i, item in enumerate(value)]
    raise FieldError(f"expected a list of ControlNet units (or one mapping), got "
                     f"{describe(value)}")


def validate_save_control(value: Any, ctx: FieldContext) -> bool:
    """``output.save_control``: save each unit's control image beside the output."""
    return expect_bool(value)


# -- a task's units and the labels of their files in task.files ------------------------------

def units(task: Any) -> list[dict[str, Any]]:
    return list(task.sections.get(KEY) or [])


def active_units(task: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, unit) of the units that act: scale 0 is the same as no unit at all."""
    return [(i, u) for i, u in enumerate(units(task)) if float(u["scale"]) != 0.0]


def model_label(index: int) -> str:
    """The ``task.files`` label of unit ``index``'s ControlNet."""
    return f"controlnet:{index}"


def image_label(index: int) -> str:
    """The ``task.files`` label of unit ``index``'s control image (before preprocessing)."""
    return f"controlnet:{index}:image"


def annotator_label(index: int, weight: str = "") -> str:
    """The ``task.files`` label of one annotator weight of unit ``index`` (``weight=""``:
    the prefix all of them share)."""
    return f"controlnet:{index}:annotator:{weight}"
