"""What the pipeline call gets: each unit's control image (preprocessed once, fitted to the
task's size) and the per-call lists of images, scales and guidance ranges, with their caches."""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from render.api import FieldError, FileRef, frame_count, frame_files, load_frames

from .preprocessors import PREPROCESSORS, RUNNERS, Preprocessor, Run, clear_detectors
from .schema import annotator_label, image_label

_LOCK = threading.RLock()
_CALL_INPUTS: OrderedDict[Any, dict[str, Any]] = OrderedDict()
_PREPROCESSED: OrderedDict[Any, Any] = OrderedDict()
#: The device each preprocessed image was made on, kept after the image is evicted. The
#: postprocess hook is given the result and the task, not the pipeline, so it cannot know
#: the device task_inputs ran on; it asks for the control image with ``device=None`` and an
#: evicted image is made again where it was made the first time (a few bytes a key).
_MADE_ON: dict[Any, str] = {}
_SHAS: dict[tuple[str, int, int], str] = {}
#: Preprocessed images kept in memory (a 1024x1024 RGB image is 3 MiB).
CACHE_SIZE = 32
#: Counters for tests and diagnostics: preprocessor runs and cache hits.
STATS = {"runs": 0, "hits": 0}


def clear_caches() -> None:
    """Forget preprocessed images, loaded detectors and cached call inputs."""
    with _LOCK:
        _CALL_INPUTS.clear()
        _PREPROCESSED.clear()
        _MADE_ON.clear()
        STATS.update(runs=0, hits=0)
    clear_detectors()


# -- preflight --------------------------------------------------------------------------------

def image_ref(models: Any, index: int, unit: Mapping[str, Any]) -> Any:
    """Unit ``index``'s control image (before preprocessing) as a FileRef: an image, an
    animation or video (its frames control an animation's frames), or a folder of frames
    (its sha256: of the frames' sha256s in name order; ``extra["frames"]``: how many)."""
    image = Path(unit["image"])
    try:   # preflight decodes it: a damaged image is an error at its key
        if image.is_dir():
            files = frame_files(image)
            if not files:
                raise FieldError(f"{image} is a folder without frames (.png, .jpg, .webp)")
            refs = [models.file_ref("image", str(f), str(f)) for f in files]
            sha = hashlib.sha256("".join(r.sha256 for r in refs).encode()).hexdigest()
            return FileRef("image", str(image), str(image), sha, sha[:10],
                           extra={"frames": len(files)})
        if not image.is_file():
            raise FieldError(f"file not found: {image}")
        return models.file_ref("image", str(image), str(image))
    except FieldError as exc:
        raise FieldError(exc.message, f"{index}.image") from None


# -- identity ---------------------------------------------------------------------------------

def _image_sha(task: Any, index: int, unit: Mapping[str, Any]) -> str:
    ref = task.files.get(image_label(index))
    if ref is not None and ref.sha256:
        return str(ref.sha256)
    path = Path(unit["image"])
    if path.is_dir():
        raise RuntimeError(f"{path}: a folder of control frames reached the render without "
                           "preflight")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHAS:
        _SHAS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHAS[key]


def _settings(unit: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    spec = PREPROCESSORS[unit["preprocessor"]]
    return tuple((p.name, unit[p.name]) for p in spec.params)


def image_identity(task: Any, index: int, unit: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides a unit's control image (besides the task's size)."""
    seed = task.seed if unit["preprocessor"] == "shuffle" else None
    return (_image_sha(task, index, unit), unit["preprocessor"], _settings(unit),
            int(unit["resolution"]), unit["resize_mode"], seed)


# -- control images ---------------------------------------------------------------------------

def preprocessed(task: Any, index: int, unit: Mapping[str, Any],
                 device: str | None = None, frame: int = 0) -> Any:
    """The preprocessor's output for a unit (PIL RGB), computed once per image, frame and
    settings (``frame``: of an animated or video control source; 0 for a still image).

    ``device``: where the preprocessor runs when the image is not cached; None: where it ran
    for this image before (see ``_MADE_ON``), else the CPU.
    """
    spec = PREPROCESSORS[unit["preprocessor"]]
    sha, name, settings, resolution, _mode, seed = image_identity(task, index, unit)
    key = (sha, name, settings, resolution, seed, frame)
    with _LOCK:
        if key in _PREPROCESSED:
            _PREPROCESSED.move_to_end(key)
            STATS["hits"] += 1
            return _PREPROCESSED[key]
        if device is None:
            device = _MADE_ON.get(key, "cpu")
    source = _source_frame(unit["image"], sha, frame)
    run = Run(spec, source, dict(settings), resolution, _files_for(task, index, spec), device,
              seed)
    result = _rgb(RUNNERS[spec.runner](run))
    with _LOCK:
        STATS["runs"] += 1
        _PREPROCESSED[key] = result
        _MADE_ON[key] = device
        while len(_PREPROCESSED) > CACHE_SIZE:
            _PREPROCESSED.popitem(last=False)
    return result


def control_image(task: Any, index: int, unit: Mapping[str, Any],
                  device: str | None = None, frame: int = 0) -> Any:
    """The image the ControlNet sees: preprocessed (``device`` as for ``preprocessed``),
    then fitted to the task's size (``frame`` of an animated source)."""
    return fit(preprocessed(task, index, unit, device, frame), task.width, task.height,
               unit["resize_mode"])


#: Decoded control sources (all frames, as read), the two most recent: a video is decoded
#: once, not once per frame.
_SOURCES: OrderedDict[str, list[Any]] = OrderedDict()


def _source_frame(path: str, sha: str, frame: int) -> Any:
    """Frame ``frame`` of a control source as RGB (a still image is frame 0)."""
    from PIL import Image

    source = Path(path)
    if frame == 0 and source.is_file() and frame_count(source) == 1:
        with Image.open(source) as im:
            return _rgb(im)
    with _LOCK:
        frames = _SOURCES.get(sha)
    if frames is None:
        frames = _read_frames(source)
        with _LOCK:
            _SOURCES[sha] = frames
            while len(_SOURCES) > 2:
                _SOURCES.popitem(last=False)
    return frames[frame].copy()


def _read_frames(source: Path) -> list[Any]:
    """Every frame of an animated source, each at its own size (``fit`` sizes them)."""
    return [_rgb(f) for f in load_frames(source)]


def frames_of(task: Any, index: int) -> int:
    """How many frames unit ``index``'s control source holds (1: a still image)."""
    ref = task.files.get(image_label(index))
    if ref is not None and (ref.extra or {}).get("frames"):
        return int(ref.extra["frames"])
    path = Path(task.sections["controlnet"][index]["image"])
    return frame_count(path)


class ControlFrames(Sequence):
    """The control images of an animated source, one per frame, preprocessed when first
    asked for (an animation of 16 frames over a 300-frame video preprocesses 16)."""

    def __init__(self, task: Any, index: int, unit: Mapping[str, Any], device: str) -> None:
        self.task, self.index, self.unit, self.device = task, index, unit, device
        self.count = frames_of(task, index)
        self._made: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(self.count))]
        if not -self.count <= item < self.count:
            raise IndexError(item)
        item %= self.count
        if item not in self._made:
            self._made[item] = control_image(self.task, self.index, self.unit, self.device,
                                             frame=item)
        return self._made[item]


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
    prefix = annotator_label(index)
    files = {label[len(prefix):]: str(ref.path) for label, ref in task.files.items()
             if label.startswith(prefix)}
    if not files or any(w not in files for w in spec.weights):
        raise RuntimeError(f"task {task.job}#{task.index}: the weights of preprocessor "
                           f"'{spec.name}' were not resolved (preflight runs task_files)")
    return files


# -- the call ---------------------------------------------------------------------------------

def call_inputs(task: Any, acting: Sequence[tuple[int, Mapping[str, Any]]],
                pipe: Any) -> dict[str, Any]:
    """Control images and per-unit scales and guidance ranges for the pipeline call, the
    same objects for every task of a batch (cached by what decides them)."""
    params = inspect.signature(pipe.__call__).parameters
    if "controlnet_conditioning_scale" not in params:
        raise RuntimeError(f"{type(pipe).__name__} is not a ControlNet pipeline; another "
                           "plugin's pipeline_class answered for a ControlNet task")
    image_key = "image" if task.kind == "txt2img" else "control_image"
    key = (image_key, task.width, task.height,
           tuple((float(u["scale"]), float(u["start"]), float(u["end"]),
                  image_identity(task, i, u)) for i, u in acting))
    with _LOCK:
        cached = _CALL_INPUTS.get(key)
        if cached is not None:
            _CALL_INPUTS.move_to_end(key)
            return cached
    device = str(getattr(pipe, "device", "cpu"))
    # An animation pipeline (diffusers' AnimateDiff ControlNet pipelines take
    # ``conditioning_frames``) gets every frame of an animated source; a still, the first.
    frames = "conditioning_frames" in params
    inputs = {
        image_key: [ControlFrames(task, i, u, device) if frames and frames_of(task, i) > 1
                    else control_image(task, i, u, device) for i, u in acting],
        "controlnet_conditioning_scale": [float(u["scale"]) for _, u in acting],
        "control_guidance_start": [float(u["start"]) for _, u in acting],
        "control_guidance_end": [float(u["end"]) for _, u in acting],
    }
    with _LOCK:
        _CALL_INPUTS[key] = inputs
        while len(_CALL_INPUTS) > 8:
            _CALL_INPUTS.popitem(last=False)
    return inputs
