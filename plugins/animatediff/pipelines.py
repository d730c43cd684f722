"""The AnimateDiff pipelines the engine's views are made of: diffusers' own, with what a batch
renderer needs added by subclassing (made on first use: importing diffusers is slow).

- The motion UNet is built from the resident base UNet's modules (:mod:`.unet`), not copied.
- One call renders every task of a batch, each video on its own: a task's frames are then the
  same whatever batch it lands in, and FreeNoise (which diffusers supports for one prompt only)
  and prompt travel work in batches too.
- Embeddings come from the core's A1111 prompt encoder (``prompt_embeds``, emphasis and long
  prompts included) also where diffusers' FreeNoise wants prompt strings: the per-frame
  conditioning is made here (a prompt travel's keyframes interpolated as diffusers does:
  linearly between keyframes, then held) and given to FreeNoise's loop.
- ControlNet units' control images (the ControlNet plugin's ``image`` or ``control_image``:
  one image, or a list of frames, per unit) become ``conditioning_frames``, one image held
  for every frame.
- ``frame_split``: the spatial layers see at most that many frames at once (:mod:`.unet`).

:func:`selector` is what ``pipeline_class`` answers: a class whose ``from_pipe`` picks the
ControlNet variant when the ControlNet plugin adds a ``controlnet`` component.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

from render.api import UserError, encode_prompts

from .unet import frame_split, shared_motion_unet

#: (family, video-to-video, ControlNet) -> the diffusers pipeline a view is made of.
BASES = {
    ("sd1", False, False): "AnimateDiffPipeline",
    ("sd1", False, True): "AnimateDiffControlNetPipeline",
    ("sd1", True, False): "AnimateDiffVideoToVideoPipeline",
    ("sd1", True, True): "AnimateDiffVideoToVideoControlNetPipeline",
    ("sdxl", False, False): "AnimateDiffSDXLPipeline",
}


@dataclass(frozen=True)
class Travel:
    """One task's prompt travel: keyframe index -> full prompt, and the task's negative."""

    keyframes: tuple[tuple[int, str], ...]
    negative: str
    clip_skip: int


@cache
def selector(family: str, video: bool) -> type:
    """The ``pipeline_class`` answer for a task (one class per family and kind): its
    ``from_pipe`` makes the view."""
    def from_pipe(cls: type, pipe: Any, **components: Any) -> Any:
        control = components.get("controlnet") is not None
        name = BASES.get((family, video, control))
        if name is None:
            what = "video-to-video" if video else "ControlNet"
            raise RuntimeError(f"AnimateDiff has no {family} {what} pipeline")
        return pipeline_class(name).from_pipe(pipe, **components)

    label = f"RenderAnimateDiff[{family}{', video' if video else ''}]"
    return type(label, (), {"from_pipe": classmethod(from_pipe)})


@cache
def pipeline_class(name: str) -> type:
    """diffusers' ``name`` with this module's additions (made once per process)."""
    import diffusers

    base = getattr(diffusers, name)
    init_signature = inspect.signature(base.__init__)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = init_signature.bind(self, *args, **kwargs)
        unet = bound.arguments["unet"]
        if isinstance(unet, diffusers.UNet2DConditionModel):
            bound.arguments["unet"] = shared_motion_unet(unet, bound.arguments["motion_adapter"])
        base.__init__(*bound.args, **bound.kwargs)

    # What from_pipe reads to know the components and their types.
    __init__.__signature__ = init_signature
    __init__.__annotations__ = dict(typing.get_type_hints(base.__init__))

    def __call__(self: Any, **kwargs: Any) -> Any:
        return _RenderCalls.__call__(self, **kwargs)

    # What the engine and other plugins read to know what the call takes: diffusers' own
    # parameters, and this module's.
    params = list(inspect.signature(base.__call__).parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in (("prompt_travel", None), ("frame_split_size", 0))]
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    __call__.__signature__ = inspect.Signature([*params[:at], *extra, *params[at:]])
    return type(f"Render{name}", (_RenderCalls, base), {
        "__init__": __init__, "__call__": __call__,
        "_base_params": frozenset(inspect.signature(base.__call__).parameters)})


class _RenderCalls:
    """``__call__`` and the FreeNoise prompt hook of every Render* AnimateDiff pipeline."""

    _frame_conditioning: tuple[Any, Any] | None = None
    _base_params: frozenset[str] = frozenset()

    def __call__(self, *, prompt_embeds: Any, negative_prompt_embeds: Any, generator: Any,
                 num_frames: int, prompt_travel: Any = None, frame_split_size: int = 0,
                 **kwargs: Any) -> Any:
        import numpy as np
        import torch
        from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput

        count = prompt_embeds.shape[0]
        generators = generator if isinstance(generator, list) else [generator] * count
        travels = _per_task(prompt_travel, count, Travel)
        control_key = next((k for k in ("image", "control_image") if k in kwargs), None)
        if control_key is not None:
            kwargs["conditioning_frames"] = _control_frames(kwargs.pop(control_key), num_frames)
        videos = _per_task(kwargs.pop("video", None), count, list)
        pooled = {k: kwargs.pop(k) for k in list(kwargs)
                  if k.endswith("pooled_prompt_embeds") and torch.is_tensor(kwargs[k])}
        frames = []
        for i in range(count):
            call = dict(kwargs)
            call.update({k: v[i:i + 1] for k, v in pooled.items()})
            if videos[i] is not None:
                call["video"] = videos[i]
            positive, negative = prompt_embeds[i:i + 1], negative_prompt_embeds[i:i + 1]
            if getattr(self, "free_noise_enabled", False):
                self._frame_conditioning = self._per_frame(positive, negative, travels[i],
                                                           num_frames)
            elif travels[i] is not None:
                raise RuntimeError("prompt travel needs FreeNoise enabled on the view")
            try:
                with (frame_split(self.unet, frames=frame_split_size) if frame_split_size
                      else nullcontext()):
                    if "num_frames" in self._base_params:   # video-to-video: the video's
                        call["num_frames"] = num_frames
                    out = super().__call__(  # type: ignore[misc]
                        prompt_embeds=positive, negative_prompt_embeds=negative,
                        generator=generators[i], **call)
            finally:
                self._frame_conditioning = None
            frames.append(out.frames)
        if isinstance(frames[0], np.ndarray):
            return AnimateDiffPipelineOutput(frames=np.concatenate(frames))
        if torch.is_tensor(frames[0]):
            return AnimateDiffPipelineOutput(frames=torch.cat(frames))
        return AnimateDiffPipelineOutput(frames=[video for part in frames for video in part])

    def _per_frame(self, positive: Any, negative: Any, travel: Travel | None,
                   num_frames: int) -> tuple[Any, Any]:
        """Per-frame (positive, negative) embeddings, ``num_frames`` rows each."""
        if travel is None:
            return (positive.expand(num_frames, *positive.shape[1:]),
                    negative.expand(num_frames, *negative.shape[1:]))
        texts = [text for _, text in travel.keyframes]
        encoded = encode_prompts(self, texts, [travel.negative] * len(texts),
                                 clip_skip=travel.clip_skip)
        keys = [frame for frame, _ in travel.keyframes]
        return (interpolate(encoded["prompt_embeds"], keys, num_frames),
                interpolate(encoded["negative_prompt_embeds"], keys, num_frames))

    def _encode_prompt_free_noise(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """FreeNoise's prompt step: the conditioning :meth:`__call__` made for this video."""
        import torch

        if self._frame_conditioning is None:
            raise RuntimeError("FreeNoise prompt encoding outside a Render AnimateDiff call")
        positive, negative = self._frame_conditioning
        positive = positive.to(self._execution_device)
        negative = negative.to(self._execution_device)
        if self.do_classifier_free_guidance:
            return torch.cat([negative, positive]), negative
        return positive, negative


def interpolate(embeds: Any, keys: Sequence[int], num_frames: int) -> Any:
    """Rows ``embeds[k]`` at frames ``keys[k]`` (sorted, the first 0), linearly interpolated
    between keyframes and held after the last one: ``num_frames`` rows (diffusers' FreeNoise
    prompt interpolation, which lerps between consecutive keyframes the same way)."""
    import torch

    rows = []
    for frame in range(num_frames):
        k = max(i for i, key in enumerate(keys) if key <= frame)
        if k + 1 < len(keys):
            span = keys[k + 1] - keys[k]
            alpha = (frame - keys[k]) / span
            rows.append((1 - alpha) * embeds[k] + alpha * embeds[k + 1])
        else:
            rows.append(embeds[k])
    return torch.stack(rows)


def _per_task(value: Any, count: int, kind: type) -> list[Any]:
    """A task_inputs value as one entry per task: one value (shared by the batch, passed
    once by the engine) or the engine's list of per-task values (each a ``kind`` or None)."""
    if (isinstance(value, list) and len(value) == count
            and all(v is None or isinstance(v, kind) for v in value)
            and any(isinstance(v, kind) for v in value)):
        return list(value)
    return [value] * count


def _control_frames(units: Any, num_frames: int) -> list[list[Any]]:
    """Per ControlNet unit, ``num_frames`` control frames: an image is held for every frame,
    a list of frames gives its first ``num_frames``."""
    out = []
    for unit in (units if isinstance(units, list) else [units]):
        if not isinstance(unit, Sequence):   # one image (PIL): held for every frame
            out.append([unit] * num_frames)
            continue
        if len(unit) < num_frames:
            raise UserError(f"a ControlNet unit's control source has {len(unit)} frames, "
                            f"fewer than the animation's {num_frames}")
        out.append(list(unit[:num_frames]))   # only these are preprocessed
    return out


