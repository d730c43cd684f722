"""Walking folders the user names: bounded, so no folder can make render walk forever.

``model_dirs`` entries, embeddings folders and diffusers folders are walked following links
once each (a loop ends), never into a virtual filesystem (``/proc`` is endless, ``/`` holds
it), skipping hidden entries and what cannot be read, and giving up with ``TreeTooBig`` past
a size that no models folder has (``/``, a home directory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

#: A model_dirs entry is searched recursively, as A1111 does (not into model folders); past
#: this many folders or files it is no models folder (``/``, a home directory), and render
#: says so instead of walking it for minutes.
MAX_SCAN_FOLDERS = 5_000
MAX_SCAN_FILES = 100_000

#: Filesystem types that hold no files of their own: never searched (``/proc`` is endless).
VIRTUAL_FS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "proc", "pstore",
    "rpc_pipefs", "securityfs", "selinuxfs", "sysfs", "tracefs",
})


class TreeTooBig(Exception):
    """A folder holds more than :data:`MAX_SCAN_FOLDERS` folders or
    :data:`MAX_SCAN_FILES` files; the message says so, callers add what to do."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(f"{root} holds more than {MAX_SCAN_FOLDERS:,} folders or "
                         f"{MAX_SCAN_FILES:,} files")


def virtual_roots() -> dict[str, str]:
    """Mount point -> type of every virtual filesystem (from ``/proc/self/mounts`` where
    there is one; ``/proc``, ``/sys`` and ``/dev`` always)."""
    global _virtual
    if _virtual is None:
        found = {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs"}
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) >= 3 and parts[2] in VIRTUAL_FS:
                        point = parts[1].encode().decode("unicode_escape")  # \040 = space
                        found.setdefault(point, parts[2])
        except OSError:
            pass
        _virtual = found
    return _virtual


_virtual: dict[str, str] | None = None


def virtual_fs(path: str | Path) -> str | None:
    """The virtual filesystem type ``path`` lies in, or None for a real folder."""
    real = os.path.realpath(path)
    for point, fstype in virtual_roots().items():
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return fstype
    return None


def walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` following links once each (a loop ends), skipping hidden folders,
    virtual filesystems and folders it cannot read; prune by editing the yielded dirnames.
    Raises :class:`TreeTooBig` past :data:`MAX_SCAN_FOLDERS` folders or
    :data:`MAX_SCAN_FILES` files (counted before any pruning)."""
    seen: set[str] = set()
    files = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or virtual_fs(real):
            dirnames[:] = []
            continue
        seen.add(real)
        files += len(filenames)
        if len(seen) > MAX_SCAN_FOLDERS or files > MAX_SCAN_FILES:
            raise TreeTooBig(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))
