"""Validators for the core task keys, and the helpers plugin validators use too.

A validator takes the raw YAML value and a ``FieldContext`` and returns the normalised
value, or raises ``FieldError`` with a message that says what was expected and what was
given. Pure Python: validation never imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.errors import FieldError


@dataclass(frozen=True)
class FieldContext:
    """What a validator may need besides the value: where relative paths start."""

    file: str
    base_dir: Path


Validator = Callable[[Any, FieldContext], Any]

#: The longest prompt or negative prompt, in characters, as written and after wildcards.
#: A1111 prompts are a few hundred to a few thousand characters; 64 Ki leaves room for long
#: generated ones and keeps a pasted file or a runaway wildcard out of the text encoder.
MAX_PROMPT_CHARS = 65_536


def describe(value: Any) -> str:
    """A short, quoted rendering of a bad value for error messages."""
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return repr(text)
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def expect_int(value: Any, *, minimum: int | None = None, maximum: int | None = None,
               what: str = "an integer") -> int:
    """An int (not a bool, not 2.5) within bounds."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise FieldError(f"expected {what}{_bounds(minimum, maximum)}, got {describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise FieldError(f"expected {what}{_bounds(minimum, maximum)}, got {value}")
    return value


def expect_number(value: Any, *, minimum: float | None = None, maximum: float | None = None,
                  what: str = "a number") -> float:
    """An int or float (not a bool, not NaN) within bounds; ints stay ints for the infotext."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise FieldError(f"expected {what}{_bounds(minimum, maximum)}, got {describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise FieldError(f"expected {what}{_bounds(minimum, maximum)}, got {value}")
    return value


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def expect_str(value: Any, *, what: str = "a string", allow_empty: bool = True) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError(f"expected {what}, got {describe(value)}")
    text = str(value)
    if not allow_empty and not text.strip():
        raise FieldError(f"expected {what}, got an empty value")
    return text


def expect_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"expected true or false, got {describe(value)}")
    return value


def expect_file(value: Any, ctx: FieldContext, *, what: str = "a file path",
                folders: bool = False) -> str:
    """A path relative to the job file's folder that must exist (a file, or with
    ``folders`` a folder too); returned absolute."""
    text = expect_str(value, what=what, allow_empty=False)
    path = (ctx.base_dir / text).resolve() if not Path(text).is_absolute() else Path(text)
    if not (path.is_file() or (folders and path.is_dir())):
        raise FieldError(f"file not found: {text} (looked at {path})")
    return str(path)


# -- the core task keys ------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def _dimension(value: Any, what: str) -> int:
    number = expect_int(value, minimum=8, maximum=16384, what=what)
    if number % 8:
        raise FieldError(f"{what} must be a multiple of 8, got {number}")
    return number


def validate_size(value: Any, ctx: FieldContext) -> tuple[int, int]:
    """``512x768``, ``[512, 768]`` or ``512`` (square) -> (width, height)."""
    if isinstance(value, int) and not isinstance(value, bool):
        side = _dimension(value, "a size")
        return side, side
    if isinstance(value, list) and len(value) == 2:
        return _dimension(value[0], "a width"), _dimension(value[1], "a height")
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return (_dimension(int(match.group(1)), "a width"),
                _dimension(int(match.group(2)), "a height"))
    raise FieldError(f"expected a size like 512x768, got {describe(value)}")


def validate_sampler(value: Any, ctx: FieldContext) -> tuple[str, str | None]:
    """An A1111 sampler name, old combined form accepted: -> (sampler, schedule or None)."""
    from render import samplers

    text = expect_str(value, what="a sampler name", allow_empty=False)
    try:
        name, schedule = samplers.parse_sampler(text)
    except ValueError as exc:
        raise FieldError(str(exc)) from None
    explicit = text.strip().lower() != name.lower()
    return name, (schedule if explicit else None)


def validate_schedule(value: Any, ctx: FieldContext) -> str:
    from render import samplers

    text = expect_str(value, what="a schedule type", allow_empty=False)
    try:
        return samplers.parse_schedule(text)
    except ValueError as exc:
        raise FieldError(str(exc)) from None


def _optional_str(value: Any, ctx: FieldContext) -> str | None:
    return None if value is None else expect_str(value, allow_empty=False)


def _text(value: Any, ctx: FieldContext) -> str:
    text = "" if value is None else expect_str(value, what="text")
    if len(text) > MAX_PROMPT_CHARS:
        raise FieldError(f"{len(text):,} characters, more than the {MAX_PROMPT_CHARS:,} a "
                         "prompt may have")
    return text


def _optional_file(value: Any, ctx: FieldContext) -> str | None:
    return None if value is None else expect_file(value, ctx, what="an image path")


def _strength(value: Any, ctx: FieldContext) -> float | None:
    return None if value is None else expect_number(value, minimum=0, maximum=1)


#: Core task keys -> validator. Values here become Task attributes (see ``render.expand``).
CORE_FIELDS: dict[str, Validator] = {
    "prompt": _text,
    "negative": _text,
    "model": lambda v, c: expect_str(v, what="a model name", allow_empty=False),
    "size": validate_size,
    "width": lambda v, c: _dimension(v, "a width"),
    "height": lambda v, c: _dimension(v, "a height"),
    "steps": lambda v, c: expect_int(v, minimum=1, maximum=1000),
    "cfg": lambda v, c: expect_number(v, minimum=0, maximum=100),
    "sampler": validate_sampler,
    "schedule": validate_schedule,
    "clip_skip": lambda v, c: expect_int(v, minimum=1, maximum=12),
    "vae": _optional_str,
    "image": _optional_file,
    "strength": _strength,
    "mask": _optional_file,
}

#: Keys that shape expansion rather than a single task (valid in defaults and in a job).
EXPANSION_KEYS = ("seeds", "seed", "wildcards", "count", "grid", "zip")
#: Keys valid only on a job entry.
JOB_ONLY_KEYS = ("name", "output")
#: Axis-only pseudo keys.
AXIS_ONLY_KEYS = ("prompt_sr",)
