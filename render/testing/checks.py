"""Checks that several test suites make the same way: a user mistake reported as one located
line, how many tasks a run's ledger records done, and what a gallery page shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def one_located_error(args: list[str], job: Path, key: str, words: str, capsys: Any) -> str:
    """Run the CLI in-process with ``args``; assert it exits 2 with exactly one
    ``error: <job>:<line>:<col>: jobs[0].<key>: ...`` line holding ``words``, no traceback,
    and nothing written under ``out/`` beside the job. Returns that line."""
    from render.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    (line,) = [e for e in err if e.startswith(f"error: {job}:")]
    assert f": jobs[0].{key}: " in line and words in line, err
    assert "Traceback" not in "\n".join(err)
    assert not (job.parent / "out").exists()
    return line


def done_count(out: Path) -> int:
    """How many tasks the ledger under ``out`` records done: 0 while there is none yet, or
    while a killed run's ledger cannot be opened."""
    from render.ledger import Ledger

    if not (out / "render.db").exists():
        return 0
    try:
        with Ledger(out) as ledger:
            return len(ledger.done_keys())
    except Exception:  # noqa: BLE001 - mid-write by a run being killed: not done yet
        return 0


def gallery_data(page: str | Path) -> dict[str, Any]:
    """The data a gallery page's script reads (its ``gallery-data`` JSON block), from the
    page's text or its path."""
    import json
    import re

    text = page.read_text(encoding="utf-8") if isinstance(page, Path) else page
    match = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>',
                      text, re.S)
    assert match, "no gallery-data block in the page"
    return json.loads(match.group(1))
