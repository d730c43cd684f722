"""The hires fix: A1111's second diffusion pass at a larger size (``hires:``).

Job file::

    hires: {scale: 2, upscaler: RealESRGAN_x4plus, steps: 10, strength: 0.4}
    # or resize: 1024x768 instead of scale; sampler, schedule, prompt, negative, cfg and
    # checkpoint optional (A1111's "Hires sampler", "Hires schedule type", ...)

As A1111's txt2img hires fix: the task renders at its own size (the first pass); the image
is upscaled to the target (``scale`` times the size, or ``resize: WxH``, where one side 0
keeps the aspect and two sides cover then crop centred, as A1111 truncates), then an img2img
pass with ``steps`` (0: the task's steps) at denoising ``strength`` (A1111's UI default 0.7)
renders the final image, with ``sampler``, ``prompt``, ``negative``, ``cfg`` and
``checkpoint`` of its own when given (else the task's).

Upscalers: a file in an upscaler folder (ESRGAN/, RealESRGAN/, upscale_models/ ...),
``Lanczos``, ``Nearest`` or ``None`` (A1111's: a plain Lanczos resize), or a latent mode
(``Latent``, the default, ``Latent (antialiased)``, ``Latent (bicubic)``, ``Latent (bicubic
antialiased)``, ``Latent (nearest)``, ``Latent (nearest-exact)``), which interpolates the
latent instead of pixels.

Decisions:

- A latent mode interpolates the latent of the first-pass image as the second pass's VAE
  encodes it. A1111 interpolates the sampler's own latent before decoding; the first pass here
  is the engine's finished image (one pipeline call, shared by every task that differs only
  in its post sections), so its latent is re-encoded: one VAE decode and encode more, and a
  latent that differs from A1111's by the VAE's reconstruction error.
- Sizes are floored to multiples of 8 (the VAE's factor), as A1111's latent size is.
- The second pass is the family's plain img2img pipeline; the task's networks (LoRA ...) act
  in it through ``configure_pipeline``, a ControlNet does not (its control image is the first
  pass's size). A hires prompt may not carry ``<lora:...>`` tags: the second pass uses the
  task's networks, and a tag would be silently ignored.
- Only txt2img tasks: A1111's hires fix is a txt2img feature (img2img has its own resize).
- Infotext fields exactly as A1111 writes them (``Hires upscale`` or ``Hires resize``,
  ``Hires steps`` when not 0, ``Hires upscaler``, ``Denoising strength``, and ``Hires
  sampler``/``prompt``/``negative prompt``/``CFG Scale``/``checkpoint`` only when they
  differ from the first pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from render.api import (
    FieldContext,
    FieldError,
    FieldErrors,
    describe,
    expect_int,
    expect_number,
    expect_sampler,
    expect_schedule,
    expect_str,
    extra_network_tags,
    format_number,
)

from .schema import did_you_mean

KEY = "hires"
UPSCALER_LABEL = "hires:upscaler"
CHECKPOINT_LABEL = "hires:checkpoint"

#: A1111's latent upscale modes: name -> (torch interpolate mode, antialias).
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: Pixel resizes that need no model file (A1111's "None" upscaler resizes with Lanczos).
PLAIN_RESIZES = {"none": "None", "lanczos": "Lanczos", "nearest": "Nearest"}

DEFAULT_STRENGTH = 0.7   # A1111's hires "Denoising strength" default
DEFAULT_SCALE = 2        # A1111's "Upscale by" default
MAX_SCALE = 8
MAX_SIDE = 8192
VAE_FACTOR = 8

KEYS = ("scale", "resize", "upscaler", "steps", "strength", "sampler", "schedule", "prompt",
        "negative", "cfg", "checkpoint")


# -- validation -------------------------------------------------------------------------------

def validate_hires(value: Any, ctx: FieldContext) -> dict[str, Any]:
    """The ``hires:`` section with every default filled in (see the module docstring)."""
    if not isinstance(value, Mapping):
        raise FieldError(f"expected a mapping like {{scale: 2, strength: 0.5}}, got "
                         f"{describe(value)}")
    errors: list[FieldError] = []
    for key in value:
        if key not in KEYS:
            errors.append(FieldError(f"unknown key {key!r}{did_you_mean(str(key), KEYS)}; "
                                     f"hires takes {', '.join(KEYS)}", str(key)))
    out: dict[str, Any] = {}

    def check(key: str, validate: Any) -> None:
        if value.get(key) is None:
            return
        try:
            out[key] = validate(value[key])
        except FieldError as exc:
            errors.append(FieldError(exc.message, key))

    check("scale", lambda v: expect_number(v, minimum=1, maximum=MAX_SCALE))
    check("resize", _resize)
    check("upscaler", _upscaler)
    check("steps", lambda v: expect_int(v, minimum=0, maximum=1000))
    check("strength", lambda v: expect_number(v, minimum=0, maximum=1))
    check("sampler", lambda v: expect_sampler(v, ctx))
    check("schedule", lambda v: expect_schedule(v, ctx))
    check("prompt", _prompt)
    check("negative", _prompt)
    check("cfg", lambda v: expect_number(v, minimum=0, maximum=100))
    check("checkpoint", lambda v: expect_str(v, what="a checkpoint name", allow_empty=False))
    if "scale" in out and "resize" in out:
        errors.append(FieldError("give scale or resize, not both (A1111's 'Upscale by' and "
                                 "'Resize width/height to' are alternatives)", "resize"))
    sampler, schedule = out.pop("sampler", (None, None))
    if schedule and out.get("schedule", schedule) != schedule:
        errors.append(FieldError(f"sampler {value['sampler']!r} names the schedule {schedule}, "
                                 f"schedule says {out['schedule']}", "schedule"))
    if errors:
        raise FieldErrors(errors)
    schedule = out.get("schedule", schedule)
    return {
        "scale": out.get("scale", DEFAULT_SCALE if "resize" not in out else None),
        "resize": out.get("resize"),
        "upscaler": out.get("upscaler", "Latent"),
        "steps": out.get("steps", 0),
        "strength": out.get("strength", DEFAULT_STRENGTH),
        "sampler": sampler,
        "schedule": schedule,
        "prompt": out.get("prompt"),
        "negative": out.get("negative"),
        "cfg": out.get("cfg"),
        "checkpoint": out.get("checkpoint"),
    }


def _resize(value: Any) -> list[int]:
    """``"1024x768"``, ``[1024, 768]`` or ``{width: 1024, height: 0}``; 0 keeps the aspect."""
    if isinstance(value, str) and "x" in value.lower():
        parts: Any = value.lower().split("x", 1)
    elif isinstance(value, Mapping):
        parts = [value.get("width", 0), value.get("height", 0)]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    else:
        raise FieldError(f"expected WxH like 1024x768 (0 for one side keeps the aspect), got "
                         f"{describe(value)}")
    try:
        sides = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise FieldError(f"expected WxH like 1024x768, got {describe(value)}") from None
    if any(s < 0 or s > MAX_SIDE for s in sides) or not any(sides):
        raise FieldError(f"expected sides from 0 to {MAX_SIDE}, not both 0, got "
                         f"{describe(value)}")
    return sides


def _upscaler(value: Any) -> str:
    name = expect_str(value, what="an upscaler name", allow_empty=False).strip()
    for mode in LATENT_MODES:
        if name.lower() == mode.lower():
            return mode
    return PLAIN_RESIZES.get(name.lower(), name)


def _prompt(value: Any) -> str:
    text = expect_str(value, what="a prompt")
    if extra_network_tags(text):
        raise FieldError("the second pass uses the task's networks: put <lora:...> and other "
                         "network tags in the task's prompt, not in hires")
    return text


def spec(task: Any) -> dict[str, Any] | None:
    return task.sections.get(KEY)


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_MODES


def needs_model(upscaler: str) -> bool:
    return not is_latent(upscaler) and upscaler not in PLAIN_RESIZES.values()


# -- sizes ------------------------------------------------------------------------------------

def target_sizes(width: int, height: int, hires: Mapping[str, Any],
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(upscaled size, final size)`` of a first pass of ``width`` x ``height``.

    A1111's rules: ``scale`` multiplies both sides; ``resize`` with one side 0 keeps the
    aspect; with both sides the image is upscaled to cover them, keeping its aspect, then
    cropped to them. Both floored to multiples of the VAE's factor of 8.
    """
    if hires.get("resize"):
        rx, ry = hires["resize"]
        if not ry:
            up = (rx, rx * height // width)
        elif not rx:
            up = (ry * width // height, ry)
        elif width / height < rx / ry:
            up = (rx, rx * height // width)
        else:
            up = (ry * width // height, ry)
        final = (rx or up[0], ry or up[1])
    else:
        up = (int(width * hires["scale"]), int(height * hires["scale"]))
        final = up
    floor = _floor8
    return (floor(up[0]), floor(up[1])), (floor(min(final[0], up[0])), floor(min(final[1], up[1])))


def _floor8(side: int) -> int:
    return max(VAE_FACTOR, side // VAE_FACTOR * VAE_FACTOR)


def crop_box(up: tuple[int, int], final: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred crop of ``final`` out of ``up`` (A1111 truncates half on each side, the odd
    unit on the right/bottom), in pixels."""
    tx, ty = (up[0] - final[0]) // VAE_FACTOR, (up[1] - final[1]) // VAE_FACTOR
    left, top = tx // 2 * VAE_FACTOR, ty // 2 * VAE_FACTOR
    return left, top, left + final[0], top + final[1]


# -- preflight --------------------------------------------------------------------------------

def hires_files(task: Any, models: Any, check_upscaler: Any) -> dict[str, Any]:
    """The upscaler file and second-pass checkpoint the section names, checked."""
    hires = spec(task)
    if not hires:
        return {}
    errors: list[FieldError] = []
    found: dict[str, Any] = {}
    if task.kind != "txt2img":
        errors.append(FieldError(f"the hires fix is a txt2img pass (as in A1111); this task "
                                 f"is {task.kind} (it has an image:)", key=KEY))
    steps = hires["steps"] or task.steps
    if int(steps * hires["strength"]) < 1:
        errors.append(FieldError(
            f"strength {format_number(hires['strength'])} of {steps} steps denoises no step "
            "(diffusers runs int(steps x strength) of them): raise strength or steps",
            "strength", key=KEY))
    if needs_model(hires["upscaler"]):
        try:
            found[UPSCALER_LABEL] = check_upscaler(models, hires["upscaler"])
        except FieldError as exc:
            errors.append(FieldError(exc.message, "upscaler", key=KEY))
    if hires["checkpoint"]:
        try:
            ref = models.resolve_model(hires["checkpoint"])
        except FieldError as exc:
            errors.append(FieldError(exc.message, "checkpoint", key=KEY))
        else:
            channels = int((ref.extra or {}).get("in_channels") or 4)
            if channels != 4:
                errors.append(FieldError(
                    f"checkpoint {hires['checkpoint']!r} has a {channels}-channel UNet (an "
                    "inpainting or depth model): the second pass needs a plain model",
                    "checkpoint", key=KEY))
            found[CHECKPOINT_LABEL] = ref
    if errors:
        raise FieldErrors(errors)
    return found


# -- the second pass --------------------------------------------------------------------------

def second_pass_task(task: Any, size: tuple[int, int]) -> Any:
    """The task the second pass renders: the hires settings over the task's own."""
    hires = spec(task)
    assert hires is not None
    sampler = hires["sampler"] or task.sampler
    schedule = hires["schedule"] or (task.schedule if not hires["sampler"] else "Automatic")
    return dataclasses.replace(
        task,
        prompt=task.prompt if hires["prompt"] is None else hires["prompt"],
        negative=task.negative if hires["negative"] is None else hires["negative"],
        steps=hires["steps"] or task.steps,
        sampler=sampler,
        schedule=schedule,
        cfg=task.cfg if hires["cfg"] is None else hires["cfg"],
        strength=hires["strength"],
        width=size[0],
        height=size[1],
    )


def apply_hires(result: Any, task: Any, renderer: Any, upscale_to: Any) -> Any:
    """Replace each first-pass image of ``result`` by its second pass.

    ``upscale_to(image, size, upscaler, ref, renderer)`` is the pixel upscaler (the
    plugin's, shared with ``upscale:``).
    """
    hires = spec(task)
    assert hires is not None
    model = task.files.get(CHECKPOINT_LABEL)
    images, notes = [], []
    for image in result.images:
        up, final = target_sizes(image.width, image.height, hires)
        second = second_pass_task(task, final)
        if is_latent(hires["upscaler"]):
            init = _latent_init(image, second, hires["upscaler"], up, final, renderer, model)
        else:
            ref = task.files.get(UPSCALER_LABEL)
            how = "lanczos" if hires["upscaler"] == "None" else hires["upscaler"]
            init = upscale_to(image, up, how, ref, renderer)
            init = init.crop(crop_box(up, final)) if up != final else init
        out, pass_notes = renderer.img2img(second, [init], model=model)
        images.extend(out)
        notes.extend(pass_notes)
    result.images = images
    result.notes = list(dict.fromkeys([*result.notes, *notes]))
    return result


def _latent_init(image: Any, second: Any, mode: str, up: tuple[int, int],
                 final: tuple[int, int], renderer: Any, model: Any) -> Any:
    import torch

    latents = renderer.encode([image], second, model=model)
    how, antialias = LATENT_MODES[mode]
    size = (up[1] // VAE_FACTOR, up[0] // VAE_FACTOR)
    kwargs = {"antialias": True} if antialias else {}
    latents = torch.nn.functional.interpolate(latents, size=size, mode=how, **kwargs)
    left, top, right, bottom = (v // VAE_FACTOR for v in crop_box(up, final))
    return latents[:, :, top:bottom, left:right]


# -- infotext ---------------------------------------------------------------------------------

def hires_infotext(task: Any) -> dict[str, str]:
    """The fields A1111's txt2img writes for a hires fix, only those that apply."""
    hires = spec(task)
    if not hires:
        return {}
    fields: dict[str, str] = {"Denoising strength": format_number(hires["strength"])}
    if hires["resize"]:
        fields["Hires resize"] = f"{hires['resize'][0]}x{hires['resize'][1]}"
    else:
        fields["Hires upscale"] = format_number(hires["scale"])
    if hires["steps"]:
        fields["Hires steps"] = str(hires["steps"])
    fields["Hires upscaler"] = hires["upscaler"]
    if hires["checkpoint"]:
        ref = task.files.get(CHECKPOINT_LABEL)
        short = f" [{ref.short_hash}]" if ref is not None and ref.short_hash else ""
        fields["Hires checkpoint"] = f"{hires['checkpoint']}{short}"
    if hires["sampler"] and hires["sampler"] != task.sampler:
        fields["Hires sampler"] = hires["sampler"]
    if hires["schedule"] and hires["schedule"] != task.schedule:
        fields["Hires schedule type"] = hires["schedule"]
    if hires["prompt"] is not None and hires["prompt"] != task.prompt:
        fields["Hires prompt"] = hires["prompt"]
    if hires["negative"] is not None and hires["negative"] != task.negative:
        fields["Hires negative prompt"] = hires["negative"]
    if hires["cfg"] is not None and hires["cfg"] != task.cfg:
        fields["Hires CFG Scale"] = format_number(hires["cfg"])
    return fields
