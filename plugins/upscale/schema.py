"""The shape shared by the three sections' validators: a mapping of known subkeys (or a bare
name), with a did-you-mean for a misspelt subkey and errors located at the subkey."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from render.api import FieldError, describe


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def expect_section(value: Any, subkeys: Sequence[str], *, what: str,
                   name_key: str | None = None) -> Mapping[str, Any]:
    """``value`` as a mapping holding only ``subkeys``; a bare string means
    ``{name_key: value}`` when ``name_key`` is given (``upscale: 4x-UltraSharp``)."""
    if name_key and isinstance(value, str):
        value = {name_key: value}
    if not isinstance(value, Mapping):
        raise FieldError(f"expected {what}, got {describe(value)}")
    for key in value:
        if key not in subkeys:
            raise FieldError("unknown key" + did_you_mean(str(key), subkeys)
                             + f"; expected {', '.join(subkeys)}", str(key))
    return value


def subfield(section: Mapping[str, Any], key: str, check: Callable[[Any], Any],
             default: Any = None) -> Any:
    """``check(section[key])`` (or the default), its error located at ``key``."""
    try:
        return check(section.get(key, default))
    except FieldError as exc:
        raise FieldError(exc.message, key) from None
