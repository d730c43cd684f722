"""Animation outputs: ``output.format: gif | webp | mp4 | png-frames`` and ``save_frames``.

A result with more than one image is an animation (``render.api.Result``: its frames, with
``fps`` and ``loop`` set by whatever made them, e.g. AnimateDiff). Job file::

    output:
      format: mp4          # gif | webp | mp4 | png-frames
      save_frames: true    # also each frame as <name>-frames-0000.png, with its infotext

- ``gif``: Pillow, each frame quantised to its own 256-colour palette. GIF times frames in
  centiseconds, so per-frame durations alternate (8 fps: 120, 130, 130, 120 ms ...) to keep
  the average exact; ``loop: false`` writes no NETSCAPE block (plays once). The infotext is
  the comment extension (what sd-webui-animatediff writes, and A1111's PNG Info reads from
  ``info["comment"]``); the provenance is an XMP application extension (Pillow writes no XMP
  for GIF; ``render.api.gif_with_xmp`` appends Adobe's "XMP DataXMP" block).
- ``webp``: the core registers the format and writes a single image as a still WebP; this
  plugin's ``write_output`` runs first (``tryfirst``) and takes a result with more than one
  image: an animated WebP (Pillow, quality 92 as the still writer), loop 0 (forever) or 1
  (once), the infotext in EXIF UserComment and the provenance in XMP, as a still WebP.
- ``mp4``: H.264 (libx264, yuv420p, CRF 18) through PyAV, frame rate as the stream's time
  base (a Fraction of ``fps``). PyAV rather than imageio-ffmpeg: it reads and writes the
  container's metadata in-process (no ffmpeg subprocess, no ffprobe), and decodes the first
  frame for grid sheets and thumbnails; its wheels bundle FFmpeg with libx264. The infotext
  is the ``comment`` tag, the provenance JSON the ``description`` tag (the mp4 muxer keeps
  both). An odd width or height is padded by one pixel (yuv420p needs even sizes). MP4 has
  no loop flag: ``loop`` is in the provenance (``animation.loop``) and the gallery loops.
- ``png-frames``: numbered PNGs beside each other, ``<name>-0000.png`` ... (no folder: the
  ledger records each file, grids and the gallery use the first). Every frame has its
  infotext (with ``Frame: 1/16``); the first holds the provenance (``--replay`` it), the
  others a marker naming the task, as side files do.
- ``save_frames: true``: for an animation in any format, each frame is also written as
  ``<name>-frames-0000.png`` with its infotext. The frames travel as ``result.extras``
  (``frames-0000`` ...), which the core writes when ``output.save_frames`` is on, as it does
  ``save_control``; ``write_output`` gives each its final infotext first. With
  ``png-frames`` they would be the same files twice, so that format drops them.

``fps`` None is 8 (AnimateDiff's default). All writes go through ``atomic_write``.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Any

from render.api import (
    atomic_write,
    exif_bytes,
    expect_bool,
    frame_infotext,
    frame_pnginfo,
    gif_with_xmp,
    hookimpl,
    png_info,
    provenance_json,
    xmp_packet,
)

DEFAULT_FPS = 8.0
WEBP_QUALITY = 92
MP4_CRF = 18
FRAMES_EXTRA = "frames"   # extras "frames-0000" ...; written when output.save_frames is on
WRITES = ("gif", "mp4", "png-frames")


@hookimpl
def register_output_formats(register):
    register("gif", ".gif", animated=True,
             doc="animated GIF (Pillow); infotext in the comment, provenance in XMP")
    register("mp4", ".mp4", animated=True,
             doc="H.264 MP4 (PyAV); infotext in the comment tag, provenance in description")
    register("png-frames", ".png", animated=True,
             doc="numbered PNG frames <name>-0000.png ..., each with its infotext")


@hookimpl
def register_task_fields(register):
    register("save_frames", lambda value, ctx: expect_bool(value), where="output",
             doc="also write an animation's frames as PNGs with their infotext")


class FrameFile:
    """One frame on its way to ``<name>-frames-0000.png`` (an extra the core saves).

    The core calls ``save(path, format="PNG", pnginfo=marker)``; the provenance with the
    final infotext, known only once the result is described, is set by ``write_output``
    (``prov``); without it the frame gets the core's marker alone.
    """

    def __init__(self, image: Any, index: int, count: int) -> None:
        self.image, self.index, self.count = image, index, count
        self.prov: dict[str, Any] | None = None

    def save(self, fp: Any, format: str = "PNG", pnginfo: Any = None) -> None:
        if self.prov is not None and isinstance(self.prov.get("infotext"), str):
            pnginfo = frame_pnginfo(self.prov["infotext"], self.prov, self.index, self.count)
        self.image.save(fp, format=format, pnginfo=pnginfo)


@hookimpl(trylast=True)
def postprocess(result):
    """Put an animation's frames into ``result.extras`` for ``save_frames`` (after every
    other postprocess, so they are the final frames)."""
    frames = result.images
    for key in [k for k in result.extras if k.startswith(FRAMES_EXTRA + "-")]:
        del result.extras[key]
    if len(frames) > 1:
        for i, frame in enumerate(frames):
            result.extras[f"{FRAMES_EXTRA}-{i:04}"] = FrameFile(frame, i, len(frames))
    return result


@hookimpl(tryfirst=True)
def write_output(result, path, fmt):
    fmt = fmt.lower()
    for extra in result.extras.values():
        if isinstance(extra, FrameFile):
            extra.prov = result.provenance
    if fmt == "webp" and len(result.images) > 1:
        return [atomic_write(Path(path), lambda tmp: _webp(result, tmp))]
    if fmt not in WRITES:
        return None
    if not result.images:
        raise ValueError(f"task {result.task.id or result.task.index}: no frame to write")
    if not isinstance(result.provenance.get("infotext"), str):
        raise ValueError("result.provenance has no 'infotext'")
    if fmt == "png-frames":
        for key in [k for k, v in result.extras.items() if isinstance(v, FrameFile)]:
            del result.extras[key]   # the frames are the output already
        return _png_frames(result, Path(path))
    write = _gif if fmt == "gif" else _mp4
    return [atomic_write(Path(path), lambda tmp: write(result, tmp))]


def _fps(result: Any) -> float:
    fps = result.fps
    return float(fps) if fps and fps > 0 else DEFAULT_FPS


def _durations_ms(count: int, fps: float, step: int = 1) -> list[int]:
    """Per-frame durations whose running sum stays on the exact timeline, in units of
    ``step`` ms (GIF: 10)."""
    ticks = [round(i * 1000 / fps / step) for i in range(count + 1)]
    return [max(1, b - a) * step for a, b in zip(ticks, ticks[1:], strict=False)]


def _gif(result: Any, tmp: Path) -> None:
    from PIL import Image

    prov = result.provenance
    frames = [im.convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG)
              for im in result.images]
    options: dict[str, Any] = {"loop": 0} if result.loop else {}
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                   duration=_durations_ms(len(frames), _fps(result), step=10),
                   disposal=1, optimize=False, comment=prov["infotext"].encode("utf-8"),
                   **options)
    tmp.write_bytes(gif_with_xmp(buffer.getvalue(), xmp_packet(prov)))


def _webp(result: Any, tmp: Path) -> None:
    prov = result.provenance
    frames = [im.convert("RGB") for im in result.images]
    frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:],
                   duration=_durations_ms(len(frames), _fps(result)),
                   loop=0 if result.loop else 1, quality=WEBP_QUALITY,
                   exif=exif_bytes(prov["infotext"]), xmp=xmp_packet(prov))


def _mp4(result: Any, tmp: Path) -> None:
    import av
    import numpy as np

    prov = result.provenance
    rate = Fraction(_fps(result)).limit_denominator(1001)
    width, height = result.images[0].size
    even = (width + width % 2, height + height % 2)
    with av.open(str(tmp), mode="w", format="mp4") as container:
        container.metadata["comment"] = prov["infotext"]
        container.metadata["description"] = provenance_json(prov)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for image in result.images:
            rgb = np.asarray(_padded(image.convert("RGB"), even))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _padded(image: Any, size: tuple[int, int]) -> Any:
    if image.size == size:
        return image
    from PIL import Image

    canvas = Image.new("RGB", size)
    canvas.paste(image, (0, 0))
    # repeat the last column/row rather than leave black edges
    if size[0] > image.width:
        canvas.paste(image.crop((image.width - 1, 0, image.width, image.height)),
                     (image.width, 0))
    if size[1] > image.height:
        canvas.paste(canvas.crop((0, image.height - 1, size[0], image.height)),
                     (0, image.height))
    return canvas


def _png_frames(result: Any, path: Path) -> list[Path]:
    prov = result.provenance
    text, count = prov["infotext"], len(result.images)
    written = []
    for i, image in enumerate(result.images):
        target = path.with_name(f"{path.stem}-{i:04}.png")
        info = (png_info(frame_infotext(text, i, count), prov) if i == 0
                else frame_pnginfo(text, prov, i, count))
        written.append(atomic_write(target, lambda tmp, im=image, info=info: im.save(
            tmp, format="PNG", pnginfo=info)))
    return written
