"""Upscaler and face-restorer files: found, checked at preflight, loaded once with spandrel.

Two kinds of file, found by the run's resolver like every model (extension optional,
subfolders searched, A1111's folder names first, then ComfyUI's)::

    upscaler       models/ESRGAN, RealESRGAN, SwinIR, DAT, HAT (A1111), upscale_models (ComfyUI)
    face_restorer  models/GFPGAN, Codeformer (A1111), facerestore_models (ComfyUI)

``check_file`` runs at preflight. Without torch (``deep=False``: ``--dry-run``, validation)
it reads only tensor names and shapes (a safetensors header; a pickle through an unpickler
that builds nothing but shapes) and refuses what is clearly no image model: an SD checkpoint,
a LoRA, an embedding, a ControlNet, a VAE, a text encoder, a file with no convolution at
all; and a face restorer (GFPGAN, RestoreFormer, CodeFormer: known by their tensor names)
given as an upscaler, or the reverse. With ``deep=True`` (a real run) it also loads the
weights on the CPU (pickles only through torch's weights-only unpickler: a pickle that would
run code is refused and nothing in it runs) and lets spandrel detect the architecture: one
spandrel does not know, a face model as an upscaler (or the reverse), an inpainting model are
preflight errors. What that loaded is kept (a few files, keyed by path, size and mtime) so
the render stage does not read the file again.

CodeFormer is not in spandrel itself but in spandrel-extra-arches, whose CodeFormer is under a
non-commercial licence; render does not depend on it. Installed, it is used (its
architectures are added to a private copy of spandrel's registry); not installed, a CodeFormer
file is a preflight error that says so.

No torch at import time.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import (
    PICKLE_EXTS,
    FieldError,
    FileRef,
    ModelKind,
    inert_pickle,
    load_state_dict,
    per_file_version,
    tensor_shapes,
)

#: A1111 keeps ``.pth``/``.pt``/``.safetensors`` upscalers (its ESRGAN loader's filter); a name
#: without extension tries safetensors first, so a converted file wins over its pickle.
EXTENSIONS = (".safetensors", ".pth", ".pt")

# Upscalers and face restorers are published as .pth pickles (Real-ESRGAN, GFPGAN): they are
# found without an allow_pickle alias because this plugin reads them only through torch's
# weights-only unpickler (load_state_dict), as A1111 and ComfyUI do.
UPSCALER = ModelKind("upscaler", folders=("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT",
                                          "upscale_models"), extensions=EXTENSIONS,
                     weights_only_pickles=True)
FACE_RESTORER = ModelKind("face_restorer", folders=("GFPGAN", "Codeformer",
                                                    "facerestore_models"),
                          extensions=EXTENSIONS, weights_only_pickles=True)

PURPOSES = ("upscaler", "face")
#: spandrel's purposes for each of ours ("Restoration": a 1x model, e.g. a de-JPEG one).
_SPANDREL_PURPOSES = {"upscaler": ("SR", "Restoration"), "face": ("FaceSR",)}
_WHAT = {"upscaler": "an upscaler", "face": "a face restorer"}

CODEFORMER_MESSAGE = ("CodeFormer needs spandrel-extra-arches (pip install "
                      "spandrel-extra-arches; its licence is non-commercial)")

#: What spandrel supports, briefly, for the "unsupported architecture" message.
SUPPORTED = ("ESRGAN/Real-ESRGAN/BSRGAN, Real-ESRGAN Compact, SwinIR, Swin2SR, HAT, DAT, "
             "OmniSR, SPAN, PLKSR, RealCUGAN, SCUNet, ... (upscalers); GFPGAN 1.3/1.4 (clean), "
             "RestoreFormer (faces); CodeFormer with spandrel-extra-arches")

#: Tensor names spandrel detects the face restorers by (no torch needed to read them).
FACE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "GFPGAN": ("toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight"),
    "RestoreFormer": ("quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight",
                      "encoder.down.0.block.0.norm1.weight", "encoder.conv_out.weight",
                      "decoder.conv_out.weight"),
    "CodeFormer": ("position_emb", "idx_pred_layer.1.weight", "quantize.embedding.weight",
                   "ft_layers.0.self_attn.in_proj_weight", "encoder.blocks.0.weight"),
}
#: The upscalers whose tensor names say their architecture (others: spandrel, in a run).
UPSCALER_SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "ESRGAN": (("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"),
               ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight",
                "conv_last.weight"),
               ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight",
                "conv_last.weight"),
               ("model.0.weight", "model.1.sub.0.RDB1.conv1x1.weight")),
    "Compact": (("body.0.weight", "body.1.weight"),),
}

#: Keys a checkpoint tool wraps a state dict in (as spandrel unwraps them).
_WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model",
             "net")


@dataclass(frozen=True)
class Inspected:
    """What preflight learnt of a file: its architecture (None when only spandrel can tell,
    in a run) and its spandrel purpose."""

    arch: str | None
    purpose: str          # "upscaler" | "face"
    scale: int | None = None


# -- torch-free: names and shapes ----------------------------------------------------------

def canonical_names(obj: Mapping[Any, Any]) -> dict[str, Any]:
    """Unwrap and strip a state dict as spandrel does (``params_ema``, ``module.`` ...)."""
    state: Mapping[Any, Any] = obj
    for key in _WRAPPERS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if len(state) == 1 and isinstance(next(iter(state.values())), Mapping):
        state = next(iter(state.values()))
    names = {str(k): v for k, v in state.items()}
    for prefix in ("module.", "netG."):
        if names and all(k.startswith(prefix) for k in names):
            names = {k[len(prefix):]: v for k, v in names.items()}
    return names


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, canonicalised as spandrel sees the file (no torch, no code)."""
    foreign: list[str] = []
    try:
        if path.suffix.lower() in PICKLE_EXTS:
            obj, foreign = inert_pickle(path)
            shapes: Mapping[Any, Any] = obj if isinstance(obj, Mapping) else {}
        else:
            shapes = tensor_shapes(path)
    except FieldError as exc:
        raise FieldError(f"{path}: not a readable weight file ({_first_line(exc.message)})"
                         ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file, said plainly
        raise FieldError(f"{path}: not a readable weight file ({type(exc).__name__}: "
                         f"{_first_line(str(exc))})") from None
    if foreign:
        raise FieldError(_refusal(path, f"it names {', '.join(sorted(set(foreign))[:3])}, "
                                        "which a weights file never holds"))
    names = canonical_names(shapes)
    return {k: tuple(v) for k, v in names.items() if isinstance(v, tuple)}


def _first_line(text: str) -> str:
    return " ".join((text.strip().splitlines() or [""])[0].split())


def _not_image_model(names: Mapping[str, tuple[int, ...]]) -> str | None:
    """What the file is instead, when its tensor names say it is no image model."""
    keys = list(names)

    def any_start(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def any_in(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if any_start("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                 "conditioner.embedders."):
        return "a Stable Diffusion checkpoint (model.diffusion_model.* tensors)"
    if any_start("lora_unet_", "lora_te", "lora_transformer_") or any_in(
            ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1"):
        return "a LoRA (lora_* tensors)"
    if "emb_params" in names or "string_to_param" in names or any_start("string_to_param.") \
            or set(keys) <= {"clip_l", "clip_g"}:
        return "a textual-inversion embedding"
    if any_start("control_model.", "controlnet_cond_embedding.", "input_hint_block.",
                 "controlnet_down_blocks."):
        return "a ControlNet"
    if any_in("motion_modules."):
        return "an AnimateDiff motion module"
    if any_start("time_embedding.") or any_start("encoder.down_blocks."):
        return "a diffusers UNet or VAE"
    if all(k in names for k in ("encoder.conv_in.weight", "decoder.conv_in.weight",
                                "quant_conv.weight", "post_quant_conv.weight")) \
            and not any_in("quantize"):
        return "a Stable Diffusion VAE"
    if any_start("text_model.", "transformer.text_model."):
        return "a text encoder"
    if not any(len(shape) == 4 for shape in names.values()):
        return "no image model: it has no convolution weights (hypernetwork, embedding, ...?)"
    return None


def _signature_arch(names: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(architecture, purpose) that the tensor names alone say, else (None, None)."""
    for arch, keys in FACE_SIGNATURES.items():
        if all(k in names for k in keys):
            return arch, "face"
    for arch, alternatives in UPSCALER_SIGNATURES.items():
        if any(all(k in names for k in keys) for keys in alternatives):
            return arch, "upscaler"
    return None, None


def extra_arches_installed() -> bool:
    """Whether spandrel-extra-arches can be imported (without importing it, or torch)."""
    return importlib.util.find_spec("spandrel_extra_arches") is not None


def _quick(path: Path, purpose: str) -> Inspected:
    names = read_shapes(path)
    if not names:
        raise FieldError(f"{path}: holds no tensors, so it is not {_WHAT[purpose]}")
    other = _not_image_model(names)
    if other:
        raise FieldError(f"{path} is not {_WHAT[purpose]}: it looks like {other}")
    arch, found = _signature_arch(names)
    if arch == "CodeFormer" and not extra_arches_installed():
        raise FieldError(f"{path} is a CodeFormer face restorer: {CODEFORMER_MESSAGE}")
    if found is not None and found != purpose:
        raise FieldError(_mismatch(path, arch, found, purpose))
    return Inspected(arch, purpose)


def _mismatch(path: Path, arch: str | None, found: str, purpose: str) -> str:
    name = f" ({arch})" if arch else ""
    if found == "face":
        return (f"{path} is a face restorer{name}, not an upscaler: use it with "
                "restore_faces: (in a GFPGAN/, Codeformer/ or facerestore_models/ folder)")
    return (f"{path} is an upscaler{name}, not a face restorer: use it with upscale: "
            "(in an ESRGAN/ or upscale_models/ folder)")


_quick_cached = {p: per_file_version(lambda path, p=p: _quick(Path(path), p)) for p in PURPOSES}


# -- deep: spandrel ------------------------------------------------------------------------

#: Descriptors loaded by a deep check, by (path, size, mtime_ns), for ``load`` to take.
_LOADED: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
#: Deep-check outcomes by (path, size, mtime_ns, purpose): an Inspected or the FieldError.
_DEEP: dict[tuple[str, int, int, str], Inspected | FieldError] = {}
#: Descriptors kept between preflight and render (each holds its weights on the CPU).
MAX_KEPT = 4


def _version(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def registry() -> Any:
    """spandrel's registry, plus spandrel-extra-arches' in a private copy when installed."""
    global _REGISTRY
    if _REGISTRY is None:
        from spandrel import MAIN_REGISTRY

        reg = MAIN_REGISTRY
        try:
            import spandrel_extra_arches
        except ImportError:
            pass
        else:
            reg = MAIN_REGISTRY.copy()
            reg.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
        _REGISTRY = reg
    return _REGISTRY


_REGISTRY: Any = None


def _refusal(path: Path, text: str) -> str:
    """One line for a pickle refused before anything in it ran."""
    reason = next((line.strip() for line in text.splitlines()
                   if "GLOBAL" in line or "global" in line.lower()), None)
    why = (reason or _first_line(text)).rstrip(".")
    return (f"{path}: refused, and nothing in it was run: loading this pickle would run code "
            f"or build objects an upscaler or face-model file never holds ({why}); get a "
            ".safetensors version from a source you trust")


def load_descriptor(path: Path) -> Any:
    """spandrel's descriptor of ``path`` on the CPU in float32 (weights-only for pickles);
    FieldError for a refused pickle or an architecture spandrel does not know."""
    import spandrel
    import torch

    try:
        state = load_state_dict(path, allow_pickle=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, or a damaged file
        raise FieldError(_refusal(path, str(exc))) from None
    state = spandrel.canonicalize_state_dict(state)
    try:
        with torch.no_grad():
            descriptor = registry().load(state)
    except spandrel.UnsupportedModelError:
        raise FieldError(f"{path}: spandrel does not know this model's architecture; it "
                         f"supports {SUPPORTED}") from None
    except Exception as exc:  # noqa: BLE001 - detected, but the tensors do not fit
        raise FieldError(f"{path}: spandrel could not load it ({type(exc).__name__}: "
                         f"{_first_line(str(exc))[:300]})") from None
    return descriptor.eval()


def _deep(path: Path, purpose: str) -> Inspected:
    version = _version(path)
    key = (*version, purpose)
    if key in _DEEP:
        found = _DEEP[key]
        if isinstance(found, FieldError):
            raise FieldError(found.message)
        return found
    try:
        descriptor = _LOADED.get(version) or load_descriptor(path)
        inspected = _describe(path, descriptor, purpose)
    except FieldError as exc:
        _DEEP[key] = exc
        raise
    _LOADED[version] = descriptor
    _LOADED.move_to_end(version)
    while len(_LOADED) > MAX_KEPT:
        _LOADED.popitem(last=False)
    _DEEP[key] = inspected
    return inspected


def _describe(path: Path, descriptor: Any, purpose: str) -> Inspected:
    import spandrel

    arch = str(descriptor.architecture.id)
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise FieldError(f"{path} is {arch}, a {descriptor.purpose} model, not "
                         f"{_WHAT[purpose]}")
    if descriptor.purpose not in _SPANDREL_PURPOSES[purpose]:
        found = "face" if descriptor.purpose == "FaceSR" else "upscaler"
        raise FieldError(_mismatch(path, arch, found, purpose))
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise FieldError(f"{path}: a {arch} model for {descriptor.input_channels}-channel "
                         "images; render upscales RGB (3) or grey (1) images")
    return Inspected(arch, purpose, int(descriptor.scale))


def inspect(path: Path | str, *, purpose: str, deep: bool) -> Inspected:
    """``check_file`` that also says what it found (architecture, spandrel scale)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    path = Path(path)
    if path.is_dir():
        raise FieldError(f"{path} is a folder; {_WHAT[purpose]} is a single file")
    try:
        quick = _quick_cached[purpose](path)
    except OSError as exc:
        raise FieldError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not deep:
        return quick
    return _deep(path, purpose)


def check_file(path: Path, *, purpose: str, deep: bool) -> None:
    """Raise FieldError naming ``path`` when it cannot serve as ``purpose`` ("upscaler" or
    "face"); torch-free unless ``deep`` (see the module docstring)."""
    inspect(path, purpose=purpose, deep=deep)


# -- render --------------------------------------------------------------------------------

def load(ref: FileRef, renderer: Any, *, purpose: str) -> Any:
    """The spandrel ``ImageModelDescriptor`` of ``ref``, loaded once per process (in
    ``renderer.components``), on ``renderer.device``, in ``renderer.dtype`` when the
    architecture supports it (else float32), in eval mode."""

    def build() -> Any:
        path = Path(ref.path)
        _deep(path, purpose)   # the preflight check, remembered; raises what it raised
        descriptor = _LOADED.pop(_version(path), None) or load_descriptor(path)
        descriptor = _cast(descriptor, renderer.dtype).to(renderer.device).eval()
        descriptor.model.requires_grad_(False)
        return descriptor

    return renderer.components.get(("spandrel", purpose, ref.sha256 or ref.path), build)


def _cast(descriptor: Any, dtype: Any) -> Any:
    import torch

    if dtype == torch.float16 and descriptor.supports_half:
        return descriptor.half()
    if dtype == torch.bfloat16 and descriptor.supports_bfloat16:
        return descriptor.bfloat16()
    return descriptor.float()


def native_scale(descriptor: Any) -> int:
    """How many times larger the model's output is than its input (1 for face restorers)."""
    return int(descriptor.scale)
