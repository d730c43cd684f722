"""Moving aside what render must not destroy: a damaged database, an output that changed.

One rule for all of them: the file is renamed to a free sibling
``<name>.<label>-<YYYYmmdd-HHMMSS>[-n]`` (with ``keep_suffix``, the label goes before the
extension so ``photo.changed-….png`` stays a PNG), and an existing name is never taken, so an
earlier copy is never overwritten. Pure ``os``: the ledger, the hash cache and the writer use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

#: How many copies of one name in one second before giving up (``FileExistsError``).
MAX_COPIES = 1000


def move_aside(path: Path, label: str, *, keep_suffix: bool = False,
               companions: Sequence[str] = ()) -> Path:
    """Rename ``path`` to a free ``<name>.<label>-<time>[-n]`` sibling and return it.

    ``companions`` are suffixes of files that belong with it (a database's ``-wal`` and
    ``-shm``): those that exist move first, to the same tail, so a journal never stays behind
    without its database. Raises ``FileNotFoundError`` when ``path`` is gone, and
    ``FileExistsError`` when every candidate name is taken.
    """
    stamp = f"{label}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in range(MAX_COPIES):
        tail = f"{stamp}-{n}" if n else stamp
        targets = {suffix: _target(path, suffix, tail, keep_suffix)
                   for suffix in (*companions, "")}
        if not any(os.path.lexists(t) for t in targets.values()):
            break
    else:
        raise FileExistsError(f"{path}: {MAX_COPIES} copies set aside already")
    for suffix in companions:
        source = path.with_name(path.name + suffix)
        if os.path.lexists(source):
            os.rename(source, targets[suffix])
    os.rename(path, targets[""])
    return targets[""]


def _target(path: Path, companion: str, tail: str, keep_suffix: bool) -> Path:
    if keep_suffix:
        return path.with_name(f"{path.stem}.{tail}{path.suffix}{companion}")
    return path.with_name(f"{path.name}{companion}.{tail}")
