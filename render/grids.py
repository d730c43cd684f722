"""Labelled X/Y/Z grid sheets, like A1111's X/Y/Z plot, from a job's tasks and its ledger rows.

**Dimensions.** What varies between a job's tasks: each grid axis (in the order written),
the zip rows, the seeds and the prompt draws (wildcards). ``output.grid: {x, y, z}`` names
the ones to put across, down and from sheet to sheet; unnamed ones are filled from the rest
in that order, so ``grid: {cfg, sampler}`` with ``seeds: [1, 2]`` gives X = cfg, Y = sampler
and Z = seed, as an A1111 user sets it up by hand. Every dimension left over gives separate
sheet sets (``-draw=2``), one per value.

**Sheets.** Per set: one sheet per Z value and, when there are several Z values and the
result fits the limits, A1111's combined sheet with them side by side. A sheet over the pixel
limit (``output.grid.max_pixels``) or 16384 px a side is split into parts that repeat the
labels: never refused. A cell with no image (failed, not rendered yet, file missing) is a
grey blank saying why, so partial runs give whole sheets; the report rebuilds them after
every run. File names, under ``<job dir>/grids/``::

    <job>-grid[-<rest>=<value>...][-<z>=<value>][-part<N>of<M>].png

**Ours only.** Each sheet is recorded in the ledger as it is written and carries a
``render-grid`` text chunk; an existing file under a sheet's name that is neither is left
alone (the sheet is skipped with a warning), and a recorded sheet no longer produced is
deleted only while it is byte-for-byte the one written. Pure Python + Pillow: no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render import grid_draw
from render.images import first_frame
from render.ledger import LedgerRow
from render.metadata import VIDEO_SUFFIXES, format_number, quote
from render.output import atomic_write, safe_name
from render.reconcile import unchanged
from render.tasks import Job, Task

#: Browsers, WebP and most viewers handle up to 16384 px a side.
MAX_SIDE = 16384
#: What marks a sheet as render's (the PNG text chunk that also describes its axes).
SHEET_CHUNK = "render-grid"
#: A1111's X/Y/Z plot names for the core's keys; plugins name theirs (``axis_label``).
CORE_AXIS_NAMES = {
    "prompt": "Prompt", "prompt_sr": "Prompt S/R", "negative": "Negative prompt",
    "seed": "Seed", "seeds": "Seed", "cfg": "CFG Scale", "steps": "Steps",
    "sampler": "Sampler", "schedule": "Schedule type", "size": "Size", "width": "Width",
    "height": "Height", "clip_skip": "Clip skip", "model": "Checkpoint name", "vae": "VAE",
    "strength": "Denoising", "image": "Image", "mask": "Mask",
}
#: Dimension keys of what is not a grid axis.
ZIP, SEED, DRAW = "zip", "seed", "draw"


def axis_value(value: Any) -> str:
    """A value as A1111 prints it on a sheet: ``7``, ``Euler a``, ``0.5``, ``a: 0.5``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {axis_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(axis_value(v) for v in value)
    return str(value)


def default_axis_name(key: str) -> str:
    """The core's name for ``key``; a plugin's dotted key as it is written."""
    return CORE_AXIS_NAMES.get(key, key)


def section_axis_label(key: str, section: str, title: str,
                       names: Mapping[str, str] | None = None) -> str | None:
    """A plugin's ``axis_label`` in one line: ``section`` -> ``title``; ``section.sub`` ->
    ``names[sub]`` when given, else ``title`` and the parts of ``sub`` (each through
    ``names``; a named first part stands for the title): ``lora.add_detail`` -> ``LoRA
    add_detail``, ``controlnet.0.scale`` with ``{"scale": "weight"}`` -> ``ControlNet 0
    weight``. None for another section's key."""
    names = names or {}
    if key == section:
        return title
    if not key.startswith(section + "."):
        return None
    sub = key[len(section) + 1:]
    if sub in names:
        return names[sub]
    parts = sub.split(".")
    head = [] if parts[0] in names else [title]
    return " ".join([*head, *(names.get(part, part) for part in parts)])


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# -- what varies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One task as a sheet sees it: its value on each dimension, and its ledger row."""

    index: int
    id: str
    values: Mapping[str, Any]
    row: LedgerRow | None


def _dimension_values(job: Job, axes: Mapping[str, Any], seed: Any, template: str,
                      picks: Sequence[str], prompt: str) -> dict[str, Any] | None:
    values: dict[str, Any] = {}
    for axis in job.grid_axes:
        if axis not in axes:
            return None
        values[axis] = axes[axis]
    if job.zip_axes:
        if not all(k in axes for k in job.zip_axes):
            return None
        values[ZIP] = [axes[k] for k in job.zip_axes]
    if "seed" not in job.grid_axes and "seed" not in job.zip_axes:
        values[SEED] = seed
    if not {"prompt", "prompt_sr"} & {*job.grid_axes, *job.zip_axes}:
        values[DRAW] = [template, list(picks), prompt]
    return values


def grid_entries(job: Job, tasks: Iterable[Task], rows: Iterable[LedgerRow]) -> list[Entry]:
    """The job's entries: each planned task (this run's expansion, which decides its values
    on the axes) with its ledger row; then the ledger's done or failed rows at indices the run
    did not plan (a ``--limit`` run), with the values recorded with them."""
    by_id = {r.id: r for r in rows if r.job == job.name}
    entries: list[Entry] = []
    planned: set[int] = set()
    for task in tasks:
        if task.job != job.name:
            continue
        values = _dimension_values(job, task.axes, task.seed, task.template, task.picks,
                                   task.prompt)
        if values is not None:
            entries.append(Entry(task.index, task.id, values, by_id.get(task.id)))
            planned.add(task.index)
    for row in by_id.values():
        if row.index in planned or row.status not in ("done", "failed"):
            continue
        s = row.settings
        values = _dimension_values(job, row.axes, s.get("seed"), s.get("template", ""),
                                   s.get("picks") or (), s.get("prompt", ""))
        if values is not None:
            entries.append(Entry(row.index, row.id, values, row))
    entries.sort(key=lambda e: (e.index, e.id))
    return entries


@dataclass
class Dim:
    """One dimension: its key, its printed name and its values in first-seen order."""

    key: str
    name: str
    keys: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)   # "CFG Scale: 5"
    slugs: list[str] = field(default_factory=list)    # "5" (file names)

    def position(self, value: Any) -> int:
        return self.keys.index(_key(value))

    def add(self, value: Any, text: str, slug: str) -> None:
        if _key(value) not in self.keys:
            self.keys.append(_key(value))
            self.labels.append(f"{self.name}: {text}")
            self.slugs.append(slug)


def dimensions(job: Job, entries: Sequence[Entry],
               axis_name: Callable[[str], str] = default_axis_name) -> list[Dim]:
    """Every dimension that varies (a grid axis always counts), in the job's order."""
    dims: list[Dim] = []
    for axis in job.grid_axes:
        dims.append(Dim(axis, axis_name(axis)))
    if job.zip_axes:
        dims.append(Dim(ZIP, " / ".join(axis_name(k) for k in job.zip_axes)))
    axes = {*job.grid_axes, *job.zip_axes}
    if "seed" not in axes:
        dims.append(Dim(SEED, axis_name("seed")))
    if not {"prompt", "prompt_sr"} & axes:
        dims.append(Dim(DRAW, axis_name("prompt")))
    present = [d for d in dims if all(d.key in e.values for e in entries)]
    for dim in present:
        for entry in entries:
            value = entry.values[dim.key]
            if dim.key == DRAW:
                template, picks, prompt = value
                text = ", ".join(picks) if picks else prompt
                dim.add([template, picks], text, str(len(dim.keys) + 1))
            elif dim.key == ZIP:
                text = ", ".join(axis_value(v) for v in value)
                dim.add(value, text, "_".join(axis_value(v) for v in value))
            else:
                dim.add(value, axis_value(value), axis_value(value))
    return [d for d in present if d.key in job.grid_axes or len(d.keys) > 1]


def _coordinate(dim: Dim, entry: Entry) -> int:
    value = entry.values[dim.key]
    return dim.position(value[:2] if dim.key == DRAW else value)


def resolve_dimension(job: Job, name: str) -> str | None:
    """The dimension key that ``output.grid.x/y/z: name`` means, or None (not one of the
    job's): a grid axis, a zip axis (the zip rows), ``seed``, or ``prompt`` (the prompt
    axis, or else the prompt draws)."""
    if name in job.grid_axes:
        return name
    if name in job.zip_axes:
        return ZIP
    if name in ("seed", "seeds"):
        return SEED
    if name in ("prompt", "draw"):
        return DRAW
    return None


def choose_axes(job: Job, dims: Sequence[Dim]) -> tuple[Dim | None, Dim | None, Dim | None,
                                                          list[Dim]]:
    """(X, Y, Z, the rest): named ones first, the others filled in the job's order."""
    by_key = {d.key: d for d in dims}
    chosen: dict[str, Dim] = {}
    for slot, name in job.output.grid_spec.chosen.items():
        key = resolve_dimension(job, name)
        if key in by_key and by_key[key] not in chosen.values():
            chosen[slot] = by_key[key]
    free = [d for d in dims if d not in chosen.values()]
    for slot in ("x", "y", "z"):
        if slot not in chosen and free:
            chosen[slot] = free.pop(0)
    return chosen.get("x"), chosen.get("y"), chosen.get("z"), free


# -- the plan -----------------------------------------------------------------------------------
@dataclass
class SheetSet:
    """The sheets of one combination of the leftover dimensions (and of one repeat of a
    prompt draw that came out the same twice)."""

    labels: list[str]
    name_parts: list[str]
    cells: dict[tuple[int, int, int], Entry] = field(default_factory=dict)   # (z, x, y)


@dataclass
class GridPlan:
    """Everything the sheets of a job are drawn from."""

    job: Job
    x: Dim | None
    y: Dim | None
    z: Dim | None
    rest: list[Dim]
    sets: list[SheetSet]
    image_size: tuple[int, int]


def plan_grids(job: Job, entries: Sequence[Entry],
               axis_name: Callable[[str], str] = default_axis_name) -> GridPlan | None:
    """The sheets of a job's entries; None when there is nothing to draw."""
    if not entries:
        return None
    dims = dimensions(job, entries, axis_name)
    if not dims:
        return None
    x, y, z, rest = choose_axes(job, dims)
    sets: dict[tuple[Any, ...], SheetSet] = {}
    repeats: dict[tuple[Any, ...], int] = {}
    for entry in entries:
        spot = tuple(_coordinate(d, entry) if d else 0 for d in (z, x, y))
        rest_at = tuple(_coordinate(d, entry) for d in rest)
        repeat = repeats.get((rest_at, spot), 0)
        repeats[(rest_at, spot)] = repeat + 1
        key = (rest_at, repeat)
        sheet_set = sets.get(key)
        if sheet_set is None:
            labels = [d.labels[i] for d, i in zip(rest, rest_at, strict=True)]
            parts = [f"{d.key}={d.slugs[i]}" for d, i in zip(rest, rest_at, strict=True)]
            if repeat:
                labels.append(f"repeat {repeat + 1}")
                parts.append(f"n{repeat + 1}")
            sheet_set = sets[key] = SheetSet(labels, parts)
        sheet_set.cells[spot] = entry
    ordered = [sets[k] for k in sorted(sets, key=lambda k: (k[1], k[0]))]
    return GridPlan(job, x, y, z, rest, ordered, _image_size(entries))


def _image_size(entries: Iterable[Entry]) -> tuple[int, int]:
    """The largest image of the job (read from file headers; planned size where none)."""
    from PIL import Image

    w = h = 0
    for entry in entries:
        row = entry.row
        size = None
        if row is not None and row.status == "done" and row.paths:
            try:
                if row.paths[0].suffix.lower() in VIDEO_SUFFIXES:
                    size = first_frame(row.paths[0]).size
                else:
                    with Image.open(row.paths[0]) as im:
                        size = im.size
            except (OSError, ValueError, Image.DecompressionBombError):
                size = None
        if size is None and row is not None:
            size = (int(row.settings.get("width") or 0), int(row.settings.get("height") or 0))
        if size:
            w, h = max(w, size[0]), max(h, size[1])
    return max(w, 16), max(h, 16)


def blank_reason(entry: Entry | None) -> str | None:
    """Why a cell has no image (None when its file is there), without decoding anything."""
    row = entry.row if entry else None
    if entry is None:
        return "no such task"
    if row is None or (row.status != "failed" and (row.status != "done" or not row.paths)):
        return "not rendered yet"
    if row.status == "failed":
        first = (row.error or "").strip().splitlines()[:1]
        return "failed" + (f": {first[0]}" if first else "")
    if not row.paths[0].is_file():
        return f"file missing: {row.paths[0].name}"
    return None


def cell_art(entry: Entry | None) -> grid_draw.CellArt:
    """The image of a done entry (an animation's first frame), or why there is none."""
    from PIL import Image

    reason = blank_reason(entry)
    row = entry.row if entry else None
    if reason is not None or row is None:
        return grid_draw.CellArt(reason=reason or "no such task",
                                 failed=row is not None and row.status == "failed")
    try:
        return grid_draw.CellArt(image=first_frame(row.paths[0]))
    except (OSError, ValueError, Image.DecompressionBombError):
        return grid_draw.CellArt(reason=f"file unreadable: {row.paths[0].name}")


# -- metadata -----------------------------------------------------------------------------------
def _a1111_params(plan: GridPlan) -> list[tuple[str, str]]:
    """A1111's X/Y/Z plot fields: ``Script``, ``X Type``, ``X Values`` ..."""
    params = [("Script", "X/Y/Z plot")]
    for slot, dim in (("X", plan.x), ("Y", plan.y), ("Z", plan.z)):
        if dim is not None:
            params.append((f"{slot} Type", dim.name))
            params.append((f"{slot} Values",
                           ", ".join(lbl.split(": ", 1)[1] for lbl in dim.labels)))
    return params


def sheet_infotext(plan: GridPlan, entries: Iterable[Entry]) -> str:
    """The sheet's ``parameters``: its first image's infotext plus the X/Y/Z fields, as
    A1111 writes a grid's (PNG Info and civitai read the settings of the first cell)."""
    first = next((e.row.infotext for e in entries
                  if e.row is not None and e.row.status == "done" and e.row.infotext), None)
    fields = ", ".join(f"{k}: {quote(v)}" for k, v in _a1111_params(plan))
    if not first:
        return fields
    return f"{first.rstrip()}, {fields}" if "\n" in first else f"{first}\n{fields}"


def _sheet_json(plan: GridPlan, labels: list[str], part: tuple[int, int],
                cells: Mapping[tuple[int, ...], Entry]) -> str:
    """The ``render-grid`` chunk: the axes, which sheet this is, each cell's task as
    ``[x, y, index, id]`` (``[z, x, y, index, id]`` on a combined sheet), and the blank
    cells as ``[x, y, reason]``."""
    def dim(d: Dim | None) -> Any:
        return None if d is None else {"key": d.key, "name": d.name, "values": d.labels}

    return json.dumps({
        "generator": "render grid", "job": plan.job.name,
        "x": dim(plan.x), "y": dim(plan.y), "z": dim(plan.z), "sheet": labels,
        "part": list(part),
        "cells": [[*spot, e.index, e.id] for spot, e in sorted(cells.items())],
        "blank": [[*spot, reason] for spot, e in sorted(cells.items())
                  if (reason := blank_reason(e)) is not None],
    }, ensure_ascii=False)


def _pnginfo(text: str, data: str) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", text)
    info.add_itxt(SHEET_CHUNK, data)
    return info


def is_sheet(path: Path) -> bool:
    """Whether ``path`` is a PNG carrying render's sheet chunk."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and SHEET_CHUNK in getattr(im, "text", {})
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


# -- drawing and writing ------------------------------------------------------------------------
@dataclass
class Sheet:
    """One file to write: its name, its pixels (drawn on demand) and its metadata; the
    page geometry (None for a combined sheet)."""

    name: str
    draw: Callable[[], Any]
    text: str
    data: str
    layout: grid_draw.Layout | None = None


def _title(job: Job, labels: Sequence[str]) -> str:
    return "  ·  ".join([job.name, *labels])


def _stem(job: Job, parts: Sequence[str]) -> str:
    """A sheet's file stem: ``<job>-grid`` and its set's and Z value's ``key=value`` parts."""
    return safe_name("-".join([f"{job.name}-grid", *parts]).replace(" ", "_"), limit=170)


def sheets(plan: GridPlan, *, max_pixels: int, max_side: int = MAX_SIDE) -> list[Sheet]:
    """Every sheet of the plan in the order the gallery shows them: per set, the combined
    sheet first, then one per Z value, each maybe in parts."""
    fnt = grid_draw.font_for_cell(*plan.image_size)
    x_labels = plan.x.labels if plan.x else []
    y_labels = plan.y.labels if plan.y else []
    z_count = len(plan.z.keys) if plan.z else 1
    reasons = [r for s in plan.sets for e in s.cells.values()
               if (r := blank_reason(e)) is not None]
    out: list[Sheet] = []
    for sheet_set in plan.sets:
        per_z: list[Sheet] = []
        panels: list[tuple[str, tuple[int, int], Callable[[], Any]]] = []
        split = False
        for zi in range(z_count):
            z_label = [plan.z.labels[zi]] if plan.z else []
            z_part = [f"{plan.z.key}={plan.z.slugs[zi]}"] if plan.z else []
            cells = {(x, y): e for (z, x, y), e in sheet_set.cells.items() if z == zi}
            if not cells:
                continue
            labels = [*sheet_set.labels, *z_label]
            title = _title(plan.job, labels)
            layout = grid_draw.make_layout(fnt, x_labels, y_labels, plan.image_size,
                                           max_side=max_side, max_pixels=max_pixels,
                                           cell_texts=reasons, title=title)
            col_pages = -(-max(len(x_labels), 1) // layout.cols)
            row_pages = -(-max(len(y_labels), 1) // layout.rows)
            total = col_pages * row_pages
            text = sheet_infotext(plan, [cells[k] for k in sorted(cells)])
            stem = _stem(plan.job, [*sheet_set.name_parts, *z_part])
            for page in range(total):
                c0, r0 = (page % col_pages) * layout.cols, (page // col_pages) * layout.rows
                page_layout = grid_draw.with_title(
                    _page_layout(layout, len(x_labels), len(y_labels), c0, r0), fnt, title)
                page_cells = {(x - c0, y - r0): e for (x, y), e in cells.items()
                              if 0 <= x - c0 < page_layout.cols and 0 <= y - r0 < page_layout.rows}
                suffix = f"-part{page + 1}of{total}" if total > 1 else ""
                per_z.append(Sheet(
                    stem + suffix + ".png",
                    _drawer(page_layout, fnt, title, x_labels[c0:], y_labels[r0:], page_cells),
                    text, _sheet_json(plan, labels, (page + 1, total), page_cells), page_layout))
            split = split or total > 1
            panel_layout = grid_draw.with_title(
                _page_layout(layout, len(x_labels), len(y_labels), 0, 0), fnt, "")
            panels.append((z_label[0] if z_label else "", panel_layout.size,
                           _drawer(panel_layout, fnt, "", x_labels, y_labels, cells)))
        if split:
            panels = []   # a Z sheet in parts: the combined sheet would not fit either
        combined = _combined(plan, sheet_set, fnt, panels, z_count, max_pixels, max_side)
        out.extend([*combined, *per_z])
    return out


def _combined(plan: GridPlan, sheet_set: SheetSet, fnt: Any,
              panels: list[tuple[str, tuple[int, int], Callable[[], Any]]], z_count: int,
              max_pixels: int, max_side: int) -> list[Sheet]:
    """A1111's combined sheet of a set, where there are several Z values and it fits."""
    if plan.z is None or z_count < 2 or len(panels) < 2:
        return []
    title = _title(plan.job, sheet_set.labels)
    pad = grid_draw.pad_for(fnt)
    w, h = grid_draw.combined_size(fnt, title, [(lbl, size) for lbl, size, _ in panels], pad)
    if w > max_side or h > max_side or w * h > max_pixels:
        return []
    def draw() -> Any:
        return grid_draw.combine(fnt, title, [(lbl, fn()) for lbl, _, fn in panels], pad)

    text = sheet_infotext(plan, [sheet_set.cells[k] for k in sorted(sheet_set.cells)])
    return [Sheet(_stem(plan.job, sheet_set.name_parts) + ".png", draw, text,
                  _sheet_json(plan, sheet_set.labels, (1, 1), sheet_set.cells))]


def _page_layout(layout: grid_draw.Layout, n_x: int, n_y: int, c0: int,
                 r0: int) -> grid_draw.Layout:
    from dataclasses import replace

    return replace(layout, cols=min(layout.cols, max(n_x, 1) - c0),
                   rows=min(layout.rows, max(n_y, 1) - r0))


def _drawer(layout: grid_draw.Layout, fnt: Any, title: str, x_labels: Sequence[str],
            y_labels: Sequence[str], cells: Mapping[tuple[int, int], Entry]) -> Callable[[], Any]:
    def draw() -> Any:
        return grid_draw.render_page(layout, fnt, title, x_labels, y_labels,
                                     lambda c, r: cell_art(cells.get((c, r))))
    return draw


def build_grids(job: Job, entries: Sequence[Entry], out_dir: Path, *,
                ledger: Any = None, axis_name: Callable[[str], str] = default_axis_name,
                max_side: int = MAX_SIDE, warn: Callable[[str], None] | None = None,
                ) -> list[Path]:
    """Write the job's sheets under ``out_dir/grids/``; return their paths in order.

    With a ``ledger``, each sheet is recorded as written, and the job's earlier sheets that
    this plan no longer makes are deleted (only while unchanged since written).
    """
    plan = plan_grids(job, entries, axis_name)
    folder = Path(out_dir) / "grids"
    written: list[Path] = []
    known = ledger.sheets(job.name) if ledger is not None else {}
    if plan is not None:
        for sheet in sheets(plan, max_pixels=job.output.grid_spec.max_pixels,
                            max_side=max_side):
            path = folder / sheet.name
            if not _ours_to_write(path, known.get(path)):
                if warn:
                    warn(f"{path} exists and is not a sheet render wrote: left alone")
                continue
            image = sheet.draw()
            info = _pnginfo(sheet.text, sheet.data)
            atomic_write(path, lambda tmp, im=image, pi=info: im.save(tmp, format="PNG",
                                                                        pnginfo=pi))
            written.append(path)
    if ledger is not None:
        ledger.record_sheets(job.name, written)
        for old, identity in known.items():
            if old not in written and identity is not None and unchanged(old, identity):
                old.unlink(missing_ok=True)
    return written


def _ours_to_write(path: Path, identity: Any) -> bool:
    """A free name, a sheet recorded and unchanged, or a file carrying our chunk."""
    if not os.path.lexists(path):
        return True
    if not path.is_file() or path.is_symlink():
        return False
    return (identity is not None and unchanged(path, identity)) or is_sheet(path)
