"""Resizing an image to a size: a plain PIL filter, or a spandrel model in tiles.

``upscale_to(image, size, model, ref, renderer)`` is what the ``upscale:`` key and the hires
fix call. ``model`` "lanczos" or "nearest" (any case: A1111 writes "Lanczos", "Nearest") is a
plain PIL resize. Anything else is the upscaler file ``ref``, run as A1111's upscalers run:
pass after pass (at most 3) while the image is smaller than the target, then a Lanczos
resize to exactly ``size`` (a 4x model asked for 2x upscales 4x, then halves; a 2x model asked
for 4x runs twice). Every input becomes RGB first (RGBA, L, P: as A1111's extras tab does).

Tiles. A pass cuts the image into tiles of at most ``tile`` pixels a side (0: the whole image
at once): as few as cover it with ``overlap`` pixels shared between neighbours, all of one
size, spread evenly (so no thin last tile, and no more computed than needed). Each tile's
output is weighted by a feather mask that rises linearly from near 0 at an inner edge (a
tile's edge that is not the image's) to 1 at ``overlap`` pixels in, and the weighted sum is
divided by the sum of weights: the pixels a model sees least context for count least, and no
seam shows. On the tiny kit's upscalers, 64-px tiles sharing 16 differ from an untiled pass
by at most 3/255 and 0.08/255 on average (see the tests).

Memory (ComfyUI's approach). On CUDA the first tile size is the given one, halved while
ComfyUI's estimate for an upscaler (tile² x 3 x element size x scale x 384 bytes) exceeds
the free device memory. A pass that runs out of memory anyway (``renderer.is_oom``) frees
(``renderer.free``), halves the tile and starts the pass again, down to :data:`MIN_TILE`;
the tile that worked is remembered per model, device and dtype, so later images start there.
Below the floor the error says what to do. The floor is 64 px: by then a tile's activations
are 1/64 of a 512 tile's (tens of MB for the largest ESRGAN at 4x), so what still does not fit
is the model itself, and smaller tiles would only multiply the seams and the calls (ComfyUI
stops at 128).

Runs under ``torch.inference_mode``; the model's input is cast to its dtype and device, the
output blended in float32 on the CPU (the image being built may be larger than the device's
free memory), then rounded to 8 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render.api import FileRef

from .spandrel_models import load

#: The smallest tile a pass shrinks to after running out of memory.
MIN_TILE = 64
#: At most this many model passes per resize (A1111's Upscaler.upscale).
MAX_PASSES = 3
#: ComfyUI's per-tile memory factor for upscalers (bytes per input pixel, channel, scale).
MEMORY_FACTOR = 384

#: The tile size that last worked (after an out-of-memory) per (model, device, dtype).
_WORKING_TILE: dict[tuple[str, str, str], int] = {}


def plain_filter(model: str) -> Any:
    """The PIL filter a name means ("lanczos", "nearest", any case), else None."""
    from PIL import Image

    return {"lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST}.get(model.strip().lower())


def is_plain(model: str) -> bool:
    """Whether ``model`` is a PIL filter rather than a model file."""
    return model.strip().lower() in ("lanczos", "nearest")


def upscale_to(image: Any, size: tuple[int, int], model: str, ref: FileRef | None,
               renderer: Any, *, tile: int = 512, overlap: int = 32) -> Any:
    """``image`` resized to exactly ``size`` (width, height) with ``model`` (see the module
    docstring); an RGB PIL image."""
    from PIL import Image

    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize to {width}x{height}")
    image = image if image.mode == "RGB" else image.convert("RGB")
    if is_plain(model):
        return image.resize((width, height), plain_filter(model))
    if ref is None:
        raise ValueError(f"upscaler {model!r} needs its file (a FileRef from preflight)")
    descriptor = load(ref, renderer, purpose="upscaler")
    key = (ref.sha256 or ref.path, str(renderer.device), str(renderer.dtype))
    current = image
    for _ in range(MAX_PASSES):
        before = current.size
        current = model_pass(current, descriptor, renderer, tile=tile, overlap=overlap,
                             key=key, name=Path(ref.path).name)
        if current.size == before or (current.width >= width and current.height >= height):
            break
    if current.size != (width, height):
        current = current.resize((width, height), Image.Resampling.LANCZOS)
    return current


def model_pass(image: Any, descriptor: Any, renderer: Any, *, tile: int, overlap: int,
               key: tuple[str, str, str] | None = None, name: str = "the upscaler") -> Any:
    """One pass of ``descriptor`` over an RGB image, tiled, shrinking the tile on OOM."""
    import torch

    grey = descriptor.input_channels == 1
    x = to_tensor(image.convert("L") if grey else image)
    h, w = x.shape[-2:]
    side = tile if tile > 0 else max(h, w)
    if key is not None and key in _WORKING_TILE:
        side = min(side, _WORKING_TILE[key])
    side = _fits_estimate(side, descriptor, renderer)
    while True:
        try:
            with torch.inference_mode():
                out = tiled(x, descriptor, side, min(overlap, max(0, side // 2 - 1)))
            break
        except Exception as exc:
            if not renderer.is_oom(exc):
                raise
            renderer.free()
            if side // 2 < MIN_TILE:
                raise RuntimeError(
                    f"upscaling with {name} ran out of memory on {renderer.device} even in "
                    f"{side}-pixel tiles (the smallest is {MIN_TILE}): free memory on the "
                    "device, or use a smaller model or a plain lanczos resize") from exc
            side = max(MIN_TILE, side // 2)
            if key is not None:
                _WORKING_TILE[key] = side
    result = to_image(out)
    return result.convert("RGB") if grey else result


def _fits_estimate(side: int, descriptor: Any, renderer: Any) -> int:
    """On CUDA, halve ``side`` while ComfyUI's estimate of a tile exceeds free memory."""
    if not str(renderer.device).startswith("cuda"):
        return side
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(torch.device(renderer.device))
    except (RuntimeError, ValueError):
        return side
    element = torch.empty((), dtype=descriptor.dtype).element_size()
    scale = max(int(descriptor.scale), 1)
    while side // 2 >= MIN_TILE and side * side * 3 * element * scale * MEMORY_FACTOR > free:
        side //= 2
    return side


def tile_spans(n: int, side: int, overlap: int) -> tuple[list[int], int]:
    """Tiles along ``n`` pixels: (start offsets, tile length). As few equal tiles of at most
    ``side`` as cover ``n`` with ``overlap`` pixels shared between neighbours, spread evenly
    (512 px in 256-px tiles with 32 of overlap: three of 192 at 0, 160, 320, not full tiles
    at 0, 224, 256 that would compute 2.25 times the image instead of 1.27)."""
    if n <= side:
        return [0], n
    count = -(-(n - overlap) // max(1, side - overlap))    # ceil
    length = min(side, -(-(n + (count - 1) * overlap) // count))
    starts = [round(i * (n - length) / (count - 1)) for i in range(count)]
    return starts, length


def _ramp(length: int, width: int, start: bool, end: bool) -> Any:
    """1-D weights: rising over ``width`` at an inner start, falling at an inner end."""
    import torch

    weights = torch.ones(length)
    width = min(width, length)
    if width > 0:
        rise = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1)
        if start:
            weights[:width] = torch.minimum(weights[:width], rise)
        if end:
            weights[length - width:] = torch.minimum(weights[length - width:], rise.flip(0))
    return weights


def tiled(x: Any, descriptor: Any, side: int, overlap: int) -> Any:
    """``descriptor`` over the (1, C, H, W) float32 CPU tensor ``x`` in feathered tiles; the
    output as a float32 CPU tensor."""
    import torch

    device, dtype = descriptor.device, descriptor.dtype
    _, _, h, w = x.shape
    (ys, th), (xs, tw) = tile_spans(h, side, overlap), tile_spans(w, side, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return descriptor(x.to(device, dtype)).float().cpu()
    scale = int(descriptor.scale)
    out = torch.zeros(1, descriptor.output_channels, h * scale, w * scale)
    total = torch.zeros(1, 1, h * scale, w * scale)
    feather = overlap * scale
    for top in ys:
        rows = _ramp(th * scale, feather, top > 0, top + th < h)
        for left in xs:
            cols = _ramp(tw * scale, feather, left > 0, left + tw < w)
            mask = rows[:, None] * cols[None, :]
            patch = x[:, :, top:top + th, left:left + tw].to(device, dtype)
            pred = descriptor(patch).float().cpu()
            region = (slice(None), slice(None), slice(top * scale, (top + th) * scale),
                      slice(left * scale, (left + tw) * scale))
            out[region] += pred * mask
            total[region] += mask
    return out / total


def to_tensor(image: Any) -> Any:
    """A PIL image as a (1, C, H, W) float32 tensor in 0..1."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def to_image(tensor: Any) -> Any:
    """A (1, C, H, W) tensor in 0..1 as an 8-bit PIL image (RGB, or L for one channel)."""
    import numpy as np
    import torch
    from PIL import Image

    array = (tensor[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0])
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
