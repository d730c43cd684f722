"""Progress lines for logs, the rich bar on a terminal, and the final summary."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

from render.progress import Progress, hms, summary


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return datetime(2026, 11, 21, 3, 0, 0) + timedelta(seconds=self.t - 1000.0)


def task(job: str, index: int) -> SimpleNamespace:
    return SimpleNamespace(job=job, index=index, short_id=f"{index:012d}")


def plain(total: int, clock: FakeClock, **kw: object) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    progress = Progress(total, tty=False, stream=out, clock=clock, now=clock.wall,
                        **kw)  # type: ignore[arg-type]
    return progress, out


def test_plain_lines_are_timestamped_and_rate_limited() -> None:
    clock = FakeClock()
    progress, out = plain(48, clock, interval=30)
    for i in range(12):
        clock.t += 1.0
        progress.advance(task("demo", i), ok=True)
    lines = out.getvalue().splitlines()
    # one line for the job start, then quiet for 30 s
    assert lines == ["2026-11-21 03:00:01 [demo] started, 0/48 done, 0.0 img/s, ETA --:--:--"]
    clock.t += 30
    progress.advance(task("demo", 12), ok=True)
    last = out.getvalue().splitlines()[-1]
    assert re.fullmatch(r"2026-11-21 03:00:\d\d \[demo\] 13/48 done, \d+\.\d img/s, "
                        r"ETA \d\d:\d\d:\d\d", last)


def test_status_line_numbers() -> None:
    clock = FakeClock()
    progress, out = plain(48, clock)
    clock.t += 12 / 1.3
    for i in range(12):
        progress.advance(task("demo", i), ok=True)
    assert progress.status() == "12/48 done, 1.3 img/s, ETA 00:00:28"
    progress.skip(2)
    progress.advance(task("demo", 12), ok=False, error="RuntimeError: boom\ntrace")
    assert progress.status().endswith(", 1 failed, 2 skipped")
    assert "failed: demo#12 000000000012: RuntimeError: boom" in out.getvalue()


def test_a_line_per_job_start() -> None:
    clock = FakeClock()
    progress, out = plain(4, clock, interval=3600)
    for job in ("a", "a", "b", "b"):
        clock.t += 1
        progress.advance(task(job, 0), ok=True)
    progress.start("c")
    text = out.getvalue()
    assert "[a] started" in text and "[b] started" in text and "[c] started" in text
    assert "[b] 4/4 done" in text                       # the last task always gets a line


def test_close_writes_a_last_line_and_quiet_writes_nothing() -> None:
    clock = FakeClock()
    progress, out = plain(10, clock, interval=3600)
    progress.advance(task("a", 0), ok=True)
    clock.t += 5
    progress.advance(task("a", 1), ok=True)
    progress.close()
    assert out.getvalue().splitlines()[-1].endswith("[a] 2/10 done, 0.4 img/s, ETA 00:00:20")
    progress.close()                                    # idempotent

    quiet, out = plain(10, clock, quiet=True)
    quiet.advance(task("a", 0), ok=False, error="x")
    quiet.skip(3)
    quiet.close()
    assert out.getvalue() == "" and quiet.failed == 1 and quiet.skipped == 3


def test_rich_bar_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(3, tty=True, stream=out)
    progress.skip(1)
    progress.advance(task("cabins", 0), ok=True)
    progress.advance(task("cabins", 1), ok=False, error="ValueError: bad")
    progress.advance(task("cabins", 2), ok=True)
    progress.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "cabins" in text and "3/3" in text and "img/s" in text
    assert "failed: cabins#1" in text and "1 skipped" in text


def test_hms() -> None:
    assert hms(0) == "00:00:00" and hms(27.4) == "00:00:27" and hms(3725) == "01:02:05"
    assert hms(None) == "--:--:--" and hms(float("inf")) == "--:--:--"
    assert hms(400_000) == "111:06:40"


@dataclass
class Counts:
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[object, str]] = field(default_factory=list)
    started: float = 0.0


def test_summary() -> None:
    counts = Counts(rendered=46, skipped=2, failed=2, failures=[
        (task("demo", 7), "RuntimeError: CUDA out of memory\nTraceback ..."),
        ("other#3 abc", "ValueError: " + "x" * 400),
    ])
    text = summary(counts, elapsed=72.0)
    lines = text.splitlines()
    assert lines[0] == ("rendered 46 images in 00:01:12 (0.67 img/s), skipped 2 already done, "
                        "2 failed:")
    assert lines[1] == "  demo#7 000000000007: RuntimeError: CUDA out of memory"
    assert lines[2].startswith("  other#3 abc: ValueError: xxx") and lines[2].endswith("…")
    assert len(lines) == 3


def test_summary_clean_run_interrupted_and_many_failures() -> None:
    assert summary(Counts(rendered=1), elapsed=2.0) == (
        "rendered 1 image in 00:00:02 (0.50 img/s), 0 failed")
    many = Counts(failed=25, failures=[(task("j", i), "e") for i in range(25)])
    text = summary(many, interrupted=True, elapsed=10)
    assert "... and 5 more" in text
    assert text.splitlines()[-1].startswith("interrupted: run the same command again")
