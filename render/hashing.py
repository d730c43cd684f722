"""File hashes as A1111 and civitai show them, computed once per file version.

``sha256`` is the full sha256 of a file (A1111's "Model hash" is its first 10 characters).
For a diffusers folder it is the sha256 of a manifest listing, in sorted order,
``<sha256 of file>  <relative path>`` for every weight and config file, so it changes when
any weight or config does. LoRA files also get A1111's "addnet" hash (of the tensors only,
after the safetensors header). Every hash is cached in SQLite by (path, size, mtime) under
``$RENDER_CACHE_DIR`` or ``~/.cache/render/``: a night's preflight hashes each file once.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from render import aside
from render.errors import UserError
from render.folders import walk
from render.weights import SAFE_EXTS, WEIGHT_EXTS, header_length, read_safetensors_header

#: Files hashed for a diffusers folder (weights and the configs that also decide pixels).
_FOLDER_HASH_EXTS = WEIGHT_EXTS + (".json", ".txt")


_CHUNK = 1024 * 1024


def cache_dir() -> Path:
    """``$RENDER_CACHE_DIR`` or ``~/.cache/render``: hash cache, materialised configs."""
    env = os.environ.get("RENDER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "render"


# -- hashing --------------------------------------------------------------------------------
class HashCache:
    """Hashes by (path, size, mtime_ns) in SQLite, so a file is read once until it changes.

    SQLite rather than a JSON file because two runs (cron and a manual one) may hash at once.
    It is only a cache: a database that is not one (garbage, truncated) is moved aside with
    one warning and rebuilt. A cache folder that cannot be made (``RENDER_CACHE_DIR`` names
    a file, a read-only place) is a one-line error: the shipped configs live there too.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "hashes.sqlite"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.computed = 0  # how many hashes were computed (not served from the cache)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._make_folder()
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as exc:
                if self.path.is_dir() or not self._set_aside(exc):
                    raise UserError(f"hash cache {self.path}: {exc}; {_CACHE_HINT}") from None
                self._db = self._open()
        return self._db

    def _make_folder(self) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            what = ("is a file, not a folder" if isinstance(exc, (FileExistsError,
                                                                   NotADirectoryError))
                    else f"cannot be created ({exc.strerror or exc})")
            raise UserError(f"cache folder {folder} {what}; {_CACHE_HINT}") from None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT, algo TEXT, size INTEGER,"
                " mtime_ns INTEGER, value TEXT, PRIMARY KEY (path, algo))"
            )
            db.commit()
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({verdict})")
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self, exc: Exception) -> bool:
        """Move a damaged cache file aside (kept, never deleted) so a new one can start."""
        try:
            moved = aside.move_aside(self.path, "corrupt")
        except FileNotFoundError:
            return True     # another run set it aside a moment ago
        except OSError:
            return False
        print(f"warning: hash cache {self.path} was damaged ({exc}); moved it to {moved.name}"
              " and started a new one (hashes are computed again)", file=sys.stderr)
        return True

    def get(self, path: Path, algo: str, compute: Any) -> str:
        """The cached ``algo`` hash of ``path``, computing (and storing) it when stale."""
        path = Path(os.path.abspath(path))
        st = path.stat()
        with self._lock:
            row = self._conn().execute(
                "SELECT size, mtime_ns, value FROM hashes WHERE path=? AND algo=?",
                (str(path), algo),
            ).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        value = compute(path)
        self.computed += 1
        with self._lock:
            db = self._conn()
            db.execute(
                "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                (str(path), algo, st.st_size, st.st_mtime_ns, value),
            )
            db.commit()
        return value


_CACHE_HINT = ("point RENDER_CACHE_DIR at a folder render may write (unset, it is "
               "~/.cache/render)")


_default_cache: HashCache | None = None


def default_hash_cache() -> HashCache:
    global _default_cache
    if _default_cache is None or _default_cache.path != cache_dir() / "hashes.sqlite":
        _default_cache = HashCache()
    return _default_cache


def stream_digest(path: Path | str, digest: Any, start: int = 0) -> str:
    """``digest`` (a hashlib object) fed the file's bytes from ``start``, 1 MiB at a time."""
    with open(path, "rb") as fh:
        fh.seek(start)
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Full sha256 of a file's bytes (what ``sha256sum`` and A1111 print)."""
    return stream_digest(path, hashlib.sha256())


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's bytes after its header (kohya's "addnet" hash).

    A1111 uses it as a LoRA's hash, so it survives edits of the metadata.
    """
    n = header_length(Path(path))
    return stream_digest(path, hashlib.sha256(), 8 + n)


def file_sha256(path: str | Path, cache: HashCache | None = None) -> str:
    """sha256 of a file, or of a diffusers folder's manifest (see the module docstring)."""
    cache = cache or default_hash_cache()
    path = Path(path)
    if path.is_dir():
        lines = []
        for rel, file in folder_files(path):
            lines.append(f"{cache.get(file, 'sha256', sha256_file)}  {rel}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    return cache.get(path, "sha256", sha256_file)


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Weight and config files under a diffusers folder, sorted by relative path."""
    out = []
    for dirpath, _dirnames, filenames in walk(folder):   # links once: a loop ends
        for name in filenames:
            if not name.lower().endswith(_FOLDER_HASH_EXTS):
                continue
            file = Path(dirpath) / name
            out.append((file.relative_to(folder).as_posix(), file))
    return sorted(out)


#: The name other modules use for :func:`file_sha256`.


def lora_hash(path: str | Path, cache: HashCache | None = None) -> str:
    """The hash A1111 writes for a LoRA in ``Lora hashes`` (12 hex characters).

    As A1111's Lora extension does: the ``sshs_model_hash`` metadata value when the file has
    one, else the addnet hash (safetensors) or the full-file sha256 (other formats); then its
    first 12 characters.
    """
    return lora_full_hash(path, cache)[:12]


def lora_full_hash(path: str | Path, cache: HashCache | None = None) -> str:
    """The untruncated hash behind :func:`lora_hash`."""
    cache = cache or default_hash_cache()
    path = Path(path)
    if path.suffix.lower() in SAFE_EXTS:
        meta = read_safetensors_header(path).get("__metadata__") or {}
        if meta.get("sshs_model_hash"):
            return str(meta["sshs_model_hash"])
        return cache.get(path, "addnet", addnet_hash)
    return file_sha256(path, cache)


_Info = TypeVar("_Info")


def per_file_version(inspect: Callable[[Path], _Info]) -> Callable[[Path], _Info]:
    """Memoise ``inspect(path)`` per file version (path, size, mtime).

    Preflight asks about the same file for every task; a file replaced on disk is read anew.
    """
    cache: dict[tuple[str, int, int], _Info] = {}

    def cached(path: Path) -> _Info:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in cache:
            cache[key] = inspect(path)
        return cache[key]

    return cached


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old short model hash: sha256 of the 64 KiB at 1 MiB into the file, 8 hex
    digits (what old infotexts and sd-webui-controlnet show); a folder's largest weight file.
    Cheap: it reads 64 KiB."""
    path = Path(path)
    if path.is_dir():
        weights = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_EXTS]
        if not weights:
            return ""
        path = max(weights, key=lambda p: (p.stat().st_size, p.name))
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
