"""The preprocessors: what each one is (the ``PREPROCESSORS`` table, A1111's names and
settings, the annotator weights it needs) and the functions that run them.

A runner takes a ``Run`` (the input image, the settings, the weight files, the device) and
returns the control image; detectors that load weights are loaded once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import FieldError

# -- the table --------------------------------------------------------------------------------

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
    runner: str                    # which function of RUNNERS runs it
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


# -- what a run needs -------------------------------------------------------------------------

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


#: Runners that need no controlnet-aux.
_WITHOUT_AUX = ("none", "invert", "depth_hf")


def require_aux(spec: Preprocessor) -> None:
    """FieldError (subkey ``preprocessor``) when ``spec`` needs controlnet-aux and it is not
    installed."""
    if spec.runner not in _WITHOUT_AUX and not _have_aux():
        raise FieldError(f"preprocessor '{spec.name}' needs the controlnet-aux package,"
                         " which is not installed: pip install controlnet-aux", "preprocessor")


def _have_aux() -> bool:
    """Whether controlnet-aux is installed (found without importing it: that is slow)."""
    import importlib.util

    return importlib.util.find_spec("controlnet_aux") is not None


_LOCK = threading.RLock()
_DETECTORS: dict[Any, Any] = {}


def clear_detectors() -> None:
    """Forget the loaded detectors."""
    with _LOCK:
        _DETECTORS.clear()


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


# -- the runners ------------------------------------------------------------------------------

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


#: The function that runs each ``Preprocessor.runner``.
RUNNERS: dict[str, Callable[[Run], Any]] = {
    "none": _run_none, "invert": _run_invert, "canny": _run_canny, "shuffle": _run_shuffle,
    "lineart_standard": _run_lineart_standard, "hed": _run_hed, "pidi": _run_pidi,
    "lineart": _run_lineart, "lineart_anime": _run_lineart_anime, "mlsd": _run_mlsd,
    "openpose": _run_openpose, "midas": _run_midas, "normal_bae": _run_normal_bae,
    "leres": _run_leres, "zoe": _run_zoe, "depth_hf": _run_depth_hf,
}
