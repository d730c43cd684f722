"""Drawing grid sheets: fonts, word wrap, page geometry, pages and the combined Z sheet.

What A1111's X/Y/Z plot gets wrong and this does not: a label is wrapped at spaces only, and
a column is made wide enough for its widest word (``tiny-motion-lora:``, ``controlnet.0.scale``
stay whole), so no label is ever cut, broken mid-word or ended with ``...``; the title wraps
over as many lines as it needs. Fonts and
margins scale with the cell size. Pure Pillow: ``render.grids`` decides what goes where.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
EMPTY_FILL = (224, 224, 224)
FAILED_INK = (170, 0, 0)


def font(size: int) -> Any:
    """Pillow's scalable default font at ``size`` px (the bitmap font without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def font_for_cell(cell_w: int, cell_h: int) -> Any:
    """A1111's rule, ``(w + h) / 25``, kept readable for tiny cells and sane for huge ones."""
    return font(max(12, min(72, round((cell_w + cell_h) / 25))))


def pad_for(fnt: Any) -> int:
    """The margin around labels and between panels, in proportion to the font."""
    return max(4, getattr(fnt, "size", 12) // 3)


def text_width(fnt: Any, text: str) -> int:
    return int(math.ceil(fnt.getlength(text)))


def line_height(fnt: Any) -> int:
    box = fnt.getbbox("Ág")
    return int(box[3] - min(box[1], 0)) + max(2, getattr(fnt, "size", 12) // 6)


def words(text: str) -> list[str]:
    """The pieces a line may break between: words, each but the last with its space."""
    pieces = [w + " " for w in text.split(" ")]
    pieces[-1] = pieces[-1][:-1]
    return pieces


def widest_word(fnt: Any, texts: Sequence[str]) -> int:
    """The width of the widest piece of any text: the narrowest column that needs no cut."""
    return max((text_width(fnt, w.strip()) for t in texts for line in t.split("\n")
                for w in words(line)), default=0)


def wrap(fnt: Any, text: str, width: int) -> list[str]:
    """Greedy wrap to ``width`` px at word boundaries only; never cuts, never drops text.

    A single piece wider than ``width`` stays whole on its own line (the callers size their
    boxes with ``widest_word`` so that this does not happen).
    """
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for piece in words(para):
            candidate = line + piece
            if line and text_width(fnt, candidate.rstrip()) > width:
                lines.append(line.rstrip())
                line = piece.lstrip()
            else:
                line = candidate
        lines.append(line.rstrip())
    return lines or [""]


MIN_CELL_FONT = 8


def fit_text(fnt: Any, text: str, width: int, height: int) -> tuple[Any, list[str]]:
    """A blank cell's reason in the largest font (down to 8 px) whose word-wrapped lines fit
    ``width`` x ``height``; at 8 px, the lines that fit, the last ending in "…" (the whole
    error is in the sheet's ``render-grid`` chunk and in the gallery)."""
    size = getattr(fnt, "size", 12)
    while True:
        lines = wrap(fnt, text, width)
        fits_wide = all(text_width(fnt, line) <= width for line in lines)
        if fits_wide and len(lines) * line_height(fnt) <= height:
            return fnt, lines
        if size <= MIN_CELL_FONT:
            break
        size = max(MIN_CELL_FONT, int(size * 0.85))
        fnt = font(size)
    keep = max(1, height // line_height(fnt))
    if len(lines) <= keep:
        return fnt, lines
    shown = lines[:keep]
    shown[-1] = shown[-1].rstrip() + " …"
    while len(shown[-1]) > 2 and text_width(fnt, shown[-1]) > width:
        shown[-1] = shown[-1][:-3].rstrip() + " …"
    return fnt, shown


def draw_lines(draw: Any, fnt: Any, lines: list[str], box: tuple[int, int, int, int],
               fill: tuple[int, int, int] = INK, *, centre: bool = True) -> None:
    """Write ``lines`` into ``box``, centred (or from the top left)."""
    x0, y0, x1, y1 = box
    lh = line_height(fnt)
    y = y0 + (max(0, (y1 - y0 - lh * len(lines)) // 2) if centre else 0)
    for line in lines:
        w = text_width(fnt, line)
        x = x0 + max(0, (x1 - x0 - w) // 2) if centre else x0
        draw.text((x, y), line, font=fnt, fill=fill)
        y += lh


@dataclass(frozen=True)
class Layout:
    """One page: a title block, X labels on top, Y labels at the left, ``cols`` x ``rows``
    cells of ``cell_w`` x ``cell_h`` (a cell may be wider than its image: the widest word of
    an X label decides)."""

    cell_w: int
    cell_h: int
    left: int
    title: int
    top: int
    cols: int
    rows: int
    pad: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.cols * self.cell_w, self.title + self.top + self.rows * self.cell_h

    def cell_box(self, col: int, row: int) -> tuple[int, int, int, int]:
        x = self.left + col * self.cell_w
        y = self.title + self.top + row * self.cell_h
        return x, y, x + self.cell_w, y + self.cell_h


def make_layout(fnt: Any, x_labels: Sequence[str], y_labels: Sequence[str],
                image_size: tuple[int, int], *, max_side: int, max_pixels: int,
                cell_texts: Sequence[str] = (), title: str = "") -> Layout:
    """Label margins from the text, then how many cells fit on one page of the limits.

    ``cell_texts`` (the reasons written into empty cells) widen the cells too, so that even
    a blank's error wraps at words. The wrapped ``title`` counts against the limits.
    """
    pad = pad_for(fnt)
    lh = line_height(fnt)
    cw = max(image_size[0], widest_word(fnt, [*x_labels, *cell_texts]) + 2 * pad, 16)
    ch = max(image_size[1], 16)
    x_lines = max((len(wrap(fnt, t, cw - 2 * pad)) for t in x_labels), default=0)
    top = x_lines * lh + 2 * pad if x_labels else 0
    left = 0
    if y_labels:
        natural = max(text_width(fnt, t) for t in y_labels)
        target = max(widest_word(fnt, y_labels),
                     min(natural, max(round(cw * 0.75), 8 * getattr(fnt, "size", 12))))
        left = target + 2 * pad
    n_cols, n_rows = len(x_labels) or 1, len(y_labels) or 1
    best = (0, 1, 1)                     # (cells, cols, rows): most cells, then widest
    for cols in range(max(1, min(n_cols, (max_side - left) // cw)), 0, -1):
        width = left + cols * cw
        title_h = with_title(Layout(cw, ch, left, 0, top, cols, 1, pad), fnt, title).title
        height = min(max_side, max_pixels // width)
        rows = min(n_rows, (height - title_h - top) // ch)
        if rows < 1:
            continue                     # not even one row at this width
        best = max(best, (cols * rows, cols, rows))
        if rows == n_rows:
            break                        # fewer columns cannot fit more cells
    _, cols, rows = best
    layout = Layout(cw, ch, left, 0, top, cols, rows, pad)
    return with_title(layout, fnt, title)


@dataclass(frozen=True)
class CellArt:
    """What one cell shows: an image, or a grey blank with a reason (red: an error)."""

    image: Any = None
    reason: str = ""
    failed: bool = False


def title_block(fnt: Any, title: str, width: int, pad: int) -> tuple[list[str], int]:
    """The title's wrapped lines for ``width`` px and the block height they take."""
    if not title:
        return [], 0
    lines = wrap(fnt, title, width - 2 * pad)
    return lines, len(lines) * line_height(fnt) + 2 * pad


def page_width(layout: Layout, fnt: Any, title: str) -> int:
    """The page's width: its cells and margins, or the title's widest word if wider."""
    return max(layout.size[0], widest_word(fnt, [title]) + 2 * layout.pad)


def with_title(layout: Layout, fnt: Any, title: str) -> Layout:
    """``layout`` with the title block that ``title`` needs at the page's width."""
    width = page_width(layout, fnt, title)
    return replace(layout, title=title_block(fnt, title, width, layout.pad)[1])


def render_page(layout: Layout, fnt: Any, title: str, x_labels: Sequence[str],
                y_labels: Sequence[str], cell: Callable[[int, int], CellArt]) -> Any:
    """Draw one page of ``with_title(layout, fnt, title)``: the wrapped title, X labels,
    Y labels and ``cell(col, row)`` for each cell (counted from the page's first)."""
    from PIL import Image, ImageDraw

    pad = layout.pad
    width = page_width(layout, fnt, title)
    lines, title_h = title_block(fnt, title, width, pad)
    assert title_h == layout.title, "render_page takes a layout from with_title"
    sheet = Image.new("RGB", (width, layout.size[1]), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw_lines(draw, fnt, lines, (pad, pad, width - pad, title_h), centre=False)
    for c, label in enumerate(x_labels[:layout.cols]):
        x0, y0, x1, _ = layout.cell_box(c, 0)
        draw_lines(draw, fnt, wrap(fnt, label, layout.cell_w - 2 * pad),
                   (x0 + pad, title_h + pad, x1 - pad, y0 - pad))
    for r, label in enumerate(y_labels[:layout.rows]):
        _, y0, _, y1 = layout.cell_box(0, r)
        draw_lines(draw, fnt, wrap(fnt, label, layout.left - 2 * pad),
                   (pad, y0, layout.left - pad, y1))
    for r in range(layout.rows):
        for c in range(layout.cols):
            box = layout.cell_box(c, r)
            art = cell(c, r)
            if art.image is not None:
                _paste(sheet, art.image, box)
                continue
            inset = (box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2)
            draw.rectangle(inset, fill=EMPTY_FILL)
            text_box = (inset[0] + pad // 2, inset[1] + pad // 2, inset[2] - pad // 2,
                        inset[3] - pad // 2)
            small, lines = fit_text(fnt, art.reason, text_box[2] - text_box[0],
                                    text_box[3] - text_box[1])
            draw_lines(draw, small, lines, text_box, FAILED_INK if art.failed else INK)
    return sheet


def _paste(sheet: Any, image: Any, box: tuple[int, int, int, int]) -> None:
    cw, ch = box[2] - box[0], box[3] - box[1]
    if image.width > cw or image.height > ch:
        image = image.copy()
        image.thumbnail((cw, ch))
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    sheet.paste(image, (box[0] + (cw - image.width) // 2, box[1] + (ch - image.height) // 2))


@dataclass(frozen=True)
class _Combined:
    """Where things go on a combined sheet."""

    width: int
    height: int
    title: list[str]
    title_h: int
    heads: list[list[str]]
    head_h: int
    gap: int


def _combined_geometry(fnt: Any, title: str, panels: Sequence[tuple[str, tuple[int, int]]],
                       pad: int) -> _Combined:
    gap = 4 * pad
    width = sum(s[0] for _, s in panels) + gap * (len(panels) - 1)
    width = max(width, widest_word(fnt, [title]) + 2 * pad)
    lines, title_h = title_block(fnt, title, width, pad)
    heads = [wrap(fnt, label, max(s[0] - 2 * pad, widest_word(fnt, [label])))
             for label, s in panels]
    head_h = max(len(h) for h in heads) * line_height(fnt) + 2 * pad
    height = title_h + head_h + max(s[1] for _, s in panels)
    return _Combined(width, height, lines, title_h, heads, head_h, gap)


def combine(fnt: Any, title: str, panels: Sequence[tuple[str, Any]], pad: int) -> Any:
    """A1111's combined X/Y/Z sheet: each Z value's sheet side by side under its Z label,
    the job's title above them all."""
    from PIL import Image, ImageDraw

    g = _combined_geometry(fnt, title, [(label, p.size) for label, p in panels], pad)
    sheet = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw_lines(draw, fnt, g.title, (pad, pad, g.width - pad, g.title_h), centre=False)
    x = 0
    for head, (_, panel) in zip(g.heads, panels, strict=True):
        draw_lines(draw, fnt, head,
                   (x, g.title_h + pad, x + panel.width, g.title_h + g.head_h - pad))
        sheet.paste(panel, (x, g.title_h + g.head_h))
        x += panel.width + g.gap
    return sheet


def combined_size(fnt: Any, title: str, panels: Sequence[tuple[str, tuple[int, int]]],
                  pad: int) -> tuple[int, int]:
    """The size ``combine`` would give, without drawing (to check it against the limits)."""
    g = _combined_geometry(fnt, title, panels, pad)
    return g.width, g.height
