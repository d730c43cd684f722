"""Input images (img2img sources, masks, depth-to-image inits) as a pipeline takes them, the
frames of an animated input (a GIF, animated WebP, video or folder of images: video-to-video,
ControlNet over frames), and the first frame of an output (grid sheets and gallery thumbnails
of animations)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from render.errors import FieldError, UserError
from render.hashing import per_file_version


def load_image(path: str, width: int, height: int, mode: str = "RGB") -> Any:
    """A new PIL image of ``path`` in ``mode``, resized to the task's size with Lanczos
    (A1111's resize for inputs whose size differs); an unreadable file is one line. Of an
    animated input (GIF, WebP, video) this is the first frame."""
    from PIL import Image

    from render.metadata import VIDEO_SUFFIXES

    try:
        if Path(path).suffix.lower() in VIDEO_SUFFIXES:
            im = first_frame(path).convert(mode)
        else:   # straight to ``mode``: a 16-bit or palette mask is not first made RGB
            with Image.open(path) as source:
                im = source.convert(mode)
    except OSError as exc:
        raise UserError(f"{path}: cannot read image: {exc}") from exc
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    return im


#: The image files a folder of frames is made of, in file-name order.
FRAME_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def frame_files(folder: str | Path) -> list[Path]:
    """The frames of a folder of images, sorted by name (``0001.png``, ``0002.png`` ...)."""
    return sorted((p for p in Path(folder).iterdir()
                   if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")),
                  key=lambda p: p.name)


def frame_count(path: str | Path) -> int:
    """How many frames an input holds (1 for a still image), torch-free; ``OSError`` when
    it cannot be read. Remembered per file version: preflight asks for every task, and a
    video is decoded to count (its header may not say)."""
    return _frame_count(Path(path))


def _count_frames(path: Path) -> int:
    from PIL import Image

    from render.metadata import VIDEO_SUFFIXES

    if path.is_dir():
        return len(frame_files(path))
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return sum(1 for _ in _video_frames(path, images=False))
    with Image.open(path) as im:
        return int(getattr(im, "n_frames", 1))


_frame_count = per_file_version(_count_frames)


def load_frames(path: str | Path, width: int | None = None, height: int | None = None, *,
                limit: int | None = None) -> list[Any]:
    """The first ``limit`` (all: None) frames of an input as RGB PIL images, at the task's
    size when ``width`` and ``height`` are given (Lanczos, as :func:`load_image`), else each
    at its own: every frame of a GIF, animated WebP, video or folder of images; a still
    image is one frame. Unreadable: one line (UserError)."""
    from PIL import Image, ImageSequence

    from render.metadata import VIDEO_SUFFIXES

    path = Path(path)
    try:
        if path.is_dir():
            frames = []
            for file in frame_files(path)[:limit]:
                with Image.open(file) as im:
                    frames.append(im.convert("RGB"))
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            frames = _decode_video(path, limit=limit)
        else:
            with Image.open(path) as im:
                frames = [f.convert("RGB") for _, f in zip(
                    range(limit or 1 << 30), ImageSequence.Iterator(im), strict=False)]
    except OSError as exc:
        raise UserError(f"{path}: cannot read frames: {exc}") from exc
    if not frames:
        raise UserError(f"{path}: no frame to read")
    if width is None or height is None:
        return frames
    return [f if f.size == (width, height) else f.resize((width, height),
                                                          Image.Resampling.LANCZOS)
            for f in frames]


def check_image(path: str | Path) -> None:
    """Raise FieldError unless ``path`` decodes as an image: preflight opens and decodes each
    input once (per file version), so a truncated file, a non-image or a decompression bomb
    is a located error before any model loads instead of a failed task at render time."""
    try:
        problem = _decode_problem(Path(path))
    except OSError as exc:   # gone or unreadable since validation
        problem = f"cannot read {path}: {exc.strerror or exc}"
    if problem:
        raise FieldError(problem)


def _decode(path: Path) -> str | None:
    """Why ``path`` cannot be used as an input image, or None. Pillow's decompression-bomb
    warning (more than ``Image.MAX_IMAGE_PIXELS`` pixels) counts as an error: such an image
    costs gigabytes to decode, and no render needs one that large."""
    from PIL import Image

    from render.metadata import VIDEO_SUFFIXES

    if path.suffix.lower() in VIDEO_SUFFIXES:   # a video input: its first frame decodes
        try:
            _decode_video(path, limit=1)
        except OSError as exc:
            return f"{path} cannot be decoded as a video: {exc}"
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return (f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's"
                " decompression-bomb limit); shrink it before using it as an input")
    except Image.UnidentifiedImageError:
        return f"{path} is not an image Pillow can read"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        return f"{path} cannot be decoded (truncated or damaged?): {exc}"
    return None


_decode_problem = per_file_version(_decode)


def first_frame(path: str | Path) -> Any:
    """A new RGB PIL image of ``path``'s first frame: a still image, a GIF or animated WebP
    (Pillow opens its first frame), or a video (``render.metadata.VIDEO_SUFFIXES``, decoded
    with PyAV, imported lazily). Raises ``OSError`` when it cannot be read."""
    from PIL import Image

    from render.metadata import VIDEO_SUFFIXES

    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _decode_video(path, limit=1)[0]
    with Image.open(path) as im:
        im.seek(0)
        return im.convert("RGB")


def video_frames(path: str | Path) -> list[Any]:
    """Every frame of a video as RGB PIL images (PyAV); ``OSError`` when it cannot be read
    (a truncated file fails here, which is how the disk check knows a video is whole)."""
    return _decode_video(Path(path))


def _decode_video(path: Path, limit: int | None = None) -> list[Any]:
    """The first ``limit`` frames (all: None) of a video as RGB PIL images, at least one, or
    ``OSError``."""
    return list(_video_frames(path, limit))


def _video_frames(path: Path, limit: int | None = None, *, images: bool = True
                  ) -> Iterator[Any]:
    """The first ``limit`` (all: None) frames of a video's first stream, at least one: RGB
    PIL images, or PyAV's own frames when not ``images`` (counting needs no conversion);
    ``OSError`` when it cannot be read (a truncated file fails here)."""
    count = 0
    try:
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                count += 1
                yield frame.to_image().convert("RGB") if images else frame
                if limit is not None and count >= limit:
                    break
    except Exception as exc:  # noqa: BLE001 - PyAV's errors: any means "cannot be read"
        raise OSError(f"{path}: cannot decode video: {exc}") from exc
    if not count:
        raise OSError(f"{path}: no video frame")
