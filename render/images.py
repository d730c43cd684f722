"""Input images (img2img sources, masks, depth-to-image inits) as a pipeline takes them."""

from __future__ import annotations

from typing import Any

from render.errors import UserError


def load_image(path: str, width: int, height: int, mode: str = "RGB") -> Any:
    """A new PIL image of ``path`` in ``mode``, resized to the task's size with Lanczos
    (A1111's resize for inputs whose size differs); an unreadable file is one line."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            return im
    except OSError as exc:
        raise UserError(f"{path}: cannot read image: {exc}") from exc
