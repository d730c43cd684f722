"""The run ledger (``render.db`` in the output root) and the run lock.

The ledger is what makes a night resumable: one SQLite row per task (its content id and its
job: two jobs that ask for the same pixels each get their file), committed one at a
time, in WAL mode with ``synchronous=FULL``, so a crash or ``kill -9`` at any moment loses
at most the row being written. Callers' contract: ``record_done`` is called only after the
output file is complete under its final name (``render.output.atomic_write`` returned), so
a "done" row always points at a whole file. The settings column holds the full resolved task
(``task.to_json()``, with its axes), so grids and the gallery are rebuilt from the ledger
alone.

The ledger is not believed over the disk: each output's size, mtime and blake2b digest are
recorded with it, and ``render.reconcile`` renders again a task whose file was deleted,
truncated or changed. The ``temps`` table registers every temp file ``atomic_write`` makes
under the root before it exists, so the sweep after a crash removes only those.

``RunLock`` keeps two runs off one output root: an ``fcntl.flock`` on ``render.lock``, which
the kernel releases when the process dies (``kill -9`` included), plus the holder's pid,
host, start time and command in the file for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sqlite3
import stat
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from render.errors import UserError
from render.hashing import stream_digest
from render.tasks import Task

DB_NAME = "render.db"
LOCK_NAME = "render.lock"
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id         TEXT NOT NULL,             -- the content id: what decides the pixels
    job        TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    status     TEXT NOT NULL,             -- done | failed | replaced
    outputs    TEXT NOT NULL DEFAULT '[]', -- JSON list of paths, relative to the root
    timings    TEXT NOT NULL DEFAULT '{}', -- JSON
    error      TEXT,
    infotext   TEXT,
    settings   TEXT NOT NULL,             -- JSON: task.to_json() + kind + sections
    updated_at TEXT NOT NULL,
    PRIMARY KEY (id, job)
);
CREATE INDEX IF NOT EXISTS tasks_job ON tasks (job, idx);
CREATE TABLE IF NOT EXISTS outputs (
    path     TEXT PRIMARY KEY,            -- which task's file sits at this path now
    task_id  TEXT NOT NULL,
    job      TEXT NOT NULL,
    size     INTEGER,                     -- the file as written (schema 3; NULL: not known)
    mtime_ns INTEGER,
    digest   TEXT                         -- blake2b-128 of its bytes, hex
);
CREATE TABLE IF NOT EXISTS sheets (
    path     TEXT PRIMARY KEY,            -- a grid sheet render wrote, relative to the root
    job      TEXT NOT NULL,
    ord      INTEGER NOT NULL,            -- its place among the job's sheets
    size     INTEGER,
    mtime_ns INTEGER,
    digest   TEXT
);
CREATE TABLE IF NOT EXISTS temps (
    path        TEXT PRIMARY KEY,         -- absolute: a temp file atomic_write is making
    pid         INTEGER NOT NULL,
    start_ticks INTEGER                   -- with the pid, names one process
);
"""
_IDENTITY_COLUMNS = (("size", "INTEGER"), ("mtime_ns", "INTEGER"), ("digest", "TEXT"))

Key = tuple[str, str]   # (task id, job)


@dataclass(frozen=True)
class FileIdentity:
    """A file as render wrote it: a stat says "unchanged" cheaply; the digest decides."""

    size: int
    mtime_ns: int
    digest: str


#: Each done task's files with the identity recorded when they were written.
DoneFiles = dict[Key, list[tuple[Path, FileIdentity | None]]]


def file_digest(path: Path | str) -> str:
    """blake2b-128 of the file's bytes: fast, and plenty to tell a changed output."""
    return stream_digest(path, hashlib.blake2b(digest_size=16))


def file_identity(path: Path | str) -> FileIdentity | None:
    """The identity of a regular file, or None when there is none at ``path``."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        return FileIdentity(st.st_size, st.st_mtime_ns, file_digest(path))
    except OSError:
        return None


@dataclass(frozen=True)
class OutputRecord:
    """Who owns the file at a path, and what it looked like when render wrote it."""

    task_id: str
    job: str
    identity: FileIdentity | None


class LedgerCorrupt(Exception):
    """``render.db`` is not a readable SQLite database (truncated, overwritten, damaged)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_corrupt_error(exc: BaseException) -> bool:
    """Whether a sqlite error means a damaged file (not a lock, a full disk or permissions)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


@dataclass(frozen=True)
class LedgerRow:
    """One task's entry: where its files are, how it went, and its full settings."""

    id: str
    job: str
    index: int
    status: str
    paths: tuple[Path, ...]
    timings: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    infotext: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    updated_at: str = ""

    @property
    def axes(self) -> dict[str, Any]:
        """The task's grid/zip axis values (key -> value)."""
        return dict(self.settings.get("axes") or {})

    @property
    def seed(self) -> int | None:
        return self.settings.get("seed")


def task_settings(task: Task) -> dict[str, Any]:
    """What the ledger keeps of a task: ``to_json()`` plus its kind and section names."""
    data = task.to_json()
    data["kind"] = task.kind
    data["sections"] = sorted(task.sections)
    return data


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _abs(root: Path, stored: str) -> Path:
    path = Path(stored)
    return path if path.is_absolute() else root / path


def _done_files(db: sqlite3.Connection, root: Path) -> DoneFiles:
    """Each done task's files with their recorded identity (None: a row from before schema 3,
    or a path another task owns now)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(outputs)")}
    extra = ", size, mtime_ns, digest" if "digest" in columns else ""
    records: dict[str, tuple[Key, FileIdentity | None]] = {}
    for row in db.execute(f"SELECT path, task_id, job{extra} FROM outputs"):
        known = FileIdentity(*row[3:6]) if extra and row[3] is not None else None
        records[row[0]] = ((row[1], row[2]), known)
    done: DoneFiles = {}
    for task_id, job, outputs in db.execute(
            "SELECT id, job, outputs FROM tasks WHERE status='done'"):
        files = []
        for stored in json.loads(outputs):
            owner, known = records.get(stored, (None, None))
            files.append((_abs(root, stored), known if owner == (task_id, job) else None))
        done[(task_id, job)] = files
    return done


class Ledger:
    """The SQLite ledger of one output root. Thread-safe; one commit per recorded task.

    Raises ``LedgerCorrupt`` when the file is damaged (``render.reconcile.open_ledger`` sets
    it aside and rebuilds the ledger from the images).
    """

    def __init__(self, root: Path | str, *, filename: str = DB_NAME) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / filename
        self._lock = threading.Lock()
        with contextlib.suppress(OSError):
            if self.path.stat().st_size == 0:   # sqlite would take it for a new ledger
                raise LedgerCorrupt(self.path, "the file is empty")
        self._db = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if is_corrupt_error(exc):
                raise LedgerCorrupt(self.path, str(exc)) from None
            raise

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise LedgerCorrupt(self.path, "; ".join(problems[:3]))
        self._db.executescript(_SCHEMA)  # idempotent; its own transaction
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path}: written by a newer render (schema {version})")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(outputs)")}
            for name, kind in _IDENTITY_COLUMNS:   # schema 2 -> 3
                if name not in columns:
                    self._db.execute(f"ALTER TABLE outputs ADD COLUMN {name} {kind}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Any:
        """One write transaction. ``durable=False`` (temp registrations) skips the fsync: a
        crashed process's commit is still in the OS cache; only a power cut could lose the
        row, leaving a hidden temp file unswept, never a foreign file deleted."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # -- paths are stored relative to the root, so the output tree can move --------------------
    def _rel(self, path: Path | str) -> str:
        path = Path(path)
        absolute = Path(os.path.abspath(path))
        try:
            return absolute.relative_to(os.path.abspath(self.root)).as_posix()
        except ValueError:
            return str(absolute)

    def _abs(self, stored: str) -> Path:
        return _abs(self.root, stored)

    # -- writing -------------------------------------------------------------------------------
    def record_done(
        self,
        task: Task,
        paths: Iterable[Path | str],
        timings: Mapping[str, float],
        infotext: str | None,
    ) -> None:
        """Record a finished task; call only after its files are complete in place.

        Each file's size, mtime and digest are recorded with it, so a later run can tell
        that a file was deleted, truncated or changed (``render.reconcile``). A task that
        previously owned one of these paths (the user changed a setting, the name stayed) is
        marked ``replaced``: its file now holds other pixels, so it is no longer done and
        neither grids nor the gallery show it.
        """
        rel = [self._rel(p) for p in paths]
        identities = [file_identity(self._abs(p)) for p in rel]   # hashing outside the lock
        now = _now()
        with self._transaction() as db:
            for path, known in zip(rel, identities, strict=True):
                owner = db.execute("SELECT task_id, job FROM outputs WHERE path=?",
                                   (path,)).fetchone()
                if owner and tuple(owner) != (task.id, task.job):
                    db.execute(
                        "UPDATE tasks SET status='replaced', updated_at=? "
                        "WHERE id=? AND job=? AND status='done'", (now, *owner),
                    )
                db.execute(
                    "INSERT OR REPLACE INTO outputs (path, task_id, job, size, mtime_ns, digest) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (path, task.id, task.job, *(astuple(known) if known else (None,) * 3)))
            marks = ",".join("?" * len(rel))
            db.execute(f"DELETE FROM outputs WHERE task_id=? AND job=? AND path NOT IN ({marks})",
                       (task.id, task.job, *rel))
            self._upsert(db, task, "done", json.dumps(rel), timings, None, infotext, now)

    def record_failed(self, task: Task, error: str) -> None:
        """Record a task that failed (its error text kept for the summary and gallery)."""
        with self._transaction() as db:
            old = db.execute("SELECT outputs FROM tasks WHERE id=? AND job=?",
                             (task.id, task.job)).fetchone()
            outputs = old[0] if old else "[]"
            self._upsert(db, task, "failed", outputs, {}, str(error), None, _now())

    def refresh_identity(self, path: Path | str, known: FileIdentity) -> None:
        """Record a file's identity anew: same bytes, another mtime (a copied tree), or the
        first identity of a row from before schema 3."""
        with self._transaction() as db:
            db.execute("UPDATE outputs SET size=?, mtime_ns=?, digest=? WHERE path=?",
                       (*astuple(known), self._rel(path)))

    def _upsert(self, db: sqlite3.Connection, task: Task, status: str, outputs: str,
                timings: Mapping[str, float], error: str | None, infotext: str | None,
                now: str) -> None:
        if not task.id:
            raise ValueError(f"task {task.job}[{task.index}] has no id (run preflight first)")
        db.execute(
            "INSERT OR REPLACE INTO tasks "
            "(id, job, idx, status, outputs, timings, error, infotext, settings, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (task.id, task.job, task.index, status, outputs, json.dumps(dict(timings)), error,
             infotext, json.dumps(task_settings(task), ensure_ascii=False), now),
        )

    def record_sheets(self, job: str, paths: Iterable[Path | str]) -> None:
        """The job's grid sheets are now these files, as they are on disk (in order)."""
        rel = [self._rel(p) for p in paths]
        identities = [file_identity(self._abs(p)) for p in rel]
        with self._transaction() as db:
            db.execute("DELETE FROM sheets WHERE job=?", (job,))
            for n, (path, known) in enumerate(zip(rel, identities, strict=True)):
                db.execute(
                    "INSERT OR REPLACE INTO sheets (path, job, ord, size, mtime_ns, digest) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (path, job, n, *(astuple(known) if known else (None,) * 3)))

    def sheets(self, job: str | None = None) -> dict[Path, FileIdentity | None]:
        """Recorded grid sheets (of one job), in order, with their identity as written."""
        sql = "SELECT path, size, mtime_ns, digest FROM sheets"
        args: tuple[str, ...] = ()
        if job is not None:
            sql, args = sql + " WHERE job=?", (job,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY job, ord", args).fetchall()
        return {self._abs(r[0]): FileIdentity(*r[1:4]) if r[1] is not None else None
                for r in rows}

    def sheets_by_job(self) -> dict[str, list[Path]]:
        """Each job's recorded grid sheets, in order."""
        with self._lock:
            rows = self._db.execute("SELECT job, path FROM sheets ORDER BY job, ord").fetchall()
        out: dict[str, list[Path]] = {}
        for job, path in rows:
            out.setdefault(job, []).append(self._abs(path))
        return out

    # -- temp files (the registry behind output.atomic_write) ----------------------------------
    def register_temp(self, path: Path | str) -> None:
        """Note a temp file before it is created: only registered temps are ever swept."""
        pid = os.getpid()
        with self._transaction(durable=False) as db:
            db.execute("INSERT OR REPLACE INTO temps (path, pid, start_ticks) VALUES (?, ?, ?)",
                       (os.path.abspath(path), pid, process_start_ticks(pid)))

    def forget_temp(self, path: Path | str) -> None:
        """The temp file was renamed into place or removed."""
        with self._transaction(durable=False) as db:
            db.execute("DELETE FROM temps WHERE path=?", (os.path.abspath(path),))

    def temps(self) -> list[tuple[Path, int, int | None]]:
        """Registered temp files: (absolute path, pid, process start ticks)."""
        with self._lock:
            rows = self._db.execute("SELECT path, pid, start_ticks FROM temps").fetchall()
        return [(Path(r[0]), r[1], r[2]) for r in rows]

    # -- reading -------------------------------------------------------------------------------
    def done_keys(self, *, check_files: bool = False) -> set[Key]:
        """``(id, job)`` of done tasks; ``check_files``: only those whose files are on disk
        as render wrote them (``render.reconcile.check_done``), read-only."""
        if not check_files:
            with self._lock:
                rows = self._db.execute("SELECT id, job FROM tasks WHERE status='done'").fetchall()
            return {(r[0], r[1]) for r in rows}
        from render.reconcile import check_done

        return check_done(self.done_files()).done

    def done_files(self) -> DoneFiles:
        """Each done task's files with the identity recorded when they were written."""
        with self._lock:
            return _done_files(self._db, self.root)

    def output_record(self, path: Path | str) -> OutputRecord | None:
        """The ledger's record of the file at ``path`` (None: render never recorded one)."""
        with self._lock:
            row = self._db.execute(
                "SELECT task_id, job, size, mtime_ns, digest FROM outputs WHERE path=?",
                (self._rel(path),)).fetchone()
        if row is None:
            return None
        return OutputRecord(row[0], row[1], FileIdentity(*row[2:5]) if row[2] is not None else None)

    def recorded_paths(self) -> set[Path]:
        """Every path the ledger has a file record for."""
        with self._lock:
            rows = self._db.execute("SELECT path FROM outputs").fetchall()
        return {self._abs(r[0]) for r in rows}

    def rows(self, job: str | None = None, *, status: str | None = None) -> list[LedgerRow]:
        """Rows (of one job, of one status), ordered by job then index."""
        sql = ("SELECT id, job, idx, status, outputs, timings, error, infotext, settings, "
               "updated_at FROM tasks")
        where, args = [], []
        if job is not None:
            where.append("job=?")
            args.append(job)
        if status is not None:
            where.append("status=?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY job, idx, id"
        with self._lock:
            raw = self._db.execute(sql, args).fetchall()
        return [
            LedgerRow(
                id=r[0], job=r[1], index=r[2], status=r[3],
                paths=tuple(self._abs(p) for p in json.loads(r[4])),
                timings=json.loads(r[5]), error=r[6], infotext=r[7],
                settings=json.loads(r[8]), updated_at=r[9],
            )
            for r in raw
        ]

    def jobs(self) -> list[str]:
        """Job names in the order they first appeared in the ledger."""
        with self._lock:
            raw = self._db.execute(
                "SELECT job FROM tasks GROUP BY job ORDER BY MIN(rowid)").fetchall()
        return [r[0] for r in raw]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_done_keys(root: Path | str, *, filename: str = DB_NAME) -> set[Key]:
    """Done ``(id, job)`` of the ledger at ``root`` whose files are on disk as render wrote
    them, read without creating, locking or changing anything.

    For ``--dry-run``: no ledger yet means nothing done. Safe while a run is writing (WAL).
    Raises ``LedgerCorrupt`` for a damaged file.
    """
    path = Path(root) / filename
    if not path.is_file():
        return set()
    if path.stat().st_size == 0:
        raise LedgerCorrupt(path, "the file is empty")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        db = sqlite3.connect(path, timeout=30)
    try:
        files = _done_files(db, Path(root))
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc):
            return set()
        if is_corrupt_error(exc):
            raise LedgerCorrupt(path, str(exc)) from None
        raise
    finally:
        db.close()
    from render.reconcile import check_done

    return check_done(files).done


# -- processes -------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc, or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def process_start_ticks(pid: int | None = None) -> int | None:
    """A process's start time (Linux clock ticks): with the pid, it names one process."""
    stat = _proc_stat(os.getpid() if pid is None else pid)
    return stat[1] if stat else None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` is a live process on this host (zombies and reused pids are not)."""
    if pid <= 0:
        return False
    if pid == os.getpid():   # us, unless an earlier process had our pid (containers reuse them)
        return start_ticks is None or start_ticks == process_start_ticks()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        if state in ("Z", "X", "x"):
            return False
        if start_ticks is not None and ticks != start_ticks:
            return False
    return True


# -- the run lock ----------------------------------------------------------------------------
class LockedError(UserError):
    """Another run holds the output root; the message names it (pid, host, start, command)."""

    def __init__(self, path: Path, info: Mapping[str, Any]) -> None:
        self.path = path
        self.info = dict(info)
        if info.get("pid"):
            who = (f"pid {info.get('pid')} on {info.get('host', '?')}, started "
                   f"{info.get('started', '?')}: {info.get('command', '?')}")
        else:
            who = "a process that is just starting"
        super().__init__(f"another render run is using this output folder ({path}): {who}")


class RunLock:
    """Context manager: hold the output root for this run, or raise ``LockedError``.

    The lock is an ``flock`` on ``<root>/render.lock``, released by the kernel when the
    process ends, however it ends. When the lock is still held but the recorded process is
    dead on this host (a forked worker inherited the descriptor and outlived its parent),
    the lock file is replaced and the run goes on. The file is never deleted (deleting a
    locked file lets two runs lock two different files); it is emptied on release.
    """

    def __init__(self, root: Path | str, *, command: str | None = None) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.command = command if command is not None else shlex.join(sys.argv)
        self._fd: int | None = None

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"),
            "command": self.command, "proc_start": process_start_ticks(),
        }

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 65536)
            info = json.loads(data.decode("utf-8")) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _write(self, fd: int) -> None:
        data = json.dumps(self.info()).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _same_file(fd: int, path: Path) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    @staticmethod
    def _holder_dead(info: Mapping[str, Any]) -> bool:
        pid = info.get("pid")
        if not isinstance(pid, int) or info.get("host") != socket.gethostname():
            return False
        ticks = info.get("proc_start")
        return not pid_alive(pid, ticks if isinstance(ticks, int) else None)

    def acquire(self) -> RunLock:
        """Take the lock or raise ``LockedError`` naming the process that holds it."""
        if self._fd is not None:
            raise RuntimeError("RunLock is already held")
        self.root.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {}
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                if not self._holder_dead(info):
                    raise LockedError(self.path, info) from None
                if self._take_over():
                    return self
                continue
            if not self._same_file(fd, self.path):  # replaced by a take-over meanwhile
                os.close(fd)
                continue
            self._write(fd)
            self._fd = fd
            return self
        raise LockedError(self.path, info)

    def _take_over(self) -> bool:
        """Replace a lock file held only by a dead process's inherited descriptor."""
        guard = os.open(self.root / f".{LOCK_NAME}.guard", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                if not self._holder_dead(info):
                    raise LockedError(self.path, info) from None
            else:
                if self._same_file(fd, self.path):
                    self._write(fd)
                    self._fd = fd
                    return True
                os.close(fd)
                return False
            tmp = self.root / f".{LOCK_NAME}.{os.getpid()}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write(fd)
            os.replace(tmp, self.path)
            self._fd = fd
            return True
        finally:
            os.close(guard)

    def release(self) -> None:
        """Empty the lock file and unlock it (the kernel would unlock it at exit anyway)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._same_file(fd, self.path):
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
