"""The ``index.html`` gallery of an output root, rebuilt from the ledger alone.

One self-contained page (its style, script and data inlined; no network request, works from
``file://``): every job's grid sheets (as the ledger recorded them, so a job not in this run
keeps its sheets), every image as a 256 px JPEG thumbnail (kept in ``.thumbs/``, made again
only when the image changes), the failed tasks with their errors. The script
(``render/static/gallery.js``) filters by job, axis value and text, pages through thousands of
images, shows one full size with its infotext and a copy button, and compares two side by
side. All links are relative, so the folder can be moved or served as it is. User text goes
into a JSON block with ``<`` ``>`` ``&`` escaped and reaches the page as text only.
Pure Python + Pillow: no torch here.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from render.ledger import LedgerRow
from render.metadata import VIDEO_SUFFIXES
from render.output import atomic_write, is_inside

THUMBS = ".thumbs"
THUMB_SIZE = 256
INDEX = "index.html"
#: Where the gallery goes when ``index.html`` in the root is somebody else's page.
FALLBACK_INDEX = "render-gallery.html"
#: What marks a page and a thumbnail as ours: only files carrying it are ever overwritten
#: or pruned (an output root may be a folder the user keeps other things in, even ``~``).
GENERATOR = "render gallery"
_PAGE_MARK = f'<meta name="generator" content="{GENERATOR}">'
_THUMB_MARK = f"{GENERATOR} thumbnail".encode()
#: How every page began before pages carried the mark (render before issue 12): such a page
#: is ours too, so an upgrade keeps updating the same ``index.html``.
_LEGACY_PAGE_HEAD = (b'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
                     b"<title>render: ")
_LEGACY_PAGE_CSS = b"body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;"

def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _href(path: Path, root: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return quote(Path(rel).as_posix())


def thumbnail(source: Path, root: Path, *, size: int = THUMB_SIZE) -> Path | None:
    """The JPEG thumbnail of ``source`` under ``root/.thumbs`` (made when missing or stale).

    Made from the first frame of an animation (a GIF, animated WebP or MP4: see
    ``render.images.first_frame``). None when the file cannot be read (missing, damaged).
    """
    from PIL import Image

    from render.images import first_frame

    rel = os.path.relpath(os.path.abspath(source), os.path.abspath(root))
    name = hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ".jpg"
    thumb = Path(root) / THUMBS / name
    try:
        src_mtime = source.stat().st_mtime
    except OSError:
        return None
    try:
        if thumb.stat().st_mtime >= src_mtime:
            return thumb
    except OSError:
        pass
    else:
        if not _our_thumbnail(thumb, unmarked=True):
            return None   # a file of the same name that we did not make: left alone
    try:
        if source.suffix.lower() in VIDEO_SUFFIXES:
            small = first_frame(source)
            small.thumbnail((size, size))
        else:
            with Image.open(source) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
                im.thumbnail((size, size))
                small = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    atomic_write(thumb, lambda tmp: small.save(tmp, format="JPEG", quality=82,
                                               comment=_THUMB_MARK))
    return thumb


def _our_thumbnail(path: Path, *, unmarked: bool = False) -> bool:
    """Whether ``path`` is a thumbnail this program made: its JPEG comment says so, or
    (``unmarked``, for the name derived from one of our images) a JPEG with no comment, as
    thumbnails were written before they carried the mark."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            comment = im.info.get("comment")
            return im.format == "JPEG" and (comment == _THUMB_MARK
                                            or (unmarked and not comment))
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _our_page(path: Path) -> bool:
    """Whether ``path`` is missing or a gallery page this program wrote."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return path.is_file() and (_PAGE_MARK.encode() in head
                               or (head.startswith(_LEGACY_PAGE_HEAD) and _LEGACY_PAGE_CSS in head))


def _animated(path: Path) -> bool:
    """Whether ``path`` is a GIF or WebP of more than one frame."""
    if path.suffix.lower() not in (".gif", ".webp"):
        return False
    from render.images import frame_count

    try:
        return frame_count(path) > 1
    except (OSError, ValueError, SyntaxError):
        return False


def _axis_labels(row: LedgerRow) -> dict[str, str]:
    """The row's axis values as the sheets print them, and its seed (every job has one)."""
    from render.grids import axis_value

    labels = {k: axis_value(v) for k, v in row.axes.items()}
    labels.setdefault("seed", axis_value(row.settings.get("seed", "?")))
    return labels


def _image_item(row: LedgerRow, job: int, root: Path, used: set[Path]) -> dict[str, Any]:
    """One done row for the page: its files, thumbnail, kind, axes and infotext."""
    main = row.paths[0]
    item: dict[str, Any] = {
        "j": job, "i": row.index, "id": row.id[:12], "f": _href(main, root), "n": main.name,
        "s": row.settings.get("seed", "?"), "a": _axis_labels(row), "x": row.infotext or "",
        "e": [[p.name, _href(p, root)] for p in row.paths[1:]],
    }
    thumb = thumbnail(main, root)
    if thumb is not None:
        used.add(thumb)
        item["t"] = _href(thumb, root)
        if main.suffix.lower() in VIDEO_SUFFIXES:
            item["k"] = "video"
        elif _animated(main):
            item["k"] = "anim"   # the file itself plays in the page (<img> animates it)
        else:
            item["k"] = "image"
    else:
        item["k"] = "file" if main.exists() else "missing"
    return item


def _sheet_item(path: Path, root: Path, used: set[Path]) -> dict[str, Any]:
    from PIL import Image

    item: dict[str, Any] = {"n": path.name, "f": _href(path, root), "x": ""}
    thumb = thumbnail(path, root, size=THUMB_SIZE * 2)
    if thumb is not None:
        used.add(thumb)
        item["t"] = _href(thumb, root)
    try:
        with Image.open(path) as im:
            item["x"] = str(getattr(im, "text", {}).get("parameters", ""))
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    return item


def page_data(root: Path, rows: Iterable[LedgerRow], job_order: list[str],
              sheets: Mapping[str, list[Path]], used: set[Path]) -> dict[str, Any]:
    """What the page shows, as the JSON its script reads (thumbnails are made on the way;
    their paths go into ``used``)."""
    by_job: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_job.setdefault(row.job, []).append(row)
    names = list(dict.fromkeys([*job_order, *by_job, *sheets]))
    jobs, images, failed = [], [], []
    for n, name in enumerate(names):
        job_rows = by_job.get(name, [])
        done = [r for r in job_rows if r.status == "done" and r.paths]
        bad = [r for r in job_rows if r.status == "failed"]
        jobs.append({"name": name, "done": len(done), "failed": len(bad),
                     "sheets": [_sheet_item(p, root, used) for p in sheets.get(name, [])]})
        images.extend(_image_item(r, n, root, used) for r in done)
        failed.extend({"j": n, "i": r.index, "id": r.id[:12], "s": r.settings.get("seed", "?"),
                       "a": _axis_labels(r), "p": str(r.settings.get("prompt", "")),
                       "err": r.error or ""} for r in bad)
    return {"root": Path(root).name, "jobs": jobs, "images": images, "failed": failed,
            "total_done": len(images), "total_failed": len(failed),
            "updated": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, ``<!--`` or entity can form."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _asset(name: str) -> str:
    return resources.files("render").joinpath("static", name).read_text(encoding="utf-8")


def render_html(root: Path, data: Mapping[str, Any]) -> str:
    """The page: style, data and script inlined."""
    title = _e(Path(root).name)
    return "\n".join([
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8">{_PAGE_MARK}',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>render: {title}</title><style>{_asset('gallery.css')}</style></head><body>",
        f'<header><h1>{title}</h1><p class="summary" id="summary">'
        f'{_count(data["total_done"], "image")}, {data["total_failed"]} failed</p></header>',
        '<main id="gallery"><noscript>This gallery needs JavaScript. The images are in the '
        "job folders beside this page.</noscript></main>",
        '<div class="overlay" id="overlay" hidden></div>',
        f'<script type="application/json" id="gallery-data">{_script_json(data)}</script>',
        f"<script>{_asset('gallery.js')}</script>",
        "</body></html>",
        "",
    ])


def build_gallery(root: Path, ledger: Any) -> Path:
    """Write ``root/index.html`` from the ledger's rows and sheets; return its path.

    Only sheets under ``root`` are shown. Thumbnails no longer referenced are removed from
    ``.thumbs/``. An ``index.html`` that is not our page is left alone (the gallery goes to
    ``render-gallery.html``), and only thumbnails we made are ever pruned.
    """
    root = Path(root)
    base = os.path.abspath(root)
    sheets = {job: [p for p in paths if is_inside(os.path.abspath(p), base) and p.is_file()]
              for job, paths in ledger.sheets_by_job().items()}
    used: set[Path] = set()
    data = page_data(root, ledger.rows(), ledger.jobs(),
                     {job: paths for job, paths in sheets.items() if paths}, used)
    page = render_html(root, data)
    path = next((root / name for name in (INDEX, FALLBACK_INDEX) if _our_page(root / name)),
                None)
    if path is None:
        raise OSError(f"{root / INDEX} and {root / FALLBACK_INDEX} are not render's gallery "
                      "pages: left alone, no gallery written")
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    thumbs = root / THUMBS
    if thumbs.is_dir() and not thumbs.is_symlink():
        for entry in thumbs.iterdir():
            if entry.suffix == ".jpg" and entry not in used and _our_thumbnail(entry):
                entry.unlink(missing_ok=True)
    return path
