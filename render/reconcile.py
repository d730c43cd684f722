"""The disk is the truth: the ledger is checked against the files before it is believed.

- A done task whose file was deleted, truncated or changed is rendered again
  (``check_done``: a stat per file; the digest is read only when size or mtime moved).
- An image that is on disk, whole, with provenance naming a planned task but no ledger row
  (``kill -9`` or a full disk between the rename and the commit) is adopted, not rendered
  again (``reconcile``).
- A damaged ``render.db`` is set aside and the ledger rebuilt from the images, which carry
  their task in their metadata (``open_ledger``, ``rebuild``).
- Before a new file takes a final name, what sits there is judged (``claim_target``):
  render's own unchanged file is replaced; a file of ours that changed since (it may be the
  user's edit) is moved to a ``<name>.changed-<time>`` sibling; anything else is refused.

Pure Python + Pillow: no torch here (``--dry-run`` uses ``check_done``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render import aside, metadata
from render.ledger import (
    DB_NAME,
    LOCK_NAME,
    FileIdentity,
    Key,
    Ledger,
    LedgerCorrupt,
    file_identity,
)
from render.output import OutputRefused, existing_ancestor
from render.tasks import Task, task_from_json

EXTRA_KEY = metadata.EXTRA_KEY
IMAGE_SUFFIXES = frozenset({".png", ".webp", ".jpg", ".jpeg"})
#: What a rebuild of a lost ledger looks at: images, GIF and video animations.
OUTPUT_SUFFIXES = IMAGE_SUFFIXES | {".gif"} | metadata.VIDEO_SUFFIXES
#: The stem of a file ``move_aside`` made: never taken for an output again.
CHANGED_RE = re.compile(r"\.changed-\d{8}-\d{6}(?:-\d+)?$")

OK, MISSING, CHANGED = "ok", "missing", "changed"


# -- faults ------------------------------------------------------------------------------------
def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it: a plugin's writer wraps it) is a full disk or quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.OperationalError) and (
                (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
                or "database or disk is full" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def dangling_link(path: Path) -> tuple[Path, str] | None:
    """The first link on the way to ``path`` whose target does not exist, and that target.

    An output folder on a disk that is not mounted tonight is often such a link; resolving it
    and creating the folders would write the night onto the wrong disk.
    """
    probe = Path(os.path.abspath(path))
    for part in (*reversed(probe.parents), probe):
        if os.path.islink(part) and not os.path.exists(part):
            return part, os.readlink(part)
    return None


def check_root(root: Path) -> str | None:
    """Why ``root`` cannot hold a run's output, in one line, or None. Creates nothing."""
    link = dangling_link(root)
    if link is not None:
        return (f"the output folder {root} lies behind the link {link[0]} -> {link[1]}, whose "
                "target does not exist (a disk that is not mounted?): mount it or change "
                "output.dir")
    probe = existing_ancestor(root)
    if not probe.is_dir():
        if probe == Path(os.path.abspath(root)):
            return (f"the output folder {root} is a file, not a folder: move it away or "
                    "change output.dir")
        return (f"the output folder {root} cannot be made: {probe} is a file; move it away or "
                "change output.dir")
    for name, what in ((DB_NAME, "ledger"), (f"{DB_NAME}-wal", "ledger journal"),
                       (f"{DB_NAME}-shm", "ledger journal"), (LOCK_NAME, "run lock")):
        path = probe / name
        if probe == Path(os.path.abspath(root)) and os.path.lexists(path) and not path.is_file():
            return (f"{path} is a folder (or another non-file), not render's {what}: move it "
                    "away or change output.dir; render keeps its ledger and lock there")
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"cannot write to the output folder {root} ({probe} is read-only or not "
                "yours): fix its permissions or change output.dir")
    return None


# -- reading our own metadata ------------------------------------------------------------------
def read_provenance(path: Path, *, whole: bool = False) -> dict[str, Any] | None:
    """render's provenance (or the extra-output marker) in an image; None when the file is
    not an image, carries none, or (``whole``) is not complete.

    PNG: read from the chunks before the pixels, where render writes them, without decoding;
    ``whole`` checks every chunk's CRC. JPEG/WebP/GIF: ``whole`` decodes the image, every
    frame of an animation (a GIF cut short decodes its first frames only).
    """
    from PIL import Image

    if path.suffix.lower() in metadata.VIDEO_SUFFIXES:
        return _video_provenance(path, whole=whole)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # DecompressionBombWarning: we only read
            with Image.open(path) as im:
                fmt = im.format
                raw = im.info.get(metadata.PNG_PROVENANCE_KEY) or im.info.get(EXTRA_KEY)
                if whole and fmt == "PNG":
                    im.verify()   # every chunk's CRC, without decoding
                elif whole:
                    im.load()
                    for frame in range(1, int(getattr(im, "n_frames", 1))):
                        im.seek(frame)
                        im.load()
            if fmt == "PNG":
                prov = json.loads(raw) if isinstance(raw, str) else None
            else:
                prov = metadata.read_metadata(path)[1]
    except Exception:  # noqa: BLE001 - any file can sit there: unreadable means "not ours"
        return None
    if isinstance(prov, dict) and prov.get("format") == metadata.PROVENANCE_FORMAT:
        return prov
    return None


def _video_provenance(path: Path, *, whole: bool) -> dict[str, Any] | None:
    """A video's provenance (container metadata); ``whole`` decodes every frame."""
    from render.images import video_frames

    try:
        prov = metadata.read_metadata(path)[1]
        if whole:
            video_frames(path)
    except Exception:  # noqa: BLE001 - unreadable means "not ours", as for images
        return None
    if isinstance(prov, dict) and prov.get("format") == metadata.PROVENANCE_FORMAT:
        return prov
    return None


def names_task(prov: Mapping[str, Any] | None, key: Key, *, main: bool = False) -> bool:
    """Whether provenance ``prov`` says the file is task ``key``'s (``main``: its image,
    not an extra output)."""
    if not prov:
        return False
    ref = prov.get("task") if "task" in prov else (None if main else prov.get("of"))
    return isinstance(ref, dict) and (ref.get("id"), ref.get("job")) == key


def extra_pnginfo(task: Task, suffix: str) -> Any:
    """The PNG chunk that marks an extra output (``-control-0.png``) as ``task``'s."""
    return metadata.extra_pnginfo({"id": task.id, "job": task.job, "index": task.index},
                                  suffix)


# -- done rows against the disk ----------------------------------------------------------------
def _same(path: Path, st: os.stat_result, known: FileIdentity) -> tuple[bool, FileIdentity | None]:
    """(unchanged, identity to record anew): the stat decides, or else the digest."""
    if st.st_size != known.size:
        return False, None
    if st.st_mtime_ns == known.mtime_ns:
        return True, None
    current = file_identity(path)
    if current is not None and current.digest == known.digest:
        return True, current
    return False, None


def unchanged(path: Path, known: FileIdentity) -> bool:
    """Whether the file at ``path`` is still the one recorded as ``known`` (not a link)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _same(path, st, known)[0]


def check_file(path: Path, known: FileIdentity | None, key: Key, *,
               main: bool = True) -> tuple[str, FileIdentity | None]:
    """``ok``, ``missing`` or ``changed``, and an identity to record anew (same bytes with
    another mtime, e.g. a copied tree; or a row from before identities were recorded, which
    render's provenance in the main image vouches for)."""
    try:
        st = os.lstat(path)
    except OSError:
        return MISSING, None
    if not stat.S_ISREG(st.st_mode):
        return CHANGED, None
    if known is None:
        if main and not names_task(read_provenance(path), key, main=True):
            return CHANGED, None
        return OK, file_identity(path)
    unchanged, refresh = _same(path, st, known)
    return (OK, refresh) if unchanged else (CHANGED, None)


@dataclass
class DiskCheck:
    """Done rows against the disk: which stay done, which files are gone or changed."""

    done: set[Key] = field(default_factory=set)
    missing: list[Path] = field(default_factory=list)
    changed: list[Path] = field(default_factory=list)
    refresh: list[tuple[Path, FileIdentity]] = field(default_factory=list)


def check_done(files: Mapping[Key, Iterable[tuple[Path, FileIdentity | None]]]) -> DiskCheck:
    """Which done tasks (``Ledger.done_files()``) still have every file as render wrote it."""
    check = DiskCheck()
    for key, entries in files.items():
        ok = True
        for n, (path, known) in enumerate(entries):
            state, refresh = check_file(path, known, key, main=n == 0)
            if state == MISSING:
                check.missing.append(path)
            elif state == CHANGED:
                check.changed.append(path)
            elif refresh is not None:
                check.refresh.append((path, refresh))
            ok = ok and state == OK
        if ok:
            check.done.add(key)
    return check


@dataclass
class Reconciled:
    """What ``reconcile`` found: done keys, files to render again, images adopted."""

    done: set[Key]
    missing: list[Path]
    changed: list[Path]
    adopted: list[Path]


def reconcile(ledger: Ledger, planned: Iterable[tuple[Task, Path]]) -> Reconciled:
    """Check the planned tasks' done rows against the disk, and adopt an image that is on
    disk, whole and ours, under a planned task's name but missing from the ledger."""
    planned = list(planned)
    keys = {(task.id, task.job) for task, _ in planned}
    files = {key: entries for key, entries in ledger.done_files().items() if key in keys}
    check = check_done(files)
    for path, known in check.refresh:
        ledger.refresh_identity(path, known)
    recorded = ledger.recorded_paths()
    adopted: list[Path] = []
    for task, path in planned:
        key = (task.id, task.job)
        # A recorded path is judged by its record (above), never by what the file says.
        if key in check.done or key in files or path in recorded or not _plain_file(path):
            continue
        prov = read_provenance(path, whole=True)
        if names_task(prov, key, main=True):
            assert prov is not None
            _record_found(ledger, task, [path], prov)
            check.done.add(key)
            recorded.add(path)
            adopted.append(path)
    return Reconciled(check.done, check.missing, check.changed, adopted)


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# -- a damaged ledger --------------------------------------------------------------------------
def open_ledger(root: Path) -> tuple[Ledger, LedgerCorrupt | None, Path | None]:
    """The root's ledger; a damaged one is first moved aside (with its journal files) as
    ``render.db.corrupt-<time>``. Returns (ledger, the damage, where the old file went)."""
    try:
        return Ledger(root), None, None
    except LedgerCorrupt as exc:
        moved = set_aside(Path(root))
        return Ledger(root), exc, moved


def set_aside(root: Path) -> Path:
    """Rename ``render.db`` (and ``-wal``, ``-shm``) to ``<name>.corrupt-<time>``."""
    return aside.move_aside(root / DB_NAME, "corrupt", companions=("-wal", "-shm"))


def rebuild(ledger: Ledger, root: Path) -> int:
    """Record every image or animation below ``root`` that carries render's provenance and
    is whole (its extra outputs with it); returns how many tasks were recovered.

    Hidden folders, symlinked folders and nested output roots (their own ``render.db``) are
    not entered; ``.changed-`` copies are not outputs.
    """
    recorded = ledger.recorded_paths()
    done = ledger.done_keys()
    mains: dict[Key, tuple[Task, Path, dict[str, Any]]] = {}
    extras: dict[Key, list[Path]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not os.path.lexists(os.path.join(folder, d, DB_NAME)))
        for name in sorted(names):
            path = Path(folder) / name
            if (name.startswith(".") or path.suffix.lower() not in OUTPUT_SUFFIXES
                    or CHANGED_RE.search(path.stem) or path in recorded
                    or not _plain_file(path)):
                continue
            prov = read_provenance(path, whole=True) or {}
            ref = prov.get("task") or prov.get("of")
            key = (ref.get("id"), ref.get("job")) if isinstance(ref, dict) else ("", "")
            if not all(isinstance(k, str) and k for k in key) or key in done:
                continue
            if "task" not in prov:
                extras.setdefault(key, []).append(path)
            elif key not in mains:
                try:
                    task = task_from_json(ref, list(prov.get("sections") or []))
                except Exception:  # noqa: BLE001 - metadata we cannot read back is not adopted
                    continue
                mains[key] = (task, path, prov)
    for key, (task, path, prov) in mains.items():
        _record_found(ledger, task, [path, *extras.get(key, [])], prov)
    return len(mains)


def _record_found(ledger: Ledger, task: Task, paths: list[Path],
                  prov: Mapping[str, Any]) -> None:
    """Record files found on disk as ``task``'s, done, with the timings and infotext its
    provenance carries (anything malformed there is left out, never trusted)."""
    timings = prov.get("timings")
    infotext = prov.get("infotext")
    ledger.record_done(task, paths, timings if isinstance(timings, dict) else {},
                       infotext if isinstance(infotext, str) else None)


# -- before a new file takes a final name --------------------------------------------------------
def claim_target(ledger: Ledger, path: Path, key: Key) -> Path | None:
    """Make ``path`` free for task ``key``'s new file without destroying anything.

    Returns None when nothing is there or it is render's own file, unchanged (it will be
    replaced); returns the sibling a changed file of ours was moved to; raises
    ``OutputRefused`` for anything render did not write (no ledger record and no render
    provenance naming this task), a folder or a link included.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(
            st.st_mode) else "special file"
        raise OutputRefused(f"{path} is a {kind} render did not make: nothing written; move "
                            "it away and run again")
    record = ledger.output_record(path)
    if record is not None:
        owner = (record.task_id, record.job)
        if record.identity is None:   # recorded before identities were
            if names_task(read_provenance(path), owner):
                return None
        elif _same(path, st, record.identity)[0]:
            return None
        return move_aside(path)
    if names_task(read_provenance(path), key):
        return move_aside(path)
    raise OutputRefused(f"{path} already exists and render did not write it (no ledger record, "
                        "no render metadata of this task): nothing written; move it away or "
                        "change output.name")


def move_aside(path: Path) -> Path:
    """Rename ``path`` to an unused ``<stem>.changed-<time><suffix>`` beside it."""
    try:
        return aside.move_aside(path, "changed", keep_suffix=True)
    except FileExistsError:
        raise OutputRefused(f"{path}: cannot move the changed file aside "
                            f"({aside.MAX_COPIES} copies exist)") from None
