"""Reading weight files: headers and shapes without torch, tensors with it.

Validation and ``--dry-run`` read shapes without importing torch: from a safetensors header
(JSON), or from a pickle by an unpickler that builds nothing but shapes. The family of a
model (sd1 / sd2 / sdxl) follows from those shapes. Loading tensors (:func:`load_state_dict`)
imports torch and opens pickles only through torch's weights-only unpickler.
"""

from __future__ import annotations

import collections
import json
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.errors import FieldError, UserError

#: Weight file extensions, in the order a name without extension tries them.
SAFE_EXTS = (".safetensors", ".sft")



PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")



WEIGHT_EXTS = SAFE_EXTS + PICKLE_EXTS



_MAX_HEADER = 100 * 1024 * 1024



# -- headers --------------------------------------------------------------------------------
def header_length(path: Path) -> int:
    with open(path, "rb") as fh:
        raw = fh.read(8)
    if len(raw) != 8:
        raise FieldError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    n = struct.unpack("<Q", raw)[0]
    if n > _MAX_HEADER or n + 8 > path.stat().st_size:
        raise FieldError(f"{path}: not a safetensors file (header length {n} is impossible)")
    return n



def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    path = Path(path)
    n = header_length(path)
    with open(path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise FieldError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise FieldError(f"{path}: not a safetensors file (header is not a mapping)")
    return header



class _Shape(tuple):
    """A tensor stand-in: just its shape."""



class _Stub:
    """Any other object a checkpoint pickles (optimizer state, callbacks): ignored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()



def _rebuild_tensor(storage: Any, offset: Any, size: Any, *rest: Any) -> _Shape:
    return _Shape(tuple(size))



#: Globals a pickled state dict may name (what torch's weights-only unpickler allows).
_SAFE_MODULES = ("collections", "typing", "_codecs", "torch", "torch._utils",
                 "torch.serialization", "torch._tensor")
_SAFE_BUILTINS = ("set", "frozenset", "slice", "bytearray", "complex")


def _safe_global(module: str, name: str) -> bool:
    return (module in _SAFE_MODULES or module == "numpy" or module.startswith("numpy.")
            or (module == "builtins" and name in _SAFE_BUILTINS))


class _ShapeUnpickler(pickle.Unpickler):
    """Reads tensor shapes from a torch pickle without importing or running anything.

    ``find_class`` never imports: it answers with inert stand-ins, so a malicious pickle
    gets no code to run. Only dicts, lists and shapes come out; ``foreign`` lists the
    globals a weights file has no business naming (``posix.system``).
    """

    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self.foreign: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if not _safe_global(module, name):
            self.foreign.append(f"{module}.{name}")
        if (module, name) in (("collections", "OrderedDict"), ("typing", "OrderedDict")):
            return collections.OrderedDict
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return None



def inert_pickle(path: str | Path) -> tuple[Any, list[str]]:
    """The object a torch pickle holds, read without torch and without running anything
    (tensors as shape tuples, any other object inert), and the foreign globals it names.

    Raises ``FieldError`` for a file that is no readable torch pickle.
    """
    path = Path(path)

    def load(fh: Any) -> tuple[Any, list[str]]:
        unpickler = _ShapeUnpickler(fh)
        return unpickler.load(), unpickler.foreign

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    raise ValueError("a zip without data.pkl (a TorchScript file?)")
                with zf.open(member) as fh:
                    return load(fh)
        with open(path, "rb") as fh:  # legacy format: magic, protocol, sys info, then the object
            foreign: list[str] = []
            for _ in range(3):
                foreign += load(fh)[1]
            obj, more = load(fh)
            return obj, foreign + more
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot read this file"
        raise FieldError(f"{path}: cannot read tensor shapes from this pickle ({exc})") from exc


def read_pickle_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a torch pickle checkpoint, read safely (no torch, no code)."""
    path = Path(path)
    obj, _ = inert_pickle(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FieldError(f"{path}: the pickle holds no state dict")
    return {str(k): tuple(v) for k, v in obj.items() if isinstance(v, _Shape)}



def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single weight file (safetensors or pickle)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_EXTS:
        return read_pickle_shapes(path)
    header = read_safetensors_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}



def safetensors_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix.lower() not in SAFE_EXTS:
        return {}
    return dict(read_safetensors_header(path).get("__metadata__") or {})



# -- family detection -----------------------------------------------------------------------
#: The base model families, as messages name them.
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
#: Cross-attention (text-encoder) width -> family.
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_text(families: frozenset[str] | set[str] | str | None) -> str:
    """``"sd1"`` -> ``SD 1.x``; ``{"sd1", "sd2"}`` -> ``SD 1.x/2.x`` (for messages)."""
    if isinstance(families, str) or families is None:
        return FAMILY_NAMES.get(families or "", families or "?")
    if set(families) == {"sd1", "sd2"}:
        return "SD 1.x/2.x"
    ordered = sorted(families, key=lambda f: (f not in FAMILY_NAMES, f))
    return " or ".join(FAMILY_NAMES.get(f, f) for f in ordered)


_UNET = "model.diffusion_model."



@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's structure says about it (no weights read)."""

    family: str
    format: str                  # "diffusers" | "single_file"
    in_channels: int = 4         # 4 plain, 9 inpainting, 5 depth
    context_dim: int | None = None
    width: int | None = None     # first UNet block's channels (320 for real SD)
    pipeline_class: str | None = None  # a diffusers folder's model_index class



def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FieldError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise FieldError(f"{path}: expected a JSON object")
    return data



def _context_of(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None



def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Family and structure of a checkpoint file or diffusers folder, from shapes/configs.

    The rule works for real models (by dimensions) and for the tiny test kit (by structure):
    a second text encoder (``conditioner.embedders.1``, ``label_emb``, ``text_encoder_2``,
    ``addition_embed_type: text_time``) means sdxl; a 5-channel (depth) UNet, an OpenCLIP
    text encoder or a 1024-wide cross-attention context means sd2; anything else is sd1.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_info(path)
    shapes = tensor_shapes(path)
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise FieldError(f"{path}: not a Stable Diffusion checkpoint (no {_UNET}* UNet weights)")
    width, in_ch = int(conv_in[0]), int(conv_in[1])
    context = next(
        (int(s[1]) for k, s in sorted(shapes.items())
         if k.startswith(_UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2),
        None,
    )
    xl = any(
        k.startswith(("conditioner.embedders.1.", _UNET + "label_emb.")) for k in shapes
    )
    openclip = any(k.startswith("cond_stage_model.model.") for k in shapes)
    if xl:
        family = "sdxl"
    elif in_ch == 5 or openclip or context == 1024:
        family = "sd2"
    else:
        family = "sd1"
    return CheckpointInfo(family, "single_file", in_ch, context, width)



def _folder_info(path: Path) -> CheckpointInfo:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FieldError(f"{path}: a folder model needs a diffusers model_index.json")
    index = _read_json(index_file)
    unet_file = path / "unet" / "config.json"
    unet = _read_json(unet_file) if unet_file.is_file() else {}
    context = _context_of(unet.get("cross_attention_dim"))
    in_ch = int(unet.get("in_channels") or 4)
    blocks = unet.get("block_out_channels") or [None]
    has_te2 = bool((index.get("text_encoder_2") or [None])[0])
    if has_te2 or unet.get("addition_embed_type") == "text_time" or context == 2048:
        family = "sdxl"
    elif in_ch == 5 or "depth_estimator" in index or context == 1024:
        family = "sd2"
    else:
        family = "sd1"
    return CheckpointInfo(
        family, "diffusers", in_ch, context, blocks[0], index.get("_class_name")
    )



#: Where a single file keeps its text encoders' layers: CLIP (``...encoder.layers.N.``) and
#: OpenCLIP (``...transformer.resblocks.N.``) under SD1/SD2 and SDXL's prefixes.
_TEXT_LAYER = re.compile(
    r"^((?:cond_stage_model|conditioner\.embedders\.\d+)\..*?(?:layers|resblocks))\.(\d+)\.")


def text_encoder_layers(path: str | Path, config: Path | None = None) -> int | None:
    """The fewest hidden layers among a checkpoint's text encoders: the largest ``clip_skip``
    it can take (SDXL: both encoders must have them). From ``text_encoder*/config.json`` of
    the diffusers folder (or, for a single file, of the ``config`` folder it loads with) and
    from a single file's tensor names; None when neither tells. No torch."""
    path = Path(path)
    counts: list[int] = []
    folder = path if path.is_dir() else config
    try:
        if folder is not None and (folder / "model_index.json").is_file():
            index = _read_json(folder / "model_index.json")
            for name in sorted(k for k in index if k.startswith("text_encoder")):
                file = folder / name / "config.json"
                if (index.get(name) or [None])[0] and file.is_file():
                    layers = _read_json(file).get("num_hidden_layers")
                    if isinstance(layers, int) and not isinstance(layers, bool):
                        counts.append(layers)
        if path.is_file():
            deepest: dict[str, int] = {}
            for key in tensor_shapes(path):
                match = _TEXT_LAYER.match(key)
                if match:
                    prefix, n = match.group(1), int(match.group(2))
                    deepest[prefix] = max(deepest.get(prefix, 0), n + 1)
            counts.extend(deepest.values())
    except (FieldError, OSError):
        return None
    return min(counts) if counts else None


def detect_family(path: str | Path, kind: str = "checkpoint") -> str | None:
    """"sd1", "sd2" or "sdxl" from tensor shapes or configs, never from names.

    For a checkpoint the answer is always one of the three (see :func:`checkpoint_info`).
    For other kinds it is best effort and None when the dimensions are not SD's (a LoRA or
    ControlNet of the tiny kit has 32-wide layers; only structure can place those).
    """
    if kind == "checkpoint":
        return checkpoint_info(path).family
    path = Path(path)
    try:
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                return None
            config = _read_json(config_file)
            if config.get("addition_embed_type") == "text_time":
                return "sdxl"
            return CONTEXT_FAMILY.get(_context_of(config.get("cross_attention_dim")) or 0)
        shapes = tensor_shapes(path)
    except FieldError:
        return None
    if kind == "embedding":
        if "clip_g" in shapes:
            return "sdxl"
        vec = shapes.get("emb_params") or next(iter(shapes.values()), None)
        return {768: "sd1", 1024: "sd2"}.get(vec[-1] if vec else 0)
    if any(("lora_te2_" in k or "text_encoder_2." in k or "label_emb" in k) for k in shapes):
        return "sdxl"
    for key, shape in sorted(shapes.items()):
        if re.search(r"attn2[._]to_k", key) and len(shape) == 2:
            # LoRA down/A: (rank, context); a full weight: (inner, context)
            found = CONTEXT_FAMILY.get(int(shape[1]))
            if found:
                return found
    return None



def prediction_hint(path: str | Path) -> str | None:
    """"v" or "epsilon" when the file says so; None when it cannot be known from the file.

    SD 2.x 768-v and 512-base checkpoints have identical shapes, so shapes cannot decide.
    Read in order: safetensors metadata ``modelspec.prediction_type``, then an A1111-style
    original config ``<stem>.yaml`` beside the file (``parameterization: "v"``).
    """
    path = Path(path)
    if path.is_dir():
        return None
    meta = safetensors_metadata(path)
    value = str(meta.get("modelspec.prediction_type", "")).lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v"
    if value in ("epsilon", "eps"):
        return "epsilon"
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        import yaml

        try:
            config = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        params = (config.get("model") or {}).get("params") or {}
        return "v" if params.get("parameterization") == "v" else "epsilon"
    return None



@contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    """Silence one library logger for a moment (a warning that is noise for us)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)



def check_pickle(path: Path, allowed: bool) -> None:
    """Refuse a pickle unless allowed; when allowed, prove torch's weights-only unpickler
    accepts it before diffusers loads it (diffusers 0.42 also loads with weights_only)."""
    if path.suffix.lower() not in PICKLE_EXTS:
        return
    if not allowed:
        raise UserError(
            f"{path} is a pickle file; render loads pickles only when their models: alias"
            " says allow_pickle: true"
        )
    load_state_dict(path, allow_pickle=True)



def load_state_dict(path: Path, *, allow_pickle: bool) -> dict[str, Any]:
    """Tensors of a single weight file; pickles only via ``torch.load(weights_only=True)``."""
    import zipfile

    import torch

    path = Path(path)
    if path.suffix.lower() not in PICKLE_EXTS:
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise UserError(
            f"{path} is a pickle file; render loads pickles only when their models: alias"
            " says allow_pickle: true"
        )
    try:
        state = torch.load(
            str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, reported plainly
        raise UserError(
            f"{path}: torch's weights-only unpickler refused this file ({exc}); convert it to"
            " .safetensors"
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: the pickle holds no state dict")
    return state
