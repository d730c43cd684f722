"""The default executor: one engine in the render process."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from render.executors.work import BatchWork, Outcome
from render.plan import check_device_available, split
from render.tasks import Batch, Result, Task


class LocalExecutor:
    """Renders batch after batch on one ``Engine`` (one device), in the planner's order."""

    name = "local"
    writers = 1   # one writer thread keeps up with one engine

    def __init__(self, plugins: Any, args: Any) -> None:
        self.plugins = plugins
        self.args = args
        self.engine: Any = None

    def check(self) -> None:
        """The ``--device`` asked for exists here (before anything is written)."""
        check_device_available(self.args.device)

    def render(self, batches: list[Batch], shared: Mapping[str, list[Task]],
               stop: threading.Event) -> Iterator[list[Outcome]]:
        """Each batch's outcomes, batch after batch, until the batches or ``stop`` end."""
        from render.engine import Engine

        self.engine = Engine(self.plugins.pm, device=self.args.device, dtype=self.args.dtype)
        work = BatchWork(self.engine, self.plugins, shared)
        if self.args.batch_size <= 0:   # as many as fit in free memory
            batches = split(batches, self.engine.batch_size_for)
        for batch in batches:
            if stop.is_set():
                return
            yield work.run(batch)

    @functools.cache  # noqa: B019 - one executor per run; the engine never changes
    def _described(self) -> dict[str, Any]:
        return self.engine.describe() if self.engine is not None else {}

    def describe(self, result: Result) -> dict[str, Any]:
        """Device, dtype and versions of the engine that rendered ``result``."""
        return self._described()

    def worker_lines(self) -> list[str]:
        """Per-worker figures for the summary: one engine, nothing to add."""
        return []

    def close(self) -> None:
        """Nothing to stop: the engine goes with the process."""
