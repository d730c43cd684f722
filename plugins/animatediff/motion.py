"""Motion modules and motion LoRAs: where they live, what they are, how they load.

Motion modules are found where the AnimateDiff tools keep them: ComfyUI's
``models/animatediff_models/`` and ``custom_nodes/ComfyUI-AnimateDiff-Evolved/models/``,
A1111's ``extensions/sd-webui-animatediff/model/`` and ``models/AnimateDiff/``. A module is a
diffusers ``MotionAdapter`` folder or an original single file (``mm_sd_v15_v2.ckpt``,
``v3_sd15_mm.safetensors``, ...).

Detection reads tensor names and shapes only (no torch), as diffusers' single-file code does
(``infer_diffusers_model_type``): a ``mid_block`` motion module means v2, a 24-long position
table means v1, otherwise v3; SDXL modules have three UNet levels where SD1.5's have four
(diffusers asks whether ``up_blocks.2`` is 320 wide). Modules too small to tell by their
levels (the test kit's) may say ``modelspec.architecture`` in their safetensors metadata.

Single files load offline with the MotionAdapter config shipped in ``configs/`` for their
version (diffusers would fetch ``guoyww/animatediff-motion-adapter-v1-5[-2|-3]`` or
``-sdxl-beta`` from the hub), or with a ``MotionAdapter`` folder beside the file with the same
stem, or the ``config:`` of a ``models:`` alias. Pickles are only ever read through torch's
weights-only unpickler (``load_state_dict``); the state dict is handed to
``MotionAdapter.from_single_file`` as a dict.

Motion LoRAs (``v2_lora_ZoomIn.ckpt``) come in the original layout
(``...attention_blocks.0.processor.to_q_lora.down.weight``) or in diffusers' layout
(``unet.`` + the motion module's diffusers names, as ``guoyww/animatediff-motion-lora-*``);
both become peft keys (``unet.<module>.to_q.lora_A.weight``) and load as adapters.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from render.api import (
    FAMILY_NAMES,
    PICKLE_EXTS,
    FieldError,
    ModelKind,
    inert_pickle,
    load_state_dict,
    per_file_version,
    safetensors_metadata,
    tensor_shapes,
)

#: Where the AnimateDiff tools keep motion modules: folders inside ``models/``, and folders
#: next to it (relative to the A1111 / ComfyUI root).
MOTION_MODULE = ModelKind(
    "motion_module",
    folders=("AnimateDiff", "animatediff_models"),
    beside=("custom_nodes/ComfyUI-AnimateDiff-Evolved/models",
            "extensions/sd-webui-animatediff/model"),
    extensions=(".safetensors", ".sft", ".ckpt", ".pth", ".pt"),
    family=True,
    weights_only_pickles=True,
)
#: Motion LoRAs: ComfyUI's ``models/animatediff_motion_lora/`` and AnimateDiff-Evolved's own
#: ``motion_lora/``; sd-webui-animatediff reads them from A1111's ``models/Lora/``.
MOTION_LORA = ModelKind(
    "motion_lora",
    folders=("animatediff_motion_lora", "Lora"),
    beside=("custom_nodes/ComfyUI-AnimateDiff-Evolved/motion_lora",),
    extensions=(".safetensors", ".sft", ".ckpt", ".pth", ".pt"),
    family=True,
    hashes={"lora_hash": "addnet:12", "addnet_hash": "addnet"},
    weights_only_pickles=True,
)

VERSIONS = ("v1", "v2", "v3", "sdxl")
#: Shipped MotionAdapter configs, one folder per version.
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
#: The hub repos diffusers would fetch each version's config from (we never do).
HUB_CONFIGS = {
    "v1": "guoyww/animatediff-motion-adapter-v1-5",
    "v2": "guoyww/animatediff-motion-adapter-v1-5-2",
    "v3": "guoyww/animatediff-motion-adapter-v1-5-3",
    "sdxl": "guoyww/animatediff-motion-adapter-sdxl-beta",
}
#: What each version is called in messages.
VERSION_NAMES = {"v1": "an AnimateDiff v1 (SD1.5)", "v2": "an AnimateDiff v2 (SD1.5)",
                 "v3": "an AnimateDiff v3 (SD1.5)", "sdxl": "an AnimateDiff SDXL-beta"}

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.")
_PE_ORIGINAL = re.compile(r"\.temporal_transformer\.transformer_blocks\.\d+\.attention_blocks"
                          r"\.\d+\.pos_encoder\.pe$")
_PE_DIFFUSERS = re.compile(r"\.motion_modules\.\d+\.transformer_blocks\.\d+\.pos_embed\.pe$")
_WRAPPERS = ("state_dict", "module", "model")


def family_of(version: str) -> str:
    """The checkpoint family a motion module version animates: "sd1" or "sdxl"."""
    if version not in VERSIONS:
        raise ValueError(f"unknown motion module version {version!r}")
    return "sdxl" if version == "sdxl" else "sd1"


def config_dir(version: str) -> Path:
    """The shipped diffusers MotionAdapter config folder of ``version``."""
    family_of(version)
    return CONFIG_ROOT / version


# -- reading ----------------------------------------------------------------------------------

def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single weight file, without torch and without running code
    (remembered per file version: preflight asks for every task, and reading an original
    ``.ckpt`` reads the whole pickle; do not change the dict).

    FieldError (naming the file) for an unreadable file or a pickle naming globals a weights
    file never holds (it would run code: torch's weights-only unpickler refuses it too)."""
    try:
        return _shapes(Path(path))
    except OSError as exc:   # gone or unreadable: the stat of the per-version cache
        raise FieldError(f"{path}: not a readable weight file ({type(exc).__name__}: {exc})"
                         ) from None


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        if path.suffix.lower() in PICKLE_EXTS:
            obj, foreign = inert_pickle(path)
            if foreign:
                raise FieldError(
                    f"{path}: this pickle names {', '.join(sorted(set(foreign))[:3])}, which a"
                    " weights file never holds (loading it could run code), so render refuses"
                    " it; use a .safetensors copy from a source you trust")
            obj = _unwrap(obj)
            if not isinstance(obj, Mapping):
                raise FieldError(f"{path}: the pickle holds no state dict")
            return {str(k): tuple(v) for k, v in obj.items() if isinstance(v, tuple)}
        return tensor_shapes(path)
    except FieldError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged or foreign file, said plainly
        raise FieldError(f"{path}: not a readable weight file ({type(exc).__name__}: {exc})"
                         ) from None


_shapes = per_file_version(_read_shapes)


def _folder_weights(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FieldError(f"{folder}: cannot read config.json ({exc})") from None
    if not isinstance(data, dict):
        raise FieldError(f"{folder}: config.json is not a mapping")
    return data


def _what_else(names: list[str]) -> str:
    """What a file with no motion modules is, for the message."""
    def has(*parts: str) -> bool:
        return any(p in k for k in names for p in parts)

    if has("controlnet_cond_embedding"):
        return "a SparseCtrl / ControlNet model"
    if has("lora_unet_", "lora_te", ".lora_A.", ".lora_down.", "lora.down", "_lora."):
        return "a LoRA (an image LoRA goes under lora:)"
    if has("model.diffusion_model.", "first_stage_model."):
        return "a Stable Diffusion checkpoint"
    if has("conv_in.weight") and has("up_blocks."):
        return "a UNet"
    if has("emb_params", "clip_l", "string_to_param"):
        return "an embedding"
    return "a file without AnimateDiff motion modules"


def _is_lora_name(name: str) -> bool:
    return "_lora." in name or ".lora_" in name or "lora_down" in name or "lora_up" in name


def version_from_shapes(shapes: Mapping[str, tuple[int, ...]],
                        meta: Mapping[str, str] | None = None,
                        where: str | Path = "the motion module") -> str:
    """v1 | v2 | v3 | sdxl from tensor names and shapes of a motion module (original or
    diffusers names); ``meta`` is the safetensors metadata, ``where`` names it in errors."""
    meta = meta or {}
    names = list(shapes)
    motion = [k for k in names if ".motion_modules." in f".{k}"]
    if not motion:
        raise FieldError(f"{where} is {_what_else(names)}, not an AnimateDiff motion module")
    if any(_is_lora_name(k) for k in motion):
        raise FieldError(f"{where} is a motion LoRA, not a motion module (motion LoRAs go"
                         " under motion_lora:)")
    pes = [(k, v) for k, v in shapes.items() if _PE_ORIGINAL.search(k) or _PE_DIFFUSERS.search(k)]
    if not pes or any(len(v) != 3 for _, v in pes):
        raise FieldError(
            f"{where}: motion modules in an unknown layout (no AnimateDiff position tables"
            " 'pos_encoder.pe'); render knows AnimateDiff v1, v2, v3 and SDXL-beta modules."
            " For another layout convert it to a diffusers MotionAdapter folder")
    seq_len = max(v[1] for _, v in pes)
    levels: set[int] = set()
    for k in motion:
        m = _BLOCK.match(k)
        if m and m[1] == "down_blocks":
            levels.add(int(m[2]))
    family = _metadata_family(meta)
    if family is None:
        if len(levels) == 3:
            family = "sdxl"
        elif len(levels) == 4:
            family = "sd1"
        else:  # diffusers' own test: SDXL's third up level is 320 wide, SD1.5's 640
            norm = shapes.get("up_blocks.2.motion_modules.0.temporal_transformer.norm.weight"
                              ) or shapes.get("up_blocks.2.motion_modules.0.norm.weight")
            family = "sdxl" if norm and norm[-1] == 320 else "sd1"
    if family == "sdxl":
        return "sdxl"
    if any(k.startswith("mid_block.motion_modules.") for k in motion):
        return "v2"
    return "v1" if seq_len == 24 else "v3"


def _metadata_family(meta: Mapping[str, str]) -> str | None:
    """ModelSpec's ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/...``)."""
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if not arch:
        return None
    if "xl" in arch:
        return "sdxl"
    if "stable-diffusion-v1" in arch or arch.startswith(("sd1", "sd-1", "sd15")):
        return "sd1"
    return None


def detect_version(path: str | Path) -> str:
    """"v1" | "v2" | "v3" | "sdxl" of a motion module file or MotionAdapter folder, read from
    tensor names and shapes (a folder: its config.json), without torch.

    FieldError naming the file for anything that is not a motion module (a LoRA, a motion
    LoRA, a checkpoint, another diffusers model) or a motion module of an unknown layout."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise FieldError(f"{path} is a diffusers pipeline folder, not a motion module")
        if not (path / "config.json").is_file():
            raise FieldError(f"{path}: a folder without config.json is no MotionAdapter")
        config = read_config(path)
        cls = config.get("_class_name")
        if cls != "MotionAdapter":
            raise FieldError(f"{path} is a diffusers {cls or 'model'} folder, not a motion"
                             " module (MotionAdapter)")
        weights = _folder_weights(path)
        if weights is None:
            raise FieldError(f"{path}: a MotionAdapter folder without"
                             " diffusion_pytorch_model.safetensors")
        meta = safetensors_metadata(weights)
        shapes = read_shapes(weights)
        return version_from_shapes(shapes, meta, path)
    if not path.is_file():
        raise FieldError(f"{path}: no such motion module file")
    return version_from_shapes(read_shapes(path), safetensors_metadata(path), path)


def check_module(path: str | Path, *, family: str | None, deep: bool = False) -> str:
    """Preflight of a motion module for a checkpoint of ``family``; returns its version.

    FieldError naming the file: not a motion module, an unknown layout, a module of the wrong
    family ("an AnimateDiff SDXL-beta motion module on an SD 1.x model"). ``deep`` (a run,
    not a dry run) also proves torch's weights-only unpickler accepts a pickle."""
    path = Path(path)
    version = detect_version(path)
    want = family_of(version)
    if family is not None and family != want:
        raise FieldError(
            f"{path} is {VERSION_NAMES[version]} motion module, for {FAMILY_NAMES[want]}"
            f" models; the checkpoint is {FAMILY_NAMES.get(family, family)}: use a"
            f" {'SDXL' if family == 'sdxl' else 'SD1.5'} motion module")
    if deep and path.is_file() and path.suffix.lower() in PICKLE_EXTS:
        _weights_only(path)
    return version


def _weights_only(path: Path) -> dict[str, Any]:
    try:
        return _unwrap(load_state_dict(path, allow_pickle=True))
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, named with the file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FieldError(text if str(path) in text else f"{path}: {text}") from None


# -- configs ----------------------------------------------------------------------------------

def layout_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a MotionAdapter config implies for the shapes (see :func:`layout_from_shapes`)."""
    return {"levels": len(config.get("block_out_channels") or ()),
            "widths": tuple(config.get("block_out_channels") or ()),
            "mid": bool(config.get("use_motion_mid_block")),
            "seq": config.get("motion_max_seq_length", 32),
            "per_block": config.get("motion_layers_per_block", 2)}


def layout_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Levels, widths, mid block, frames and modules per level of a motion module's tensors."""
    widths: dict[int, int] = {}
    per_block: dict[int, set[int]] = {}
    seq = 0
    for k, v in shapes.items():
        m = _BLOCK.match(k)
        if m and m[1] == "down_blocks":
            level = int(m[2])
            per_block.setdefault(level, set()).add(int(m[3]))
            if k.endswith((".norm.weight",)) and len(v) == 1 and int(m[3]) == 0:
                widths[level] = v[0]
        if _PE_ORIGINAL.search(k) or _PE_DIFFUSERS.search(k):
            seq = max(seq, v[1])
    levels = sorted(per_block)
    return {"levels": len(levels), "widths": tuple(widths.get(i, 0) for i in levels),
            "mid": any(k.startswith("mid_block.motion_modules.") for k in shapes),
            "seq": seq, "per_block": len(per_block.get(0, ()))}


def single_file_config(path: str | Path, config: str | Path | None = None) -> Path:
    """The MotionAdapter config folder a single file loads with.

    1. ``config`` (a ``models:`` alias's ``config:``, already resolved to a folder);
    2. a MotionAdapter folder beside the file with the same stem (``x/`` next to ``x.ckpt``);
    3. the shipped config of the file's version, if its shapes match it (else FieldError:
       a non-standard module needs ``config:``)."""
    path = Path(path)
    if config is not None:
        folder = Path(config)
        if not (folder / "config.json").is_file() or \
                read_config(folder).get("_class_name") != "MotionAdapter":
            raise FieldError(f"motion module config {folder}: not a MotionAdapter folder"
                             " (config.json with _class_name MotionAdapter)")
        return folder
    beside = path.with_suffix("")
    if (beside / "config.json").is_file() and \
            read_config(beside).get("_class_name") == "MotionAdapter":
        return beside
    version = detect_version(path)
    folder = config_dir(version)
    want, got = layout_from_config(read_config(folder)), layout_from_shapes(read_shapes(path))
    if want != got:
        raise FieldError(
            f"{path}: {VERSION_NAMES[version]}-like motion module whose layout ({_show(got)})"
            f" matches no shipped config ({version}: {_show(want)}); name its MotionAdapter"
            f" config: models: {{NAME: {{source: {path.name}, config: <MotionAdapter folder>}}}}")
    return folder


def _show(shape: Mapping[str, Any]) -> str:
    return (f"widths {list(shape['widths'])}, {shape['per_block']} per level,"
            f" {'a' if shape['mid'] else 'no'} mid block, {shape['seq']} frames")


# -- loading ----------------------------------------------------------------------------------

def load_motion_adapter(ref: Any, loader: Any) -> Any:
    """The MotionAdapter of ``ref`` (a FileRef of kind motion_module), built once per process
    through ``loader.get`` (the engine's ComponentCache: it also moves it to the device).

    A folder: ``from_pretrained(local_files_only=True)``. A single file: its state dict
    (pickles through torch's weights-only unpickler) into ``from_single_file`` with the
    config from :func:`single_file_config` (``ref.extra["config"]``: an alias's folder)."""
    path = Path(ref.path)
    key = ("motion_adapter", getattr(ref, "sha256", "") or str(path),
           str((getattr(ref, "extra", None) or {}).get("config") or ""))
    return loader.get(key, lambda: build_motion_adapter(
        path, (getattr(ref, "extra", None) or {}).get("config")))


def build_motion_adapter(path: str | Path, config: str | Path | None = None) -> Any:
    """Load a MotionAdapter from a folder or single file, offline, on CPU in fp32."""
    from diffusers import MotionAdapter

    path = Path(path)
    if path.is_dir():
        detect_version(path)
        return MotionAdapter.from_pretrained(str(path), local_files_only=True)
    folder = single_file_config(path, config)
    state = _weights_only(path) if path.suffix.lower() in PICKLE_EXTS else \
        load_state_dict(path, allow_pickle=False)
    return MotionAdapter.from_single_file(state, config=str(folder), local_files_only=True)


# -- motion LoRA ------------------------------------------------------------------------------

_ORIGINAL_RENAMES = ((".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
                     (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
                     (".temporal_transformer", ""))
_PROC = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PEFT = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$")


def motion_lora_key(key: str) -> str:
    """An original or diffusers-layout motion LoRA key -> the peft key diffusers loads."""
    name = key.removeprefix("unet.")
    for old, new in _ORIGINAL_RENAMES:
        name = name.replace(old, new)
    m = _PROC.search(name)
    if m:
        target = "to_out.0" if m[1] == "to_out" else m[1]
        part = "lora_A" if m[2] == "down" else "lora_B"
        name = f"{name[:m.start()]}.{target}.{part}.weight"
    return f"unet.{name}"


def motion_lora_state(path: str | Path) -> dict[str, Any]:
    """The tensors of a motion LoRA as peft keys (``unet.<module>.to_q.lora_A.weight``).

    Original AnimateDiff files (``v2_lora_ZoomIn.ckpt``: ``.processor.to_q_lora.down``, read
    through the weights-only unpickler) and diffusers-layout files (folders with
    ``diffusion_pytorch_model.safetensors`` too) are converted; FieldError for a file that is
    no motion LoRA (an image LoRA, a motion module)."""
    path = Path(path)
    file = _folder_weights(path) if path.is_dir() else path
    if file is None:
        raise FieldError(f"{path}: a folder without diffusion_pytorch_model.safetensors")
    check_motion_lora(file)
    state = _weights_only(file) if file.suffix.lower() in PICKLE_EXTS else \
        load_state_dict(file, allow_pickle=False)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not hasattr(value, "shape"):
            continue
        new = motion_lora_key(str(key))
        if not _PEFT.search(new):
            raise FieldError(f"{path}: motion LoRA key {key!r} is not a LoRA of a motion"
                             " module's attention (to_q/to_k/to_v/to_out)")
        out[new] = value
    return out


def check_motion_lora(path: str | Path) -> None:
    """FieldError naming the file unless it is a motion LoRA (torch-free)."""
    path = Path(path)
    if path.is_dir():
        file = _folder_weights(path)
        if file is None:
            raise FieldError(f"{path}: a folder without diffusion_pytorch_model.safetensors")
        path = file
    names = list(read_shapes(path))
    motion = [k for k in names if ".motion_modules." in f".{k}"]
    if not motion:
        raise FieldError(f"{path} is {_what_else(names)}, not a motion LoRA")
    if not any(_is_lora_name(k) for k in motion):
        raise FieldError(f"{path} is a motion module, not a motion LoRA (motion modules go"
                         " under animatediff: motion_module:)")


def _adapter_name(name: str, path: str | Path) -> str:
    import hashlib

    stem = re.sub(r"[^A-Za-z0-9_]", "_", str(name))
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"motion_{stem}_{digest}"


def apply_motion_loras(pipe: Any, stack: Mapping[str, tuple[str | Path, float]]) -> list[str]:
    """Load the stack's motion LoRAs into ``pipe`` (an AnimateDiff pipeline) as adapters and
    set their weights on the motion modules' layers only; returns the active adapter names.

    A weight of 0 (or an empty stack) switches the motion LoRA layers off: the module's exact
    pixels. Image LoRA adapters on the spatial layers are left as they are, so call this
    after the LoRA plugin has set its stack (its ``set_adapters`` touches every layer).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = pipe.unet
    layers = [(n, m) for n, m in unet.named_modules()
              if isinstance(m, BaseTunerLayer) and ".motion_modules." in f".{n}."]
    present = {a for _, m in layers for a in getattr(m, "lora_A", {})}
    active: dict[str, float] = {}
    for name, (path, weight) in stack.items():
        adapter = _adapter_name(name, path)
        if float(weight) == 0.0:
            continue
        if adapter not in present:
            state = motion_lora_state(path)
            # loading makes the new adapter the only active one on every layer: keep the
            # image LoRAs' layers as the LoRA plugin set them
            others = {n: (list(m.active_adapters), m.disable_adapters)
                      for n, m in unet.named_modules()
                      if isinstance(m, BaseTunerLayer) and ".motion_modules." not in f".{n}."}
            try:
                with warnings.catch_warnings():  # peft: "several adapters" is the point here
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(state, adapter_name=adapter)
            except Exception as exc:
                raise RuntimeError(f"motion LoRA {name!r} ({path}) failed to load into "
                                   f"{type(pipe).__name__}: {exc}") from exc
            for n, m in unet.named_modules():
                if n in others and isinstance(m, BaseTunerLayer):
                    names, disabled = others[n]
                    if names:
                        m.set_adapter(names)
                    m.enable_adapters(not disabled)
            layers = [(n, m) for n, m in unet.named_modules()
                      if isinstance(m, BaseTunerLayer) and ".motion_modules." in f".{n}."]
        active[adapter] = float(weight)
    for _, module in layers:
        names = [a for a in active if a in getattr(module, "lora_A", {})]
        if not names:
            module.enable_adapters(False)
            continue
        module.enable_adapters(True)
        module.set_adapter(names)
        for adapter in names:
            module.set_scale(adapter, active[adapter])
    return list(active)
