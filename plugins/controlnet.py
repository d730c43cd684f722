"""ControlNet: one or more ``controlnet:`` units steer a txt2img, img2img or inpaint task.

Job file (a list of units, or one mapping for a single unit)::

    controlnet:
      - model: control_v11p_sd15_canny     # a file or diffusers folder in ControlNet/
        image: refs/house.png              # relative to the job file
        preprocessor: canny                # default none: the image is the control image
        low: 100                           # canny only: thresholds (A1111's Threshold A/B)
        high: 200
        scale: 0.8                         # default 1.0 (A1111's Weight)
        start: 0.0                         # default 0.0, 1.0: the part of the steps it acts on
        end: 1.0
        resolution: 512                    # default 512 (A1111's Processor Res)
        resize_mode: crop                  # crop (default) | resize | fill, as A1111

``task.sections["controlnet"]`` is always a list of units with every default filled in and
the preprocessor's settings only, e.g. ``[{"model": "control_v11p_sd15_canny", "image":
"/abs/refs/house.png", "preprocessor": "canny", "scale": 0.8, "start": 0.0, "end": 1.0,
"resolution": 512, "resize_mode": "Crop and Resize", "low": 100, "high": 200}]``. A grid axis
names a unit field: ``controlnet.0.scale: [0, 0.5, 1]`` (``controlnet.scale`` for a single
mapping). A setting of another preprocessor (``low`` with ``preprocessor: mlsd``) is ignored,
so a grid over preprocessors works; a key no preprocessor knows is an error.

Preprocessors (A1111 names and their old aliases): ``none``, ``invert``, ``canny``,
``shuffle`` (seeded with the task's seed), ``lineart_standard`` need no weights; these load
controlnet-aux models from an annotators folder: ``softedge_hed`` (``hed``),
``softedge_hedsafe``, ``scribble_hed``, ``softedge_pidinet`` (``pidi``, ``pidinet``),
``softedge_pidisafe``, ``scribble_pidinet``, ``lineart_realistic`` (``lineart``),
``lineart_coarse``, ``lineart_anime``, ``mlsd``, ``openpose``, ``openpose_hand``,
``openpose_face``, ``openpose_faceonly``, ``openpose_full``, ``depth_midas`` (``depth``),
``normal_midas`` (``normal_map``), ``normal_bae`` (``normal``), ``depth_leres``,
``depth_leres++``, ``depth_zoe``, and ``depth_anything``: any transformers depth-estimation
folder (Depth Anything v1/v2, DPT) named ``depth_anything*`` or ``depth-anything*``.

Where annotator weights go (searched in this order, file names as in the hub repo
``lllyasviel/Annotators``, subfolders allowed): for every ``model_dirs`` entry, its
``annotators/`` (or ``annotator/``, ``ControlNetPreprocessor/``, any case) folder, then
``../extensions/sd-webui-controlnet/annotator/downloads/`` beside it (A1111's extension keeps
``downloads/<module>/<file>`` there), then ComfyUI's
``../custom_nodes/comfyui_controlnet_aux/ckpts/``. A missing file is a preflight error that
names the file, where to download it and where to put it. The files are pickles, read by
controlnet-aux with ``torch.load``, which is weights-only in torch >= 2.6.

Decisions:

- Every unit goes through a ``MultiControlNetModel`` (one unit too): one code path for the
  six SD/SDXL txt2img/img2img/inpaint pipelines. A unit with scale 0 is skipped entirely
  (no model, no preprocessing), so scale 0 renders exactly like no ControlNet; when every
  unit has scale 0 the core's own pipeline renders the task.
- Tasks of a batch share their control images (the group key holds them): diffusers' img2img
  and inpaint ControlNet pipelines take one image per unit for the whole batch. Per-call values
  are returned as the *same* objects for every task of a batch, so the engine passes them once.
- A preprocessed image is cached in-process per (image sha256, preprocessor, settings,
  resolution); grid cells that differ only in scale or prompt preprocess once.
- ``output.save_control: true`` saves each unit's control image beside the output as
  ``<name>-control-<unit>.png``. The hooks only see the task, so this plugin always puts the
  control images into ``result.extras["control-<unit>"]``; the writer saves them only when
  the job's ``output.save_control`` is true.
- Infotext: ``ControlNet <i>: "Module: ..., Model: <stem> [<hash>], Weight: ..."`` with the
  eleven fields of sd-webui-controlnet >= 1.1.44x (``ControlNetUnit.infotext_fields``), values
  formatted as it does (floats as ``1.0``), the model hash being A1111's 8-character
  ``model_hash`` (sha256 of 64 KiB at offset 1 MiB) that the extension shows after model
  names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import (
    CONTEXT_FAMILY,
    FieldContext,
    FieldError,
    ModelKind,
    cache_dir,
    checkpoint_info,
    describe,
    expect_bool,
    expect_file,
    expect_int,
    expect_number,
    expect_str,
    family_text,
    hookimpl,
    shipped_config_source,
    tensor_shapes,
)

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

ANNOTATOR_DIRS = ("annotators", "annotator", "controlnetpreprocessor")
A1111_DOWNLOADS = ("extensions", "sd-webui-controlnet", "annotator", "downloads")
COMFY_CKPTS = ("custom_nodes", "comfyui_controlnet_aux", "ckpts")
ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators"
DEPTH_ANYTHING_EXAMPLE = "https://huggingface.co/LiheYoung/depth-anything-small-hf"

#: Pipeline class by (family is SDXL, task kind).
PIPELINES = {
    (False, "txt2img"): "StableDiffusionControlNetPipeline",
    (False, "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLControlNetPipeline",
    (True, "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}


# -- preprocessors --------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A preprocessor setting; ``slot`` is A1111's Threshold A or B it is written as."""

    name: str
    default: float
    minimum: float
    maximum: float
    slot: str
    integer: bool = False


@dataclass(frozen=True)
class Preprocessor:
    """How to run one preprocessor and which weight files it needs."""

    name: str                      # the key in the task section
    label: str                     # A1111's module name, written in the infotext
    runner: str                    # which function of _RUNNERS runs it
    weights: tuple[str, ...] = ()  # files from lllyasviel/Annotators
    params: tuple[Param, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of the detector
    folder: bool = False           # a transformers folder instead of weight files
    hint: str = ""                 # added to the missing-weights error


_CANNY = (Param("low", 100, 1, 255, "a", True), Param("high", 200, 1, 255, "b", True))
_MLSD = (Param("value_threshold", 0.1, 0.01, 2.0, "a"),
         Param("distance_threshold", 0.1, 0.01, 20.0, "b"))
_LERES = (Param("remove_near", 0, 0, 100, "a", True),
          Param("remove_background", 0, 0, 100, "b", True))
_HED = ("ControlNetHED.pth",)
_PIDI = ("table5_pidinet.pth",)
_LINEART = ("sk_model.pth", "sk_model2.pth")
_POSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_MIDAS = ("dpt_hybrid-midas-501f0c75.pt",)
_LERES_W = ("res101.pth", "latest_net_G.pth")


def _pose(name: str, body: bool, hand: bool, face: bool) -> Preprocessor:
    return Preprocessor(name, name, "openpose", _POSE, (), (
        ("include_body", body), ("include_hand", hand), ("include_face", face)))


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none", "none"),
    Preprocessor("invert", "invert (from white bg & black line)", "invert"),
    Preprocessor("canny", "canny", "canny", params=_CANNY),
    Preprocessor("shuffle", "shuffle", "shuffle"),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)",
                 "lineart_standard"),
    Preprocessor("softedge_hed", "softedge_hed", "hed", _HED),
    Preprocessor("softedge_hedsafe", "softedge_hedsafe", "hed", _HED, (), (("safe", True),)),
    Preprocessor("scribble_hed", "scribble_hed", "hed", _HED, (), (("scribble", True),)),
    Preprocessor("softedge_pidinet", "softedge_pidinet", "pidi", _PIDI),
    Preprocessor("softedge_pidisafe", "softedge_pidisafe", "pidi", _PIDI, (),
                 (("safe", True),)),
    Preprocessor("scribble_pidinet", "scribble_pidinet", "pidi", _PIDI, (),
                 (("scribble", True),)),
    Preprocessor("lineart_realistic", "lineart_realistic", "lineart", _LINEART),
    Preprocessor("lineart_coarse", "lineart_coarse", "lineart", _LINEART, (),
                 (("coarse", True),)),
    Preprocessor("lineart_anime", "lineart_anime", "lineart_anime", ("netG.pth",)),
    Preprocessor("mlsd", "mlsd", "mlsd", ("mlsd_large_512_fp32.pth",), _MLSD),
    _pose("openpose", True, False, False),
    _pose("openpose_hand", True, True, False),
    _pose("openpose_face", True, False, True),
    _pose("openpose_faceonly", False, False, True),
    _pose("openpose_full", True, True, True),
    Preprocessor("depth_midas", "depth_midas", "midas", _MIDAS,
                 hint="; or use preprocessor: depth_anything with a transformers depth folder"),
    Preprocessor("normal_midas", "normal_midas", "midas", _MIDAS,
                 (Param("background_threshold", 0.4, 0.0, 1.0, "a"),),
                 (("depth_and_normal", True),)),
    Preprocessor("normal_bae", "normal_bae", "normal_bae", ("scannet.pt",)),
    Preprocessor("depth_leres", "depth_leres", "leres", _LERES_W, _LERES),
    Preprocessor("depth_leres++", "depth_leres++", "leres", _LERES_W, _LERES,
                 (("boost", True),)),
    Preprocessor("depth_zoe", "depth_zoe", "zoe", ("ZoeD_M12_N.pt",)),
    Preprocessor("depth_anything", "depth_anything", "depth_hf", folder=True),
)}

#: Other names a user may write (A1111's module names, labels and old names).
ALIASES: dict[str, str] = {
    "depth": "depth_midas", "normal_map": "normal_midas", "normal": "normal_bae",
    "hed": "softedge_hed", "hed_safe": "softedge_hedsafe", "pidi": "softedge_pidinet",
    "pidinet": "softedge_pidinet", "pidinet_safe": "softedge_pidisafe",
    "pidinet_scribble": "scribble_pidinet", "lineart": "lineart_realistic",
    "depth-anything": "depth_anything",
    **{p.label: p.name for p in PREPROCESSORS.values() if p.label != p.name},
}
ALL_PARAMS = {param.name for p in PREPROCESSORS.values() for param in p.params}


# -- validation (pure Python) -----------------------------------------------------------------

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
        "image": field("image", lambda v: expect_file(v, ctx, what="an image path")),
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


def _save_control(value: Any, ctx: FieldContext) -> bool:
    return expect_bool(value)


@hookimpl
def register_model_kinds(register: Any) -> None:
    register(ModelKind("controlnet", folders=("ControlNet", "controlnet"), family=True,
                       infotext="ControlNet 0"))
    # Preprocessor weights; found by file name in these folders (see annotator_roots).
    register(ModelKind("annotator", folders=("annotator", "Annotators", "ControlNetPreprocessor")))


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section,
             doc="ControlNet units: model, image, preprocessor, scale, start, end, resolution")
    register("save_control", _save_control, where="output",
             doc="save each ControlNet unit's control image beside the output")


# -- helpers over a task ----------------------------------------------------------------------

def units(task: Any) -> list[dict[str, Any]]:
    return list(task.sections.get(KEY) or [])


def active_units(task: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, unit) of the units that act: scale 0 is the same as no unit at all."""
    return [(i, u) for i, u in enumerate(units(task)) if float(u["scale"]) != 0.0]


def _settings(unit: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    spec = PREPROCESSORS[unit["preprocessor"]]
    return tuple((p.name, unit[p.name]) for p in spec.params)


def _image_identity(task: Any, index: int, unit: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides a unit's control image (besides the task's size)."""
    seed = task.seed if unit["preprocessor"] == "shuffle" else None
    return (_image_sha(task, index, unit), unit["preprocessor"], _settings(unit),
            int(unit["resolution"]), unit["resize_mode"], seed)


# -- preflight --------------------------------------------------------------------------------

@hookimpl
def task_files(task: Any, models: Any) -> dict[str, Any] | None:
    """Find each unit's ControlNet, image and annotator weights; check the model family."""
    found: dict[str, Any] = {}
    if units(task) and task.sections.get("depth"):
        raise FieldError("controlnet: cannot be combined with depth: (diffusers has no depth"
                         " ControlNet pipeline); use a ControlNet unit with preprocessor: depth"
                         " instead of depth:")
    for i, unit in enumerate(units(task)):
        name = unit["model"]
        try:
            path = Path(models.find("controlnet", name))
        except FieldError as exc:
            raise FieldError(exc.message, f"{i}.model") from None
        ref = models.file_ref("controlnet", name, path)
        problem = _family_problem(name, path, ref, task)
        if problem:
            raise FieldError(problem, f"{i}.model")
        found[f"controlnet:{i}"] = dataclasses.replace(
            ref, extra={**dict(ref.extra or {}), "a1111_hash": a1111_model_hash(path)})
        image = Path(unit["image"])
        if not image.is_file():
            raise FieldError(f"file not found: {image}", f"{i}.image")
        found[f"controlnet:{i}:image"] = models.file_ref("image", str(image), str(image))
        spec = PREPROCESSORS[unit["preprocessor"]]
        if spec.runner not in ("none", "invert", "depth_hf") and not _have_aux():
            raise FieldError(f"preprocessor '{spec.name}' needs the controlnet-aux package,"
                             " which is not installed: pip install controlnet-aux",
                             f"{i}.preprocessor")
        try:
            weights = annotator_files(spec, getattr(models, "model_dirs", []))
        except FieldError as exc:
            raise FieldError(exc.message, f"{i}.{exc.subkey}") from None
        for weight, file in weights.items():
            found[f"controlnet:{i}:annotator:{weight}"] = models.file_ref(
                "annotator", weight, str(file))
    return found or None


def _have_aux() -> bool:
    """Whether controlnet-aux is installed (found without importing it: that is slow)."""
    import importlib.util

    return importlib.util.find_spec("controlnet_aux") is not None


def annotator_roots(model_dirs: Sequence[Path | str]) -> list[Path]:
    """The folders searched for annotator weights, in order (existing ones only)."""
    roots: list[Path] = []
    for d in map(Path, model_dirs):
        candidates: list[Path] = []
        if d.is_dir():
            candidates += sorted(c for c in d.iterdir()
                                 if c.is_dir() and c.name.lower() in ANNOTATOR_DIRS)
        candidates += [d.parent.joinpath(*A1111_DOWNLOADS), d.parent.joinpath(*COMFY_CKPTS)]
        for c in candidates:
            if c.is_dir() and c not in roots:
                roots.append(c)
    return roots


def _first_dir(model_dirs: Sequence[Path | str]) -> str:
    return f"{Path(model_dirs[0]) / 'annotators'}/" if model_dirs else \
        "an annotators/ folder in one of model_dirs"


def annotator_files(spec: Preprocessor, model_dirs: Sequence[Path | str]) -> dict[str, Path]:
    """Weight file (or folder) name -> path for ``spec``; FieldError when one is missing."""
    if not spec.weights and not spec.folder:
        return {}
    roots = annotator_roots(model_dirs)
    looked = ", ".join(str(r) for r in roots) or "no annotators folder exists yet"
    if spec.folder:
        folder = _find_depth_folder(roots)
        if folder is None:
            raise FieldError(
                f"preprocessor '{spec.name}' needs a transformers depth-estimation folder"
                f" (config.json, model.safetensors, preprocessor_config.json), e.g. the files of"
                f" {DEPTH_ANYTHING_EXAMPLE}: put them in {_first_dir(model_dirs)}depth_anything/"
                f" (looked in: {looked})", "preprocessor")
        return {folder.name: folder}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for weight in spec.weights:
        hit = _find_file(roots, weight)
        if hit is None:
            missing.append(weight)
        else:
            found[weight] = hit
    if missing:
        if len(missing) == 1:
            what = (f"{missing[0]}: download {ANNOTATORS_REPO}/resolve/main/{missing[0]} and"
                    f" put it in {_first_dir(model_dirs)}")
        else:
            names = ", ".join(missing[:-1]) + f" and {missing[-1]}"
            what = (f"{names}: download them from {ANNOTATORS_REPO}/tree/main and put them in"
                    f" {_first_dir(model_dirs)}")
        raise FieldError(f"preprocessor '{spec.name}' needs {what} (looked in: {looked})"
                         f"{spec.hint}", "preprocessor")
    return found


def _find_file(roots: Sequence[Path], name: str) -> Path | None:
    for root in roots:
        direct = root / name
        if direct.is_file():
            return direct
        hits = sorted(p for p in root.rglob(name) if p.is_file())
        if hits:
            return hits[0]
    return None


def _find_depth_folder(roots: Sequence[Path]) -> Path | None:
    for root in roots:
        for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
            name = folder.name.lower().replace("-", "_")
            if name.startswith("depth_anything") and (folder / "config.json").is_file() and (
                    folder / "preprocessor_config.json").is_file():
                return folder
    return None


def a1111_model_hash(path: Path) -> str:
    """A1111's short ``model_hash`` (sha256 of 64 KiB at offset 1 MiB, 8 hex digits) that
    sd-webui-controlnet writes after a model's name; a folder's largest weight file."""
    path = Path(path)
    if path.is_dir():
        weights = [p for p in path.iterdir() if p.is_file()
                   and p.suffix.lower() in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
        if not weights:
            return ""
        path = max(weights, key=lambda p: (p.stat().st_size, p.name))
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


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


# -- plan -------------------------------------------------------------------------------------

@hookimpl
def group_key(task: Any) -> Any:
    """Tasks of one call share ControlNets, scales, guidance ranges and control images."""
    acting = active_units(task)
    if not acting:
        return None
    return (KEY, tuple((_model_identity(task, i, u), float(u["scale"]), float(u["start"]),
                        float(u["end"]), _image_identity(task, i, u)) for i, u in acting))


def _model_identity(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    """The resolved file (two job files may mean different files by one name)."""
    ref = task.files.get(f"controlnet:{index}")
    return str(ref.path) if ref is not None else str(unit["model"])


# -- render -----------------------------------------------------------------------------------

@hookimpl
def pipeline_class(task: Any, family: str) -> str | None:
    if not active_units(task):
        return None
    return PIPELINES[(family == "sdxl", task.kind)]


@hookimpl
def pipeline_components(task: Any, family: str, loader: Any) -> dict[str, Any] | None:
    """A ``MultiControlNetModel`` of the acting units, cached (so the engine's view is too)."""
    acting = active_units(task)
    if not acting:
        return None
    paths = tuple(_model_path(task, i, u) for i, u in acting)

    def build_multi() -> Any:
        from diffusers import MultiControlNetModel

        nets = [loader.get(f"controlnet:{p}", lambda p=p: load_controlnet(p, task))
                for p in paths]
        return MultiControlNetModel(nets)

    return {"controlnet": loader.get(f"multicontrolnet:{'|'.join(paths)}", build_multi)}


def _model_path(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    ref = task.files.get(f"controlnet:{index}")
    if ref is None:
        raise RuntimeError(f"task {task.job}#{task.index}: ControlNet unit {index} was not "
                           "resolved (preflight runs the task_files hook first)")
    return str(ref.path)


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


@hookimpl
def task_inputs(task: Any, pipe: Any) -> dict[str, Any] | None:
    """Control images and per-unit scales and guidance ranges for the pipeline call.

    Every task of a batch gets the same objects (cached by what decides them), which the
    engine passes once: diffusers wants one list per call, one entry per unit.
    """
    acting = active_units(task)
    if not acting:
        return None
    params = inspect.signature(pipe.__call__).parameters
    if "controlnet_conditioning_scale" not in params:
        raise RuntimeError(f"{type(pipe).__name__} is not a ControlNet pipeline; another "
                           "plugin's pipeline_class answered for a ControlNet task")
    image_key = "image" if task.kind == "txt2img" else "control_image"
    key = (image_key, task.width, task.height,
           tuple((float(u["scale"]), float(u["start"]), float(u["end"]),
                  _image_identity(task, i, u)) for i, u in acting))
    with _LOCK:
        cached = _CALL_INPUTS.get(key)
        if cached is not None:
            _CALL_INPUTS.move_to_end(key)
            return cached
    device = str(getattr(pipe, "device", "cpu"))
    _STATE["device"] = device
    inputs = {
        image_key: [control_image(task, i, u, device) for i, u in acting],
        "controlnet_conditioning_scale": [float(u["scale"]) for _, u in acting],
        "control_guidance_start": [float(u["start"]) for _, u in acting],
        "control_guidance_end": [float(u["end"]) for _, u in acting],
    }
    with _LOCK:
        _CALL_INPUTS[key] = inputs
        while len(_CALL_INPUTS) > 8:
            _CALL_INPUTS.popitem(last=False)
    return inputs


# -- preprocessing ----------------------------------------------------------------------------

_LOCK = threading.RLock()
_CALL_INPUTS: OrderedDict[Any, dict[str, Any]] = OrderedDict()
_PREPROCESSED: OrderedDict[Any, Any] = OrderedDict()
_DETECTORS: dict[Any, Any] = {}
_SHAS: dict[tuple[str, int, int], str] = {}
#: Preprocessed images kept in memory (a 1024x1024 RGB image is 3 MiB).
CACHE_SIZE = 32
#: Counters for tests and diagnostics: preprocessor runs and cache hits.
STATS = {"runs": 0, "hits": 0}
#: The device annotators last ran on (postprocess reuses it after a cache eviction).
_STATE = {"device": "cpu"}


def clear_caches() -> None:
    """Forget preprocessed images, loaded detectors and cached call inputs."""
    with _LOCK:
        _CALL_INPUTS.clear()
        _PREPROCESSED.clear()
        _DETECTORS.clear()
        STATS.update(runs=0, hits=0)


def _image_sha(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    ref = task.files.get(f"controlnet:{index}:image")
    if ref is not None and ref.sha256:
        return str(ref.sha256)
    path = Path(unit["image"])
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHAS:
        _SHAS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHAS[key]


@dataclass(frozen=True)
class Run:
    """One preprocessor run: the input image (PIL RGB) and everything that shapes it."""

    spec: Preprocessor
    image: Any
    settings: Mapping[str, Any]
    resolution: int
    files: Mapping[str, str]   # weight file name (or folder name) -> absolute path
    device: str
    seed: int | None


def preprocessed(task: Any, index: int, unit: Mapping[str, Any], device: str = "cpu") -> Any:
    """The preprocessor's output for a unit (PIL RGB), computed once per image and settings."""
    spec = PREPROCESSORS[unit["preprocessor"]]
    sha, name, settings, resolution, _mode, seed = _image_identity(task, index, unit)
    key = (sha, name, settings, resolution, seed)
    with _LOCK:
        if key in _PREPROCESSED:
            _PREPROCESSED.move_to_end(key)
            STATS["hits"] += 1
            return _PREPROCESSED[key]
    from PIL import Image

    with Image.open(unit["image"]) as im:
        source = _rgb(im)
    run = Run(spec, source, dict(settings), resolution, _files_for(task, index, spec), device,
              seed)
    result = _rgb(_RUNNERS[spec.runner](run))
    with _LOCK:
        STATS["runs"] += 1
        _PREPROCESSED[key] = result
        while len(_PREPROCESSED) > CACHE_SIZE:
            _PREPROCESSED.popitem(last=False)
    return result


def control_image(task: Any, index: int, unit: Mapping[str, Any], device: str = "cpu") -> Any:
    """The image the ControlNet sees: preprocessed, then fitted to the task's size."""
    return fit(preprocessed(task, index, unit, device), task.width, task.height,
               unit["resize_mode"])


def _rgb(image: Any) -> Any:
    """RGB, with transparency composited on white as controlnet-aux's HWC3 does."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def fit(image: Any, width: int, height: int, mode: str) -> Any:
    """Resize to width x height as A1111's resize modes do (crop, stretch, or pad black)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    w, h = image.size
    lanczos = Image.Resampling.LANCZOS
    if mode == "Just Resize":
        return image.resize((width, height), lanczos)
    if mode == "Crop and Resize":
        k = max(width / w, height / h)
        nw, nh = max(width, round(w * k)), max(height, round(h * k))
        resized = image.resize((nw, nh), lanczos)
        left, top = (nw - width) // 2, (nh - height) // 2
        return resized.crop((left, top, left + width, top + height))
    k = min(width / w, height / h)
    nw, nh = max(1, min(width, round(w * k))), max(1, min(height, round(h * k)))
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), lanczos), ((width - nw) // 2, (height - nh) // 2))
    return canvas


def _files_for(task: Any, index: int, spec: Preprocessor) -> dict[str, str]:
    if not spec.weights and not spec.folder:
        return {}
    prefix = f"controlnet:{index}:annotator:"
    files = {label[len(prefix):]: str(ref.path) for label, ref in task.files.items()
             if label.startswith(prefix)}
    if not files or any(w not in files for w in spec.weights):
        raise RuntimeError(f"task {task.job}#{task.index}: the weights of preprocessor "
                           f"'{spec.name}' were not resolved (preflight runs task_files)")
    return files


def _detector(run: Run, make: Any) -> Any:
    """A loaded detector, once per process for its files and device."""
    key = (run.spec.runner, tuple(sorted(run.files.items())), run.device)
    with _LOCK:
        if key not in _DETECTORS:
            detector = make()
            if run.device != "cpu" and hasattr(detector, "to"):
                detector = detector.to(run.device)
            _DETECTORS[key] = detector
        return _DETECTORS[key]


def aux_module(name: str) -> Any:
    """``controlnet_aux.<name>``; importing the package imports every detector, which warns
    about optional extras (mediapipe) and timm names that do not concern us."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"controlnet_aux.{name}")


def _np(image: Any) -> Any:
    import numpy as np

    return np.asarray(image, dtype=np.uint8)


def _run_none(run: Run) -> Any:
    return run.image


def _run_invert(run: Run) -> Any:
    from PIL import ImageOps

    return ImageOps.invert(run.image)


def _run_canny(run: Run) -> Any:
    detector = aux_module("canny").CannyDetector()
    return detector(_np(run.image), low_threshold=int(run.settings["low"]),
                    high_threshold=int(run.settings["high"]), detect_resolution=run.resolution,
                    image_resolution=run.resolution, output_type="pil")


def _run_shuffle(run: Run) -> Any:
    import numpy as np

    detector = aux_module("shuffle").ContentShuffleDetector()
    # controlnet-aux draws from numpy's global generator: seed it, and put it back after.
    state = np.random.get_state()
    np.random.seed(int(run.seed or 0) % 2**32)
    try:
        return detector(_np(run.image), detect_resolution=run.resolution,
                        image_resolution=run.resolution, output_type="pil")
    finally:
        np.random.set_state(state)


def _run_lineart_standard(run: Run) -> Any:
    detector = aux_module("lineart_standard").LineartStandardDetector()
    return detector(_np(run.image), detect_resolution=run.resolution, output_type="pil")


def _aux(run: Run, module: str, cls: str, **names: str) -> Any:
    """A controlnet-aux detector loaded from absolute file paths (``from_pretrained`` joins
    its folder argument with each file name, and an absolute name wins)."""
    def make() -> Any:
        detector_cls = getattr(aux_module(module), cls)
        folder = str(Path(next(iter(run.files.values()))).parent)
        return detector_cls.from_pretrained(
            folder, **{arg: run.files[weight] for arg, weight in names.items()})

    return _detector(run, make)


def _detect(run: Run, detector: Any, **kwargs: Any) -> Any:
    return detector(_np(run.image), detect_resolution=run.resolution,
                    image_resolution=run.resolution, output_type="pil",
                    **dict(run.spec.options), **kwargs)


def _run_hed(run: Run) -> Any:
    return _detect(run, _aux(run, "hed", "HEDdetector", filename="ControlNetHED.pth"))


def _run_pidi(run: Run) -> Any:
    return _detect(run, _aux(run, "pidi", "PidiNetDetector", filename="table5_pidinet.pth"))


def _run_lineart(run: Run) -> Any:
    return _detect(run, _aux(run, "lineart", "LineartDetector", filename="sk_model.pth",
                             coarse_filename="sk_model2.pth"))


def _run_lineart_anime(run: Run) -> Any:
    return _detect(run, _aux(run, "lineart_anime", "LineartAnimeDetector", filename="netG.pth"))


def _run_mlsd(run: Run) -> Any:
    detector = _aux(run, "mlsd", "MLSDdetector", filename="mlsd_large_512_fp32.pth")
    return _detect(run, detector, thr_v=float(run.settings["value_threshold"]),
                   thr_d=float(run.settings["distance_threshold"]))


def _run_openpose(run: Run) -> Any:
    return _detect(run, _aux(run, "open_pose", "OpenposeDetector",
                             filename="body_pose_model.pth", hand_filename="hand_pose_model.pth",
                             face_filename="facenet.pth"))


def _run_midas(run: Run) -> Any:
    detector = _aux(run, "midas", "MidasDetector", filename="dpt_hybrid-midas-501f0c75.pt")
    if "background_threshold" in run.settings:
        _depth, normal = _detect(run, detector, bg_th=float(run.settings["background_threshold"]))
        return normal
    return _detect(run, detector)


def _run_normal_bae(run: Run) -> Any:
    return _detect(run, _aux(run, "normalbae", "NormalBaeDetector", filename="scannet.pt"))


def _run_leres(run: Run) -> Any:
    detector = _aux(run, "leres", "LeresDetector", filename="res101.pth",
                    pix2pix_filename="latest_net_G.pth")
    return _detect(run, detector, thr_a=int(run.settings["remove_near"]),
                   thr_b=int(run.settings["remove_background"]))


def _run_zoe(run: Run) -> Any:
    return _detect(run, _aux(run, "zoe", "ZoeDetector", filename="ZoeD_M12_N.pt"))


@dataclass
class _HFDepth:
    """A transformers depth model with its image processor (moved together)."""

    processor: Any
    model: Any

    def to(self, device: str) -> _HFDepth:
        self.model.to(device)
        return self


def _run_depth_hf(run: Run) -> Any:
    """A transformers depth model (Depth Anything, DPT): relative depth, near = bright."""
    import numpy as np
    import torch
    from PIL import Image

    folder = next(iter(run.files.values()))

    def make() -> _HFDepth:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        return _HFDepth(processor, model.eval())

    estimator = _detector(run, make)
    w, h = run.image.size
    k = run.resolution / min(w, h)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    image = run.image.resize(size, Image.Resampling.LANCZOS) if size != (w, h) else run.image
    model = estimator.model
    pixels = estimator.processor(images=image, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(model.device, next(model.parameters()).dtype)
    with torch.no_grad():
        depth = model(pixel_values=pixels).predicted_depth.float()
        depth = torch.nn.functional.interpolate(depth[:, None], size=(size[1], size[0]),
                                                mode="bicubic", align_corners=False)[0, 0]
    depth = depth - depth.min()
    depth = depth / depth.max().clamp(min=1e-8)
    return Image.fromarray((depth.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8))


_RUNNERS = {
    "none": _run_none, "invert": _run_invert, "canny": _run_canny, "shuffle": _run_shuffle,
    "lineart_standard": _run_lineart_standard, "hed": _run_hed, "pidi": _run_pidi,
    "lineart": _run_lineart, "lineart_anime": _run_lineart_anime, "mlsd": _run_mlsd,
    "openpose": _run_openpose, "midas": _run_midas, "normal_bae": _run_normal_bae,
    "leres": _run_leres, "zoe": _run_zoe, "depth_hf": _run_depth_hf,
}


# -- post and write -------------------------------------------------------------------------

@hookimpl
def postprocess(result: Any, task: Any) -> Any:
    """Control images into ``result.extras`` (``control-<unit>``) for ``save_control``."""
    acting = active_units(task)
    if not acting:
        return None
    for i, unit in acting:
        result.extras[f"control-{i}"] = control_image(task, i, unit, _STATE["device"])
    return result


@hookimpl
def result_metadata(task: Any, result: Any) -> dict[str, str] | None:
    """``ControlNet <i>`` fields exactly as sd-webui-controlnet writes them."""
    fields = {f"ControlNet {i}": json.dumps(infotext_unit(task, i, unit), ensure_ascii=False)
              for i, unit in enumerate(units(task))}
    return fields or None


def infotext_unit(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    """One unit as sd-webui-controlnet serialises it (``ControlNetUnit.serialize``)."""
    spec = PREPROCESSORS[unit["preprocessor"]]
    ref = task.files.get(f"controlnet:{index}")
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
