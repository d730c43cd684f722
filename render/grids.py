"""Labelled X/Y grid sheets, like A1111's X/Y/Z plot, rebuilt from the ledger alone.

Layout: the job's first grid axis runs across (X), the second down (Y); every further axis
gives separate sheets, one per combination of its values (Z). Images that share a grid cell
(seeds, prompt draws, zip rows: everything beyond the grid axes) are not squeezed into one
cell: each such *variant* gets its own sheet (``-s<seed>`` in the name), because comparing
cfg x sampler is easiest on one seed at a time. A cell with no image (failed, not rendered
yet, file deleted) is drawn empty with a label saying why, so partial runs give sheets too.

A sheet wider or taller than ``max_side`` px, or larger than ``max_pixels``, is split into
pages (``-p1``, ``-p2`` ...) that each repeat the labels. Sheets are written atomically to
``<job dir>/grids/<job>-grid[-<z>][-<variant>][-pN].png``.

Pure Python + Pillow: no torch here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.images import first_frame
from render.ledger import LedgerRow
from render.metadata import VIDEO_SUFFIXES, format_number
from render.output import atomic_write, safe_name
from render.tasks import Job

#: Browsers, WebP and most viewers handle up to 16384 px a side.
MAX_SIDE = 16384
#: Half of Pillow's decompression-bomb limit: every viewer (and Pillow) opens the sheet.
MAX_PIXELS = 89_478_485 // 2
MAX_LABEL_LINES = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
EMPTY_FILL = (224, 224, 224)
FAILED_INK = (170, 0, 0)


@dataclass(frozen=True)
class Layout:
    """Geometry of one sheet page: margins for labels plus a ``cols`` x ``rows`` block."""

    cell_w: int
    cell_h: int
    left: int      # Y labels
    title: int     # title line (job, Z values, variant)
    top: int       # X labels
    cols: int
    rows: int
    pad: int = 4

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.cols * self.cell_w, self.title + self.top + self.rows * self.cell_h

    def cell_box(self, col: int, row: int) -> tuple[int, int, int, int]:
        x = self.left + col * self.cell_w
        y = self.title + self.top + row * self.cell_h
        return x, y, x + self.cell_w, y + self.cell_h


def _label_value(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _text_w(font: Any, text: str) -> int:
    return int(math.ceil(font.getlength(text)))


def _wrap(font: Any, text: str, width: int, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """Greedy word wrap to ``width`` px; over-long words are cut; at most ``max_lines``."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_w(font, candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and _text_w(font, line + ch) > width:
                    lines.append(line)
                    line = ch
                else:
                    line += ch
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_w(font, last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


@dataclass
class _Sheet:
    z: tuple[str, ...]                       # Z value keys
    z_labels: list[str]
    variant: tuple[Any, ...]
    cells: dict[tuple[int, int], LedgerRow]


def _variant_parts(row: LedgerRow, grid_axes: Sequence[str]) -> tuple[Any, ...]:
    """What tells apart the images of one cell: seed, zip values, prompt draw."""
    settings = row.settings
    axes = row.axes
    zip_values = tuple(sorted((k, _key(v)) for k, v in axes.items() if k not in grid_axes))
    if {"prompt", "prompt_sr"} & set(grid_axes):
        draw: tuple[Any, ...] = ()
    else:
        draw = (settings.get("template", ""), tuple(settings.get("picks") or ()))
    return settings.get("seed"), zip_values, draw


def plan_sheets(rows: Iterable[LedgerRow], job: Job) -> tuple[list[_Sheet], list[list[str]]]:
    """Group a job's rows into sheets; returns the sheets and each axis's value labels."""
    axes = list(job.grid_axes)
    usable = sorted(
        (r for r in rows if r.job == job.name and r.status in ("done", "failed")
         and all(a in r.axes for a in axes)),
        key=lambda r: (r.index, r.id),
    )
    values: list[dict[str, int]] = [{} for _ in axes]
    labels: list[list[str]] = [[] for _ in axes]
    for row in usable:
        for k, axis in enumerate(axes):
            key = _key(row.axes[axis])
            if key not in values[k]:
                values[k][key] = len(values[k])
                labels[k].append(_label_value(row.axes[axis]))
    variants: dict[tuple[Any, ...], int] = {}
    seen: dict[tuple[Any, ...], int] = {}
    sheets: dict[tuple[tuple[str, ...], tuple[Any, ...]], _Sheet] = {}
    for row in usable:
        keys = [_key(row.axes[a]) for a in axes]
        x = values[0][keys[0]] if axes else 0
        y = values[1][keys[1]] if len(axes) > 1 else 0
        z = tuple(keys[2:])
        base = _variant_parts(row, axes)
        occurrence = seen.get((z, x, y, base), 0)
        seen[(z, x, y, base)] = occurrence + 1
        variant = (*base, occurrence)
        variants.setdefault(variant, len(variants))
        sheet = sheets.get((z, variant))
        if sheet is None:
            z_labels = [f"{a}: {labels[k + 2][values[k + 2][zk]]}"
                        for k, (a, zk) in enumerate(zip(axes[2:], z, strict=True))]
            sheet = sheets[(z, variant)] = _Sheet(z, z_labels, variant, {})
        sheet.cells.setdefault((x, y), row)

    def order(s: _Sheet) -> tuple[Any, ...]:
        zpos = tuple(values[k + 2][zk] for k, zk in enumerate(s.z))
        return zpos, variants[s.variant]

    return sorted(sheets.values(), key=order), labels


def _variant_names(sheets: list[_Sheet]) -> dict[tuple[Any, ...], str]:
    """File-name parts for variants: only the parts that differ between them."""
    variants = list(dict.fromkeys(s.variant for s in sheets))
    if len(variants) <= 1:
        return dict.fromkeys(variants, "")
    seeds, zips, draws, occ = (len({v[i] for v in variants}) > 1 for i in range(4))
    draw_ids = {d: n for n, d in enumerate(dict.fromkeys(v[2] for v in variants), 1)}
    names = {}
    for v in variants:
        parts = []
        if seeds:
            parts.append(f"s{v[0]}")
        if zips:
            parts.extend(f"{k}={_label_value(json.loads(val))}" for k, val in v[1])
        if draws:
            parts.append(f"p{draw_ids[v[2]]}")
        if occ:
            parts.append(f"n{v[3] + 1}")
        names[v] = "-".join(parts)
    return names


def _variant_title(variant: tuple[Any, ...]) -> str:
    seed, zips, draw, _ = variant
    parts = [f"seed {seed}"]
    parts.extend(f"{k}: {_label_value(json.loads(v))}" for k, v in zips)
    if draw and draw[1]:
        parts.append("picks: " + ", ".join(map(str, draw[1])))
    return ", ".join(parts)


def _cell_size(rows: Iterable[LedgerRow]) -> tuple[int, int]:
    from PIL import Image

    w = h = 0
    for row in rows:
        size = None
        if row.status == "done" and row.paths:
            try:
                if row.paths[0].suffix.lower() in VIDEO_SUFFIXES:
                    size = first_frame(row.paths[0]).size
                else:
                    with Image.open(row.paths[0]) as im:
                        size = im.size
            except OSError:
                size = None
        if size is None:
            size = (int(row.settings.get("width") or 0), int(row.settings.get("height") or 0))
        w, h = max(w, size[0]), max(h, size[1])
    return max(w, 16), max(h, 16)


def make_layout(
    font: Any, x_labels: list[str], y_labels: list[str], cell: tuple[int, int], *,
    max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
) -> Layout:
    """Margins from the label text, then how many cells fit on one page."""
    cw, ch = cell
    pad = max(4, getattr(font, "size", 12) // 3)
    line_h = _line_height(font)
    x_lines = max((len(_wrap(font, t, cw - 2 * pad)) for t in x_labels), default=1)
    top = x_lines * line_h + 2 * pad
    left = 0
    if y_labels:
        natural = max(_text_w(font, t) for t in y_labels) + 2 * pad
        left = min(natural, max(cw, 2 * pad + 4 * line_h))
    title = line_h + 2 * pad
    cols = max(1, min(len(x_labels) or 1, (max_side - left) // cw))
    rows = max(1, min(len(y_labels) or 1, (max_side - title - top) // ch))
    while rows > 1 and (left + cols * cw) * (title + top + rows * ch) > max_pixels:
        rows -= 1
    while cols > 1 and (left + cols * cw) * (title + top + rows * ch) > max_pixels:
        cols -= 1
    return Layout(cw, ch, left, title, top, cols, rows, pad)


def _line_height(font: Any) -> int:
    box = font.getbbox("Ág")
    return int(box[3] - min(box[1], 0)) + 2


def _draw_lines(draw: Any, font: Any, lines: list[str], box: tuple[int, int, int, int],
                fill: tuple[int, int, int] = INK) -> None:
    """Centre ``lines`` in ``box``."""
    x0, y0, x1, y1 = box
    line_h = _line_height(font)
    y = y0 + max(0, (y1 - y0 - line_h * len(lines)) // 2)
    for line in lines:
        w = _text_w(font, line)
        draw.text((x0 + max(0, (x1 - x0 - w) // 2), y), line, font=font, fill=fill)
        y += line_h


def _empty_reason(row: LedgerRow | None) -> tuple[str, tuple[int, int, int]]:
    if row is None:
        return "not rendered", INK
    if row.status == "failed":
        first = (row.error or "").strip().splitlines()[:1]
        return "failed" + (f": {first[0]}" if first else ""), FAILED_INK
    return "file missing", INK


def render_page(
    sheet_cells: Mapping[tuple[int, int], LedgerRow], layout: Layout, font: Any,
    x_labels: list[str], y_labels: list[str], title: str, col0: int, row0: int,
) -> Any:
    """Draw one page: title, X labels, Y labels and the cells from ``(col0, row0)`` on."""
    from PIL import Image, ImageDraw

    cols = min(layout.cols, max(len(x_labels), 1) - col0)
    rows = min(layout.rows, max(len(y_labels), 1) - row0)
    layout = dataclasses.replace(layout, cols=cols, rows=rows)  # the last pages are smaller
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    pad = layout.pad
    t = title
    while t and _text_w(font, t) > layout.size[0] - 2 * pad:
        t = t[:-2] + "…" if len(t) > 2 else ""
    draw.text((pad, pad), t, font=font, fill=INK)
    for c in range(cols):
        x0, _, x1, _ = layout.cell_box(c, 0)
        if x_labels:
            lines = _wrap(font, x_labels[col0 + c], layout.cell_w - 2 * pad)
            _draw_lines(draw, font, lines, (x0, layout.title, x1, layout.title + layout.top))
    for r in range(rows):
        _, y0, _, y1 = layout.cell_box(0, r)
        if y_labels:
            lines = _wrap(font, y_labels[row0 + r], layout.left - 2 * pad)
            _draw_lines(draw, font, lines, (0, y0, layout.left, y1))
    for r in range(rows):
        for c in range(cols):
            box = layout.cell_box(c, r)
            row = sheet_cells.get((col0 + c, row0 + r))
            if not _paste(sheet, row, box):
                text, ink = _empty_reason(row)
                inset = (box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2)
                draw.rectangle(inset, fill=EMPTY_FILL)
                _draw_lines(draw, font, _wrap(font, text, layout.cell_w - 4 * pad), inset, ink)
    return sheet


def _paste(sheet: Any, row: LedgerRow | None, box: tuple[int, int, int, int]) -> bool:
    if row is None or row.status != "done" or not row.paths:
        return False
    try:
        image = first_frame(row.paths[0])   # an animation's sheet shows its first frame
    except OSError:
        return False
    cw, ch = box[2] - box[0], box[3] - box[1]
    if image.width > cw or image.height > ch:
        image.thumbnail((cw, ch))
    sheet.paste(image, (box[0] + (cw - image.width) // 2, box[1] + (ch - image.height) // 2))
    return True


@dataclass
class GridPlan:
    """Everything ``build_grids`` draws: the sheets, their shared layout, font and labels."""

    sheets: list[_Sheet]
    layout: Layout
    font: Any
    x_labels: list[str]
    y_labels: list[str]

    @property
    def pages(self) -> tuple[int, int]:
        """(column pages, row pages) of every sheet."""
        return (math.ceil(max(len(self.x_labels), 1) / self.layout.cols),
                math.ceil(max(len(self.y_labels), 1) / self.layout.rows))


def plan_grids(
    rows: Iterable[LedgerRow], job: Job, *,
    max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
) -> GridPlan | None:
    """Sheets and geometry for a job's rows; None when there is nothing to draw."""
    if not job.grid_axes:
        return None
    sheets, labels = plan_sheets(rows, job)
    if not sheets:
        return None
    axes = list(job.grid_axes)
    x_labels = [f"{axes[0]}: {v}" for v in labels[0]]
    y_labels = [f"{axes[1]}: {v}" for v in labels[1]] if len(axes) > 1 else []
    cw, ch = _cell_size(r for s in sheets for r in s.cells.values())
    font = _font(max(14, min(64, round((cw + ch) / 30))))
    layout = make_layout(font, x_labels, y_labels, (cw, ch), max_side=max_side,
                         max_pixels=max_pixels)
    if layout.left + cw > max_side or layout.title + layout.top + ch > max_side:
        scale = min((max_side - layout.left) / cw, (max_side - layout.title - layout.top) / ch)
        cw, ch = max(16, int(cw * scale)), max(16, int(ch * scale))
        layout = make_layout(font, x_labels, y_labels, (cw, ch), max_side=max_side,
                             max_pixels=max_pixels)
    return GridPlan(sheets, layout, font, x_labels, y_labels)


def build_grids(
    rows: Iterable[LedgerRow], job: Job, out_dir: Path, *,
    max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
) -> list[Path]:
    """Write the job's grid sheets under ``out_dir/grids/``; return their paths in order.

    ``rows`` are the ledger rows of the job (others are ignored); a job without grid axes
    gets no sheet. Rebuilding overwrites the sheets of the same name.
    """
    plan = plan_grids(rows, job, max_side=max_side, max_pixels=max_pixels)
    if plan is None:
        return []
    layout = plan.layout
    variant_names = _variant_names(plan.sheets)
    col_pages, row_pages = plan.pages
    folder = Path(out_dir) / "grids"
    written: list[Path] = []
    for sheet in plan.sheets:
        stem = f"{job.name}-grid"
        if sheet.z_labels:
            stem += "-" + "_".join(lbl.replace(": ", "=") for lbl in sheet.z_labels)
        if variant_names[sheet.variant]:
            stem += "-" + variant_names[sheet.variant]
        title = " | ".join([job.name, *sheet.z_labels, _variant_title(sheet.variant)])
        page = 0
        for pr in range(row_pages):
            for pc in range(col_pages):
                page += 1
                image = render_page(sheet.cells, layout, plan.font, plan.x_labels,
                                    plan.y_labels, title, pc * layout.cols, pr * layout.rows)
                suffix = f"-p{page}" if col_pages * row_pages > 1 else ""
                name = safe_name(stem.replace(" ", "_"), limit=170) + suffix + ".png"
                path = folder / name
                atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                written.append(path)
    return written
