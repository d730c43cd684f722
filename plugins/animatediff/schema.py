"""The ``animatediff:`` section: its keys, defaults, and the prompt-travel forms.

``task.sections["animatediff"]`` is always the full mapping::

    {"motion_module": "mm_sd_v15_v2", "frames": 16, "fps": 8.0, "loop": True,
     "context": None | {"length": 16, "stride": 4}, "prompt_travel": None | {0: "...", 8: "..."},
     "motion_lora": {"zoom_in": 0.8}, "decode_chunk_size": 16, "free_init": 0,
     "split": True}

A grid axis names a key (``animatediff.frames: [16, 32]``, ``animatediff.context.stride``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from render.api import FieldError, describe, expect_bool, expect_int, expect_number, expect_str

KEY = "animatediff"
#: The most frames one animation may have (a typo of 10000 would run for days).
MAX_FRAMES = 1024
DEFAULTS: dict[str, Any] = {
    "frames": 16, "fps": 8.0, "loop": True, "context": None, "prompt_travel": None,
    "motion_lora": {}, "decode_chunk_size": 16, "free_init": 0, "split": True,
}
KEYS = ("motion_module", *DEFAULTS)
#: A1111 sd-webui-animatediff's prompt travel: ``<frame>: <prompt>`` lines in the prompt.
_TRAVEL_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


def validate_section(value: Any, ctx: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"motion_module": value}
    if not isinstance(value, Mapping):
        raise FieldError(f"expected a mapping (motion_module, frames, fps, ...) or a motion "
                         f"module name, got {describe(value)}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise FieldError(f"unknown key; expected one of {', '.join(KEYS)}", str(unknown[0]))
    if value.get("motion_module") is None:
        raise FieldError("missing: name the motion module (a file or MotionAdapter folder in "
                         "models/animatediff_models/ or models/AnimateDiff/)", "motion_module")
    out = dict(DEFAULTS)
    out["motion_module"] = _sub("motion_module", lambda v: expect_str(
        v, what="a motion module name", allow_empty=False), value["motion_module"])
    for key, check in (
        ("frames", lambda v: expect_int(v, minimum=1, maximum=MAX_FRAMES)),
        ("fps", lambda v: float(expect_number(v, minimum=0.1, maximum=240))),
        ("loop", expect_bool),
        ("context", _context),
        ("prompt_travel", _travel),
        ("motion_lora", _motion_loras),
        ("decode_chunk_size", lambda v: expect_int(v, minimum=1, maximum=MAX_FRAMES)),
        ("free_init", lambda v: expect_int(v, minimum=0, maximum=10)),
        ("split", expect_bool),
    ):
        if key in value:
            out[key] = _sub(key, check, value[key])
    return out


def _sub(key: str, check: Any, value: Any) -> Any:
    """Run ``check``; a FieldError is reported under ``animatediff.<key>[.<subkey>]``."""
    try:
        return check(value)
    except FieldError as exc:
        raise FieldError(exc.message, f"{key}.{exc.subkey}" if exc.subkey else key) from None


def _context(value: Any) -> dict[str, int] | None:
    """FreeNoise's sliding windows: ``{length, stride}`` (``length`` alone: stride 4)."""
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"length": value}
    if not isinstance(value, Mapping):
        raise FieldError(f"expected {{length: 16, stride: 4}}, got {describe(value)}")
    unknown = [k for k in value if k not in ("length", "stride")]
    if unknown:
        raise FieldError("unknown key; expected length or stride", str(unknown[0]))
    length = _sub("length", lambda v: expect_int(v, minimum=2, maximum=MAX_FRAMES),
                  value.get("length", 16))
    stride = _sub("stride", lambda v: expect_int(v, minimum=1, maximum=MAX_FRAMES),
                  value.get("stride", 4))
    if stride > length:
        raise FieldError(f"stride {stride} is more than the window length {length}: frames "
                         "between windows would get no motion", "stride")
    return {"length": length, "stride": stride}


def _travel(value: Any) -> dict[int, str] | None:
    """``{frame: prompt}``: the prompt at each keyframe (the first must be frame 0)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise FieldError(f"expected a mapping of frame -> prompt, e.g. {{0: 'closed eyes', "
                         f"8: 'open eyes'}}, got {describe(value)}")
    out: dict[int, str] = {}
    for frame, prompt in value.items():
        try:
            index = int(str(frame))
        except ValueError:
            raise FieldError("a keyframe is a frame number (0, 8, 16 ...)", str(frame)) from None
        if index < 0:
            raise FieldError("a keyframe is a frame number >= 0", str(frame))
        out[index] = _sub(str(frame), lambda v: expect_str(v, what="a prompt"), prompt)
    if 0 not in out:
        raise FieldError("the first keyframe must be frame 0 (the prompt the animation "
                         "starts from)")
    return dict(sorted(out.items()))


def _motion_loras(value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, Mapping):
        raise FieldError(f"expected a mapping of motion LoRA name -> weight, got "
                         f"{describe(value)}")
    return {str(name): _sub(str(name), lambda v: float(expect_number(v, minimum=-4, maximum=4)),
                            weight) for name, weight in value.items()}


# -- prompt travel ----------------------------------------------------------------------------

def prompt_travel_lines(prompt: str) -> tuple[str, dict[int, str], str] | None:
    """sd-webui-animatediff's form: head lines, ``<frame>: <prompt>`` lines, tail lines.

    Returns (head, {frame: text}, tail), or None when the prompt has no such line."""
    head: list[str] = []
    frames: dict[int, str] = {}
    tail: list[str] = []
    for line in prompt.splitlines():
        m = _TRAVEL_LINE.match(line)
        if m:
            frames[int(m[1])] = m[2]
        elif line.strip():
            (tail if frames else head).append(line.strip())
    if not frames:
        return None
    return ", ".join(head), frames, ", ".join(tail)


def keyframes(section: Mapping[str, Any], prompt: str) -> dict[int, str] | None:
    """The full prompt of each keyframe, or None without prompt travel: the section's
    ``prompt_travel`` (each value the whole prompt), else the prompt's travel lines (head and
    tail joined around each frame's text, as sd-webui-animatediff does)."""
    if section.get("prompt_travel"):
        return dict(section["prompt_travel"])
    lines = prompt_travel_lines(prompt)
    if lines is None:
        return None
    head, frames, tail = lines
    return {frame: ", ".join(p for p in (head, text, tail) if p)
            for frame, text in sorted(frames.items())}
