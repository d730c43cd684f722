"""Progress while rendering, and the summary at the end.

On a terminal: a rich progress bar (done/total, images/s, ETA, the current job). Anywhere
else (cron, a log file): plain timestamped lines, at most one every ``interval`` seconds
plus one whenever a job starts, so a night's log stays short and greppable::

    2026-11-21 03:00:01 [demo] 12/48 done, 1.3 img/s, ETA 00:00:27

Progress goes to stderr; stdout stays free for ``--dry-run --json``. No torch here.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

MAX_LISTED_FAILURES = 20


def hms(seconds: float | None) -> str:
    """``01:02:03`` (hours grow past 99 rather than wrap); ``--:--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--:--"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts rendered/failed/skipped tasks and shows them (rich bar or plain lines).

    ``total`` is the number of tasks this run will render; ``skip(n)`` only reports tasks
    already done from an earlier run (they are not part of ``total`` or the rate).
    Thread-safe: the writer thread may call ``advance``.
    """

    def __init__(
        self,
        total: int,
        *,
        tty: bool | None = None,
        quiet: bool = False,
        interval: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.quiet = quiet
        self.interval = interval
        self.clock = clock
        self.now = now
        self.rendered = 0
        self.failed = 0
        self.skipped = 0
        self.job: str | None = None
        self._started_jobs: set[str] = set()
        self.started = clock()
        self._last_line = -float("inf")
        self._last_done = -1
        self._lock = threading.Lock()
        self._bar: Any = None
        self._bar_task: Any = None
        self._closed = False
        if self.tty and not quiet:
            self._start_bar()

    # -- numbers -----------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.rendered + self.failed

    def rate(self) -> float:
        """Images per second since the start (failed tasks count: they took the time too)."""
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current rate; None before the first image."""
        rate = self.rate()
        if rate <= 0:
            return None
        return max(0, self.total - self.done) / rate

    def status(self) -> str:
        """``12/48 done, 1.3 img/s, ETA 00:00:27`` (plus failed/skipped when any)."""
        text = f"{self.done}/{self.total} done, {self.rate():.1f} img/s, ETA {hms(self.eta())}"
        if self.failed:
            text += f", {self.failed} failed"
        if self.skipped:
            text += f", {self.skipped} skipped"
        return text

    # -- events ------------------------------------------------------------------------------
    def start(self, job: str) -> None:
        """A job begins (also noticed by ``advance`` when the task's job changes)."""
        with self._lock:
            self._job_changed(job)

    def advance(self, task: Any, ok: bool = True, error: str | None = None) -> None:
        """One task finished (``ok``) or failed (``error`` is shown when given)."""
        with self._lock:
            self._job_changed(getattr(task, "job", None) or self.job or "")
            if ok:
                self.rendered += 1
            else:
                self.failed += 1
            if self.quiet or self._closed:
                return
            if not ok:
                label = f"{getattr(task, 'job', '?')}#{getattr(task, 'index', '?')}"
                message = f"failed: {label} {getattr(task, 'short_id', '')}".rstrip()
                if error:
                    message += f": {error.strip().splitlines()[0] if error.strip() else ''}"
                self._print(message)
            if self._bar is not None:
                self._update_bar()
            elif self.clock() - self._last_line >= self.interval or self.done == self.total:
                self._line()

    def skip(self, n: int) -> None:
        """``n`` tasks were already done in an earlier run."""
        with self._lock:
            self.skipped += n
            if self._bar is not None:
                self._update_bar()

    def close(self) -> None:
        """Stop the bar (a plain log gets a last status line if anything happened since)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._update_bar()
                self._bar.stop()
                self._bar = None
            elif not self.quiet and self.done and self._last_done != self.done:
                self._line()

    # -- output ------------------------------------------------------------------------------
    def _job_changed(self, job: str) -> None:
        if job == self.job:
            return
        self.job = job
        if self.quiet or self._closed:
            return
        if self._bar is not None:
            self._update_bar()
        elif job not in self._started_jobs:
            # Batches of several jobs interleave (one model loaded once): a job is announced
            # the first time only, not at every switch.
            self._started_jobs.add(job)
            self._emit(f"started, {self.status()}")

    def _line(self) -> None:
        self._emit(self.status())

    def _emit(self, text: str) -> None:
        stamp = self.now().strftime("%Y-%m-%d %H:%M:%S")
        self.stream.write(f"{stamp} [{self.job or '-'}] {text}\n")
        self.stream.flush()
        self._last_line = self.clock()
        self._last_done = self.done

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self._emit(text)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=self.stream, force_terminal=True)
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(), TextColumn("{task.fields[extra]}"),
            console=console, transient=False,
        )
        self._bar_task = self._bar.add_task("render", total=max(self.total, 0), rate="-",
                                            eta=hms(None), extra="")
        self._bar.start()

    def _update_bar(self) -> None:
        extra = []
        if self.failed:
            extra.append(f"{self.failed} failed")
        if self.skipped:
            extra.append(f"{self.skipped} skipped")
        self._bar.update(self._bar_task, completed=self.done, description=self.job or "render",
                         rate=f"{self.rate():.1f}", eta=hms(self.eta()), extra=", ".join(extra))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def summary(counts: Any, *, interrupted: bool = False, elapsed: float | None = None) -> str:
    """The end-of-run report: rendered, skipped as already done, failed (ids and errors),
    time and images/s.

    ``counts`` has ``rendered``, ``skipped``, ``failed``, ``failures`` (``(task, error)``
    pairs; a task may also be a plain label) and ``started`` (a ``time.monotonic()`` value),
    like ``render.runner.Counts``; ``elapsed`` overrides the time since ``started``.
    """
    if elapsed is None:
        started = getattr(counts, "started", None)
        elapsed = time.monotonic() - started if started is not None else 0.0
    rendered = int(getattr(counts, "rendered", 0))
    skipped = int(getattr(counts, "skipped", 0))
    failures = list(getattr(counts, "failures", []) or [])
    failed = int(getattr(counts, "failed", len(failures)))
    rate = (rendered + failed) / elapsed if elapsed > 0 else 0.0
    plural = "" if rendered == 1 else "s"
    text = f"rendered {rendered} image{plural} in {hms(elapsed)} ({rate:.2f} img/s)"
    if skipped:
        text += f", skipped {skipped} already done"
    text += f", {failed} failed" + (":" if failures else "")
    lines = [text]
    for task, error in failures[:MAX_LISTED_FAILURES]:
        if isinstance(task, str):
            label = task
        else:
            label = f"{task.job}#{task.index} {task.short_id}".rstrip()
        first = (str(error).strip().splitlines() or [""])[0]
        if len(first) > 300:
            first = first[:299] + "…"
        lines.append(f"  {label}: {first}")
    if len(failures) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more "
                     "(see index.html or the ledger)")
    if interrupted:
        lines.append("interrupted: run the same command again to resume")
    return "\n".join(lines)
