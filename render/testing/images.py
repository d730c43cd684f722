"""Deterministic reference images for img2img, inpainting, ControlNet and depth tests.

Drawn with Pillow primitives only (no randomness, no torch), so they are identical on every
machine and cheap enough to write in each test's tmp dir.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from . import REFERENCE_IMAGES


def house(size: int = 64) -> Image.Image:
    """A house with a roof, door and window on a sky over grass."""

    def box(*xy: int) -> list[int]:
        return [round(v * size / 64) for v in xy]

    img = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle(box(0, 48, 64, 64), fill=(70, 150, 60))  # grass
    draw.rectangle(box(16, 28, 48, 52), fill=(200, 160, 110))  # wall
    roof = box(12, 28, 32, 10, 52, 28)
    draw.polygon(list(zip(roof[::2], roof[1::2], strict=True)), fill=(160, 40, 40))
    draw.rectangle(box(28, 38, 36, 52), fill=(90, 50, 20))  # door
    draw.rectangle(box(19, 32, 25, 38), fill=(250, 250, 200))  # window
    draw.ellipse(box(50, 4, 60, 14), fill=(255, 220, 60))  # sun
    return img


def gradient(size: int = 64) -> Image.Image:
    """Vertical ramp from dark (far, top) to bright (near, bottom)."""
    column = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (column, column, column))


def mask(size: int = 64) -> Image.Image:
    """White rectangle (the region to repaint) on black."""
    img = Image.new("L", (size, size), 0)
    lo, hi = size // 4, 3 * size // 4 - 1
    ImageDraw.Draw(img).rectangle([lo, lo, hi, hi], fill=255)
    return img


def checker(size: int = 64, cell: int = 8) -> Image.Image:
    """Checkerboard of four colours."""
    colours = [(230, 60, 60), (60, 200, 90), (60, 90, 230), (240, 230, 80)]
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(0, size, cell):
        for x in range(0, size, cell):
            colour = colours[((x // cell) + 2 * (y // cell)) % 4]
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
    return img


def write_reference_images(folder: str | Path, size: int = 64) -> dict[str, Path]:
    """Write every image in :data:`REFERENCE_IMAGES` into ``folder``; return name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    makers = {
        "house.png": house,
        "gradient.png": gradient,
        "mask.png": mask,
        "checker.png": checker,
    }
    assert set(makers) == set(REFERENCE_IMAGES)
    out: dict[str, Path] = {}
    for name, make in makers.items():
        path = folder / name
        make(size).save(path, format="PNG", optimize=False)
        out[name] = path
    return out
