"""ControlNet model files: found and checked at preflight (the model family, A1111's short
hash), loaded offline (a single file gets a synthesised config), and put together into the
``MultiControlNetModel`` of the pipeline class that takes it."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from render.api import (
    CONTEXT_FAMILY,
    FieldError,
    cache_dir,
    checkpoint_info,
    family_text,
    shipped_config_source,
    tensor_shapes,
)

from .schema import model_label

#: Pipeline class by (family is SDXL, task kind).
PIPELINES = {
    (False, "txt2img"): "StableDiffusionControlNetPipeline",
    (False, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (True, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


# -- preflight --------------------------------------------------------------------------------

def controlnet_ref(task: Any, models: Any, index: int, unit: Mapping[str, Any]) -> Any:
    """Unit ``index``'s ControlNet found by name, its FileRef carrying A1111's hash;
    FieldError when it is missing or made for another model family."""
    name = unit["model"]
    try:
        path = Path(models.find("controlnet", name))
    except FieldError as exc:
        raise FieldError(exc.message, f"{index}.model") from None
    ref = models.file_ref("controlnet", name, path)
    problem = _family_problem(name, path, ref, task)
    if problem:
        raise FieldError(problem, f"{index}.model")
    return ref


def _signature(path: Path) -> tuple[int | None, bool] | None:
    """A ControlNet's (cross-attention width, SDXL text_time conditioning), from its config or
    tensor names; None when they cannot be read."""
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            context = config.get("cross_attention_dim")
            if isinstance(context, list):
                context = context[0] if context else None
            return (int(context) if context else None,
                    config.get("addition_embed_type") == "text_time")
        shapes = tensor_shapes(path)
    except (OSError, ValueError, FieldError):
        return None
    context = next((int(s[1]) for k, s in sorted(shapes.items())
                    if k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    text_time = any("label_emb." in k or k.startswith("add_embedding.") for k in shapes)
    if context is None and not text_time:
        return None
    return context, text_time


def _family_problem(name: str, path: Path, ref: Any, task: Any) -> str | None:
    """Why this ControlNet cannot steer the task's model, or None when it fits."""
    model = task.files.get("model")
    cn = _signature(path)
    if model is None or model.hub or cn is None:
        return None
    try:
        info = checkpoint_info(model.path)
    except (FieldError, OSError, ValueError):
        return None
    model_xl = model.family == "sdxl"
    context, text_time = cn
    if text_time == model_xl and (context is None or info.context_dim is None
                                  or context == info.context_dim):
        return None
    cn_family = "sdxl" if text_time else ref.family or CONTEXT_FAMILY.get(context or 0)
    cn_name = family_text(cn_family or {"sd1", "sd2"})
    model_name = family_text(model.family)
    widths = ""
    if context and info.context_dim:
        widths = (f" (its cross-attention is {context} wide, the model's"
                  f" {info.context_dim})")
    return (f"ControlNet '{name}' is made for {cn_name}, but model '{task.model}' is"
            f" {model_name}{widths}: use a ControlNet made for {model_name}")


# -- the resolved file ------------------------------------------------------------------------

def model_identity(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    """The resolved file (two job files may mean different files by one name)."""
    ref = task.files.get(model_label(index))
    return str(ref.path) if ref is not None else str(unit["model"])


def _model_path(task: Any, index: int) -> str:
    ref = task.files.get(model_label(index))
    if ref is None:
        raise RuntimeError(f"task {task.job}#{task.index}: ControlNet unit {index} was not "
                           "resolved (preflight runs the task_files hook first)")
    return str(ref.path)


# -- loading ----------------------------------------------------------------------------------

def multi_controlnet(task: Any, acting: Sequence[tuple[int, Mapping[str, Any]]],
                     loader: Any) -> Any:
    """A ``MultiControlNetModel`` of the acting units, cached in the engine's ``loader`` (so
    the engine's view is too)."""
    paths = tuple(_model_path(task, i) for i, _unit in acting)

    def build_multi() -> Any:
        from diffusers import MultiControlNetModel

        nets = [loader.get(f"controlnet:{p}", lambda p=p: load_controlnet(p, task))
                for p in paths]
        return MultiControlNetModel(nets)

    return loader.get(f"multicontrolnet:{'|'.join(paths)}", build_multi)


def load_controlnet(path: str, task: Any = None) -> Any:
    """A ControlNetModel from a diffusers folder or a single file (offline)."""
    from diffusers import ControlNetModel

    p = Path(path)
    if p.is_dir():
        return ControlNetModel.from_pretrained(str(p), local_files_only=True)
    config = single_file_config(p, task)
    return ControlNetModel.from_single_file(str(p), config=str(config), local_files_only=True)


def single_file_config(path: Path, task: Any) -> Path:
    """A ControlNet config folder for a single file: ``<stem>/config.json`` or
    ``<stem>.json`` beside it, else one made from the task model's UNet config (a ControlNet
    copies the UNet's encoder) with the hint block's channels read from the file."""
    beside = path.with_suffix("")
    if (beside / "config.json").is_file():
        return beside
    config: dict[str, Any] | None = None
    if path.with_suffix(".json").is_file():
        config = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    else:
        config = _config_from_unet(_unet_config(task), tensor_shapes(path))
    blob = json.dumps(config, sort_keys=True, indent=1)
    folder = cache_dir() / "controlnet-configs" / hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        tmp = folder / "config.json.tmp"
        tmp.write_text(blob, encoding="utf-8")
        tmp.replace(folder / "config.json")
    return folder


def _unet_config(task: Any) -> dict[str, Any]:
    model = task.files.get("model") if task is not None else None
    if model is None:
        raise RuntimeError("a single-file ControlNet needs the task's resolved model for its"
                           " config")
    extra = dict(model.extra or {})
    folder = Path(model.path)
    if not folder.is_dir():
        if extra.get("config"):
            folder = Path(extra["config"])
        else:
            folder = shipped_config_source(str(extra.get("shipped_config") or "sd15"))
    return json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))


def _config_from_unet(unet: Mapping[str, Any], shapes: Mapping[str, Any]) -> dict[str, Any]:
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in unet.items() if k in accepted}
    config.update({"_class_name": "ControlNetModel", "in_channels": 4})
    channels = _hint_channels(shapes)
    if channels:
        config["conditioning_embedding_out_channels"] = channels
    return config


def _hint_channels(shapes: Mapping[str, Any]) -> list[int]:
    """The conditioning embedding's channels from diffusers or LDM tensor names."""
    def out(key: str) -> int | None:
        for prefix in ("", "control_model."):
            shape = shapes.get(prefix + key)
            if shape:
                return int(shape[0])
        return None

    first = out("controlnet_cond_embedding.conv_in.weight")
    if first is not None:
        channels, j = [first], 1
        while (c := out(f"controlnet_cond_embedding.blocks.{j}.weight")) is not None:
            channels.append(c)
            j += 2
        return channels
    first = out("input_hint_block.0.weight")
    if first is None:
        return []
    channels, j = [first], 4
    while out(f"input_hint_block.{j + 2}.weight") is not None:
        channels.append(out(f"input_hint_block.{j}.weight") or 0)
        j += 4
    return channels
