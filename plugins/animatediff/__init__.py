"""AnimateDiff: a task with an ``animatediff:`` section renders an animation.

Job file::

    animatediff:
      motion_module: mm_sd_v15_v2   # a file or MotionAdapter folder (see motion.py for where)
      frames: 16                    # default 16
      fps: 8                        # default 8 (what the animation writers play it at)
      loop: true                    # default true: GIF/WebP repeat forever, else play once
      context: {length: 16, stride: 4}   # FreeNoise sliding windows, for more frames than
                                    # the module's window (v2: 32); default none
      prompt_travel: {0: "closed eyes", 8: "open eyes"}   # or "<frame>: text" prompt lines
      motion_lora: {v2_lora_ZoomIn: 0.8}                  # stacked, with weights
      decode_chunk_size: 16         # frames the VAE decodes at once (default 16)
      free_init: 0                  # FreeInit iterations (0: off)
      split: true                   # with context: the spatial layers see one window's
                                    # frames at a time, so peak memory does not grow with frames
    output: {format: gif}           # gif | webp | mp4 | png-frames (plugins/animation.py)

Decisions:

- The view is a ``from_pipe`` view of the resident base (``pipelines.py``) whose motion UNet is
  made of the base UNet's own modules and the MotionAdapter's (``unet.py``): no weight is
  loaded or held twice, and LoRAs, embeddings and hypernetworks act as on stills. The
  MotionAdapter is loaded once per process (the engine's component cache).
- Every SD1.5 view runs with diffusers' FreeNoise switched on: without ``context`` its window
  is the whole animation (one window: the plain result, within 3e-6), so the motion modules
  are never swapped back and forth (diffusers swaps them by copying, which a motion LoRA's
  layers would not survive) and prompt travel works with or without windows. SDXL-beta
  modules render without FreeNoise (diffusers' SDXL pipeline has none): ``context`` and prompt
  travel there are preflight errors.
- Prompt travel keyframes are encoded by the core's A1111 encoder (emphasis, long prompts) and
  interpolated linearly between keyframes, as diffusers' FreeNoise does; the first keyframe
  must be frame 0. Prompt editing (``[a:b:0.5]``) in an animation is refused (it switches the
  whole prompt per step, which diffusers' AnimateDiff loop cannot take): use prompt travel.
- Preflight, torch-free: a missing module, a file that is no motion module, a module of the
  other family (an SDXL module on an SD1.5 checkpoint), more frames than the module's window
  without ``context``, a keyframe past the last frame, a video-to-video source with fewer
  frames than ``frames``, inpainting (no AnimateDiff pipeline), each one line with file:line.
- Video-to-video: ``image:`` a GIF, animated WebP or MP4 (or other video), with ``strength``
  (default 0.75, as img2img): its first ``frames`` frames, at the task's size, are the init
  (diffusers' AnimateDiffVideoToVideoPipeline; with ``controlnet:``, its ControlNet variant).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from render.api import (
    FieldError,
    format_number,
    frame_count,
    has_prompt_editing,
    hookimpl,
    load_frames,
    raise_all,
    section_axis_label,
    strip_extra_networks,
)

from . import motion
from .schema import KEY, keyframes, prompt_travel_lines, validate_section

#: What the AnimateDiff view's motion modules are switched by (see the docstring).
_LABEL = f"{KEY}:motion_module"


# -- load -------------------------------------------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    register(motion.MOTION_MODULE)
    register(motion.MOTION_LORA)


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section, animates=True,
             doc="animation: motion_module, frames, fps, loop, context, prompt_travel, "
                 "motion_lora, decode_chunk_size, free_init")


# -- preflight --------------------------------------------------------------------------------

@hookimpl
def task_files(task: Any, models: Any) -> dict[str, Any] | None:
    """The motion module and motion LoRAs, checked against the checkpoint and the section."""
    section = task.sections.get(KEY)
    if not section:
        return None
    model = task.files.get("model")
    family = model.family if model else None
    errors: list[FieldError] = []
    found: dict[str, Any] = {}
    try:
        found[_LABEL] = _module_ref(models, section, family)
    except FieldError as exc:
        errors.append(FieldError(exc.message, "motion_module", key=KEY))
    for name in section["motion_lora"]:
        try:
            path = models.find("motion_lora", name)
            motion.check_motion_lora(path)
            found[f"{KEY}:motion_lora:{name}"] = models.file_ref("motion_lora", name, path)
        except FieldError as exc:
            errors.append(FieldError(exc.message, f"motion_lora.{name}", key=KEY))
    if _LABEL in found:
        errors.extend(_section_problems(task, section, found[_LABEL]))
    raise_all(errors)
    return found


def _module_ref(models: Any, section: dict[str, Any], family: str | None) -> Any:
    name = section["motion_module"]
    path = models.find("motion_module", name)
    version = motion.check_module(path, family=family, deep=models.deep_checks)
    config = (models.alias("motion_module", name) or {}).get("config")
    folder = models.find("motion_module", str(config)) if config else None
    if path.is_file():
        folder = motion.single_file_config(path, folder)
    ref = models.file_ref("motion_module", name, path)
    frames = motion.layout_from_config(motion.read_config(folder or path))["seq"]
    extra = {**ref.extra, "version": version, "window": frames}
    if folder is not None:
        extra["config"] = str(folder)
    return dataclasses.replace(ref, extra=extra)


def _section_problems(task: Any, section: dict[str, Any], ref: Any) -> list[FieldError]:
    """What the section asks that this task, checkpoint or module cannot render."""
    problems: list[tuple[str, str]] = []
    window = int(ref.extra["window"])
    frames, context = section["frames"], section["context"]
    travel = keyframes(section, task.prompt)
    sdxl = ref.extra["version"] == "sdxl"
    if sdxl and context:
        problems.append(("context", "context windows need an SD1.5 motion module: diffusers' "
                                    "AnimateDiff SDXL pipeline has no FreeNoise"))
    if sdxl and travel:
        problems.append(("prompt_travel", "prompt travel needs an SD1.5 motion module: "
                                          "diffusers' AnimateDiff SDXL pipeline has no "
                                          "FreeNoise"))
    if context is None and frames > window:
        problems.append(("frames", f"{frames} frames is more than the motion module's "
                                   f"{window}-frame window: add context: {{length: "
                                   f"{min(16, window)}, stride: 4}} (FreeNoise windows)"))
    if context is not None and context["length"] > window:
        problems.append(("context.length", f"a {context['length']}-frame window is longer "
                                           f"than the motion module's {window} frames"))
    if travel is not None:
        if 0 not in travel:
            problems.append(("prompt_travel", "the first keyframe must be frame 0"))
        late = [k for k in travel if k >= frames]
        if late:
            problems.append(("prompt_travel", f"keyframe {late[0]} is past the last frame "
                                              f"({frames - 1})"))
    out = [FieldError(message, subkey, key=KEY) for subkey, message in problems]
    if has_prompt_editing(task.prompt) or has_prompt_editing(task.negative):
        out.append(FieldError("prompt editing and alternation ([a:b:0.5], [a|b]) cannot "
                              "switch prompts inside an animation: use animatediff: "
                              "prompt_travel", key="prompt"))
    if task.kind == "inpaint":
        out.append(FieldError("AnimateDiff has no inpainting pipeline: leave out mask: (an "
                              "image: video alone renders video-to-video)", key="mask"))
    elif task.kind == "img2img":
        out.extend(_video_problems(task, frames, sdxl))
    return out


def _video_problems(task: Any, frames: int, sdxl: bool) -> list[FieldError]:
    """Video-to-video: ``image:`` must hold at least ``frames`` frames (SD1.5 only)."""
    if sdxl:
        return [FieldError("video-to-video needs an SD1.5 motion module: diffusers has no "
                           "AnimateDiff SDXL video-to-video pipeline", key="image")]
    try:
        count = frame_count(task.image)
    except OSError as exc:
        return [FieldError(f"cannot read the frames of {task.image}: {exc}", key="image")]
    if count < frames:
        what = "a still image" if count == 1 else f"{count} frames"
        return [FieldError(f"{task.image} is {what}; video-to-video of {frames} frames "
                           f"(animatediff.frames) needs a video (GIF, WebP, MP4) of "
                           f"at least {frames}", key="image")]
    return []


# -- plan -------------------------------------------------------------------------------------

@hookimpl
def group_key(task: Any) -> Any:
    """One call renders one module, frame count and window setting (the view's state)."""
    section = task.sections.get(KEY)
    if not section:
        return None
    return (KEY, task.files[_LABEL].sha256, section["frames"], _window(section),
            section["decode_chunk_size"], section["free_init"], section["split"],
            tuple(sorted((n, task.files[f"{KEY}:motion_lora:{n}"].sha256, w)
                         for n, w in section["motion_lora"].items())))


def _window(section: dict[str, Any]) -> tuple[int, int]:
    """FreeNoise's (length, stride): the context's, or the whole animation as one window."""
    context = section["context"]
    if context:
        return context["length"], context["stride"]
    return section["frames"], section["frames"]


# -- render -----------------------------------------------------------------------------------

@hookimpl(tryfirst=True)
def pipeline_class(task: Any, family: str) -> Any:
    if not task.sections.get(KEY):
        return None
    from .pipelines import selector

    return selector("sdxl" if family == "sdxl" else "sd1", video=task.kind == "img2img")


@hookimpl
def pipeline_components(task: Any, family: str, loader: Any) -> dict[str, Any] | None:
    if not task.sections.get(KEY):
        return None
    return {"motion_adapter": motion.load_motion_adapter(task.files[_LABEL], loader)}


@hookimpl(trylast=True)
def configure_pipeline(pipe: Any, batch: Any) -> None:
    """FreeNoise windows, FreeInit and the motion LoRA stack of the batch, on its view.

    After every other plugin (``trylast``): the LoRA plugin's ``set_adapters`` sets every
    adapter layer, the motion modules' too; the motion LoRA stack is set last."""
    section = batch.first.sections.get(KEY)
    if not section or not hasattr(pipe, "motion_adapter"):
        return
    if hasattr(pipe, "enable_free_noise"):
        length, stride = _window(section)
        pipe.enable_free_noise(context_length=length, context_stride=stride)
    if hasattr(pipe, "enable_free_init"):
        if section["free_init"]:
            pipe.enable_free_init(num_iters=section["free_init"], use_fast_sampling=False)
        elif getattr(pipe, "free_init_enabled", False):
            pipe.disable_free_init()
    stack = {n: (batch.first.files[f"{KEY}:motion_lora:{n}"].path, w)
             for n, w in section["motion_lora"].items()}
    motion.apply_motion_loras(pipe, stack)


@hookimpl
def task_inputs(task: Any, pipe: Any) -> dict[str, Any] | None:
    section = task.sections.get(KEY)
    if not section or not hasattr(pipe, "motion_adapter"):
        return None
    from .pipelines import Travel

    params = inspect.signature(pipe.__call__).parameters
    split = section["context"]["length"] if section["context"] and section["split"] else 0
    travel = keyframes(section, task.prompt)
    inputs: dict[str, Any] = {
        "num_frames": section["frames"],
        "frame_split_size": split,
        "prompt_travel": None if not travel else Travel(
            tuple((k, strip_extra_networks(text)) for k, text in travel.items()),
            strip_extra_networks(task.negative), task.clip_skip),
    }
    if "decode_chunk_size" in params:   # not in diffusers' SDXL pipeline
        inputs["decode_chunk_size"] = section["decode_chunk_size"]
    if "video" in params:
        inputs["video"] = _video(task.image, task.width, task.height, section["frames"])
    return inputs


@functools.lru_cache(maxsize=4)
def _video(path: str, width: int, height: int, frames: int) -> list[Any]:
    """A video-to-video source's first ``frames`` frames at the task's size; the same list
    for every task of a batch (the engine then passes it once)."""
    return load_frames(path, width, height, limit=frames)


# -- post and write ---------------------------------------------------------------------------

@hookimpl
def postprocess(result: Any, task: Any) -> Any:
    section = task.sections.get(KEY)
    if not section:
        return None
    result.fps = section["fps"]
    result.loop = section["loop"]
    return result


@hookimpl
def infotext_prompt(task: Any, prompt: str) -> str | None:
    """A ``prompt_travel:`` mapping as sd-webui-animatediff's ``<frame>: prompt`` lines: its
    keyframes are the whole prompts the animation used (the task's prompt was not), and
    A1111 with the extension renders them again from the pasted lines."""
    section = task.sections.get(KEY)
    if not section or not section["prompt_travel"] or prompt_travel_lines(prompt):
        return None
    return "\n".join(f"{frame}: {text}" for frame, text in section["prompt_travel"].items())


@hookimpl
def result_metadata(task: Any, result: Any) -> dict[str, str] | None:
    """sd-webui-animatediff's ``AnimateDiff`` infotext field, and the motion LoRAs' hashes."""
    section = task.sections.get(KEY)
    if not section:
        return None
    ref = task.files[_LABEL]
    length, stride = _window(section)
    context = section["context"]
    parts = {
        "enable": "True",
        "model": ref.name,
        "video_length": str(section["frames"]),
        "fps": format_number(section["fps"]),
        "loop_number": "0" if section["loop"] else "1",
        "closed_loop": "N",
        "batch_size": str(length),
        "stride": "1",
        "overlap": str(length - stride) if context else "-1",
        "interp": "Off",
        "interp_x": "10",
        "mm_hash": ref.sha256[:8],
    }
    fields = {"AnimateDiff": ", ".join(f"{k}: {v}" for k, v in parts.items())}
    if section["motion_lora"]:
        fields["Motion LoRA hashes"] = ", ".join(
            f"{n}: {task.files[f'{KEY}:motion_lora:{n}'].sha256[:12]}"
            for n in section["motion_lora"])
    return fields


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "AnimateDiff", {
        "motion_module": "Motion module", "motion_lora": "Motion LoRA", "frames": "Frames",
        "fps": "FPS", "context.length": "Context length", "context.stride": "Context stride",
        "free_init": "FreeInit iterations"})
