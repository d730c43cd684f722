"""The infotext: ``ControlNet <i>`` fields exactly as sd-webui-controlnet writes them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .preprocessors import PREPROCESSORS
from .schema import model_label, units


def infotext_fields(task: Any) -> dict[str, str]:
    """``{"ControlNet <i>": <the unit, JSON-quoted>}`` for every unit (scale 0 ones too)."""
    return {f"ControlNet {i}": json.dumps(infotext_unit(task, i, unit), ensure_ascii=False)
            for i, unit in enumerate(units(task))}


def infotext_unit(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    """One unit as sd-webui-controlnet serialises it (``ControlNetUnit.serialize``)."""
    spec = PREPROCESSORS[unit["preprocessor"]]
    ref = task.files.get(model_label(index))
    if ref is not None:
        path = Path(ref.path)
        stem = path.name if path.is_dir() else path.stem
        digest = (ref.extra or {}).get("a1111_hash") or ref.short_hash[:8]
        model = f"{stem} [{digest}]" if digest else stem
    else:
        model = str(unit["model"])
    # The extension's parser splits on "," and ": ": keep those out of the name.
    model = model.replace(",", " ").replace(": ", " ")
    slots = {"a": 0.5, "b": 0.5}  # the extension's value for a hidden slider
    for param in spec.params:
        slots[param.slot] = unit[param.name]
    values = {
        "Module": spec.label,
        "Model": model,
        "Weight": float(unit["scale"]),
        "Resize Mode": unit["resize_mode"],
        "Processor Res": int(unit["resolution"]),
        "Threshold A": float(slots["a"]),
        "Threshold B": float(slots["b"]),
        "Guidance Start": float(unit["start"]),
        "Guidance End": float(unit["end"]),
        "Pixel Perfect": False,
        "Control Mode": "Balanced",
    }
    return ", ".join(f"{k}: {v}" for k, v in values.items())
