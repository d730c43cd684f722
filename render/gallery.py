"""A static ``index.html`` gallery of an output root, rebuilt from the ledger alone.

Per job: its grid sheets, then every image as a small JPEG thumbnail (kept in ``.thumbs/``,
rebuilt only when the image is newer) linking to the full file, with its infotext in the
thumbnail's title and in a ``<details>`` block; then the failed tasks with their errors.
All links are relative, so the folder can be moved or served as it is; all text is
HTML-escaped. Pure Python + Pillow: no torch here.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
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

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em}h2{margin-top:2em;border-bottom:1px solid #ccc}
.grid,.images{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:260px}figure img,figure video{max-width:256px;max-height:256px;display:block}
.grid figure{width:auto}.grid figure img{max-width:512px;max-height:512px}
figcaption{font-size:.8em;color:#555;word-break:break-all}
details pre,.failures pre{white-space:pre-wrap;font-size:.75em;background:#fff;padding:4px}
.missing{width:256px;height:96px;background:#ddd;display:flex;align-items:center;
justify-content:center;color:#700}
.failures li{margin-bottom:.6em}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


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


def _figure(row: LedgerRow, root: Path, used: set[Path]) -> str:
    info = row.infotext or ""
    label = f"#{row.index} · seed {row.settings.get('seed', '?')} · {row.id[:12]}"
    if not row.paths:
        return ""
    main = row.paths[0]
    thumb = thumbnail(main, root)
    if thumb is not None and main.suffix.lower() in VIDEO_SUFFIXES:
        # A video plays in the page (muted, looping), its first frame as the poster.
        used.add(thumb)
        body = (f'<video src="{_href(main, root)}" poster="{_href(thumb, root)}" '
                f'preload="none" muted loop autoplay playsinline controls '
                f'title="{_e(info)}"></video>')
    elif thumb is not None and _animated(main):
        # A GIF or animated WebP plays in the page as itself (browsers animate <img>; lazy:
        # only those scrolled to are fetched); its thumbnail is kept for the sheets' sake.
        used.add(thumb)
        body = (f'<a href="{_href(main, root)}"><img src="{_href(main, root)}" '
                f'loading="lazy" alt="{_e(main.name)}" title="{_e(info)}"></a>')
    elif thumb is not None:
        used.add(thumb)
        body = (f'<a href="{_href(main, root)}"><img src="{_href(thumb, root)}" '
                f'loading="lazy" alt="{_e(main.name)}" title="{_e(info)}"></a>')
    elif main.exists():
        body = f'<a href="{_href(main, root)}" title="{_e(info)}">{_e(main.name)}</a>'
    else:
        body = f'<div class="missing" title="{_e(info)}">missing: {_e(main.name)}</div>'
    extras = "".join(f' <a href="{_href(p, root)}">{_e(p.name)}</a>' for p in row.paths[1:])
    details = (f"<details><summary>settings</summary><pre>{_e(info)}</pre></details>"
               if info else "")
    return (f"<figure>{body}<figcaption>{_e(label)} {_e(main.name)}{extras}</figcaption>"
            f"{details}</figure>")


def _grid_figure(path: Path, root: Path, used: set[Path]) -> str:
    thumb = thumbnail(path, root, size=THUMB_SIZE * 2)
    if thumb is None:
        return f'<figure><a href="{_href(path, root)}">{_e(path.name)}</a></figure>'
    used.add(thumb)
    return (f'<figure><a href="{_href(path, root)}"><img src="{_href(thumb, root)}" '
            f'loading="lazy" alt="{_e(path.name)}"></a>'
            f"<figcaption>{_e(path.name)}</figcaption></figure>")


def render_html(root: Path, rows: Iterable[LedgerRow], job_order: list[str],
                grid_paths: Mapping[str, list[Path]], used: set[Path]) -> str:
    """The page (thumbnails are made on the way; their paths go into ``used``)."""
    by_job: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_job.setdefault(row.job, []).append(row)
    jobs = list(dict.fromkeys([*job_order, *by_job, *grid_paths]))
    done = sum(r.status == "done" for rs in by_job.values() for r in rs)
    failed = sum(r.status == "failed" for rs in by_job.values() for r in rs)
    out = [
        "<!doctype html>", f'<html lang="en"><head><meta charset="utf-8">{_PAGE_MARK}',
        f"<title>render: {_e(Path(root).name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(Path(root).name)}</h1>",
        f"<p>{done} images, {failed} failed; updated "
        f"{_e(datetime.now().strftime('%Y-%m-%d %H:%M:%S'))}</p>",
    ]
    if len(jobs) > 1:
        out.append("<p>" + " · ".join(f'<a href="#job-{quote(j)}">{_e(j)}</a>' for j in jobs)
                   + "</p>")
    for job in jobs:
        job_rows = by_job.get(job, [])
        ok = [r for r in job_rows if r.status == "done"]
        bad = [r for r in job_rows if r.status == "failed"]
        out.append(f'<section id="job-{_e(quote(job))}"><h2>{_e(job)}</h2>')
        out.append(f"<p>{len(ok)} images, {len(bad)} failed</p>")
        sheets = grid_paths.get(job) or []
        if sheets:
            out.append("<h3>grids</h3><div class=\"grid\">")
            out.extend(_grid_figure(p, root, used) for p in sheets)
            out.append("</div>")
        if ok:
            out.append('<h3>images</h3><div class="images">')
            out.extend(_figure(r, root, used) for r in ok)
            out.append("</div>")
        if bad:
            out.append('<h3>failed</h3><ul class="failures">')
            for r in bad:
                out.append(f"<li>#{r.index} · seed {_e(r.settings.get('seed', '?'))} · "
                           f"{_e(r.id[:12])}<pre>{_e(r.error or '')}</pre></li>")
            out.append("</ul>")
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def build_gallery(root: Path, ledger: Any, grid_paths: Mapping[str, list[Path]]) -> Path:
    """Write ``root/index.html`` from the ledger's rows and the grid sheets; return its path.

    ``grid_paths`` may hold the sheets of every job of the run: only those under ``root``
    are shown. Thumbnails no longer referenced are removed from ``.thumbs/``. An
    ``index.html`` that is not our page is left alone (the gallery goes to
    ``render-gallery.html``), and only thumbnails we made are ever pruned.
    """
    root = Path(root)
    base = os.path.abspath(root)
    mine = {job: [p for p in paths if is_inside(os.path.abspath(p), base)]
            for job, paths in grid_paths.items()}   # sheets of jobs in other output roots
    used: set[Path] = set()
    page = render_html(root, ledger.rows(), ledger.jobs(),
                       {job: paths for job, paths in mine.items() if paths}, used)
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
