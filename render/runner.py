"""The render loop: ledger and lock, batches through the engine, writes, the report.

The GPU never waits for the disk: encoding and writing run on one writer thread while the
next batch renders. The ledger row for a task is committed only after its file is in place,
so ``kill -9`` at any moment loses at most the images in flight and never leaves a partial
file under a final name. SIGINT/SIGTERM finish the batch in flight, write it, and stop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from render import __version__, metadata, output
from render.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    PluginError,
    UserError,
)
from render.expand import JobPlan
from render.plan import make_batches, split
from render.plugins import Plugins
from render.tasks import Batch, Job, Result, Task

log = logging.getLogger("render")



@dataclass
class Counts:
    """What the summary reports."""

    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[Task, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


@dataclass
class RunReport:
    """Handed to the ``run_finished`` hook: where things are and how the run went."""

    roots: list[Path]
    jobs: dict[str, Job]
    ledgers: dict[Path, Any]
    counts: Counts
    interrupted: bool
    grids: dict[str, list[Path]] = field(default_factory=dict)


class Runner:
    """Renders planned tasks; one instance per invocation."""

    def __init__(self, plans: list[JobPlan], plugins: Plugins, args: Any) -> None:
        self.plans = plans
        self.plugins = plugins
        self.hook = plugins.pm.hook
        self.args = args
        self.jobs = {plan.job.name: plan.job for plan in plans}
        self.roots = {name: output.output_root(job.output.dir, job.base_dir).resolve()
                      for name, job in self.jobs.items()}
        self.counts = Counts()
        self._counts_lock = threading.Lock()   # the writer thread counts too
        self.stop = threading.Event()
        self.engine: Any = None
        self.ledgers: dict[Path, Any] = {}
        self._paths: dict[tuple[str, int], Path] = {}
        self._started = datetime.now()
        self._twins: dict[str, list[Task]] = {}   # id -> other jobs' tasks with its pixels

    # -- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        print(f"\n{signal.Signals(signum).name}: finishing the batch in flight, then stopping "
              "(again to abort)", file=sys.stderr)

    # -- the run ---------------------------------------------------------------------------
    def run(self, tasks: list[Task]) -> int:
        from render.ledger import LockedError, RunLock

        roots = sorted(set(self.roots.values()))
        with ExitStack() as stack:
            for root in roots:
                root.mkdir(parents=True, exist_ok=True)
                try:
                    stack.enter_context(RunLock(root))
                except LockedError as exc:
                    print(f"render: {exc}", file=sys.stderr)
                    return EXIT_LOCKED
                output.remove_stale_temps(root)
            from render.ledger import Ledger

            for root in roots:
                self.ledgers[root] = stack.enter_context(closing(Ledger(root)))
            # Names come from every task of the run, done or not, so a resumed run names
            # each task exactly as the first run did.
            paths = output.unique_paths(
                [(t, self.jobs[t.job], self.roots[t.job]) for t in tasks], now=self._started)
            self._paths = {(t.job, t.index): p for t, p in zip(tasks, paths, strict=True)}
            todo = self._todo(tasks)
            previous = {s: signal.signal(s, self._on_signal)
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                self._render_all(todo)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            report = self._report()
        print(self._summary(), file=sys.stderr if self.args.quiet else sys.stdout)
        if report.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.counts.failed else EXIT_OK

    def _todo(self, tasks: list[Task]) -> list[Task]:
        """Tasks to render: not yet in their ledger (all with --force), each id once.

        A task whose pixels another job of this run renders too (same id) is not rendered
        twice: it becomes a twin of that task and gets its own file from the same images.
        """
        done: dict[Path, set[tuple[str, str]]] = {root: ledger.done_keys()
                                                  for root, ledger in self.ledgers.items()}
        seen: set[tuple[str, str]] = set()
        first: dict[str, Task] = {}
        todo = []
        for task in tasks:
            key = (task.id, task.job)
            if key in seen:   # the same image twice in one job (e.g. {a|a}): once is enough
                continue
            seen.add(key)
            if not self.args.force and key in done[self.roots[task.job]]:
                self.counts.skipped += 1
            elif task.id in first:
                self._twins.setdefault(task.id, []).append(task)
            else:
                first[task.id] = task
                todo.append(task)
        return todo

    def _render_all(self, todo: list[Task]) -> None:
        from render.progress import Progress

        twins = sum(len(t) for t in self._twins.values())
        self.progress = Progress(len(todo) + twins, quiet=self.args.quiet)
        if self.counts.skipped:
            self.progress.skip(self.counts.skipped)
        if not todo:
            self.progress.close()
            return
        from render.engine import Engine

        self.engine = Engine(self.plugins.pm, device=self.args.device, dtype=self.args.dtype)
        batches = make_batches(todo, self.hook, self.args.batch_size, self._fail_rendering)
        if self.args.batch_size <= 0:
            batches = list(split(batches, self.engine.batch_size_for))
        pending: list[Future[Any]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            for batch in batches:
                if self.stop.is_set():
                    break
                # No "started" line here: the writer announces a job with its first written
                # image, so every count a line shows is what is on disk at that moment.
                for result in self._render_batch(batch):
                    result = self._postprocess(result)
                    if result is None:
                        continue
                    pending.append(writer.submit(self._write, result))
                    for twin in self._twins.get(result.task.id, ()):
                        pending.append(writer.submit(self._write, dataclasses.replace(
                            result, task=twin, provenance={}, timings=dict(result.timings))))
                # Bound memory: at most about two batches of images wait for the disk.
                while len(pending) > 2 * len(batch.tasks):
                    pending.pop(0).result()
            for future in pending:
                future.result()
        self.progress.close()

    def _render_batch(self, batch: Batch) -> list[Result]:
        """Render a batch; on failure retry its tasks one by one so one bad task fails alone."""
        try:
            return self.engine.render(batch)
        except Exception as exc:  # isolate: the night goes on
            if len(batch.tasks) == 1:
                self._fail_rendering(batch.first, exc)
                return []
        results = []
        for task in batch.tasks:
            try:
                results.extend(self.engine.render(Batch(batch.key, (task,))))
            except Exception as exc:
                self._fail_rendering(task, exc)
        return results

    def _postprocess(self, result: Result) -> Result | None:
        try:
            return self.plugins.chain("postprocess", "result", result, task=result.task)
        except Exception as exc:
            self._fail_rendering(result.task, exc)
            return None

    def _fail_rendering(self, task: Task, exc: BaseException) -> None:
        """A task that could not be rendered fails with the twins waiting for its images."""
        for failed in (task, *self._twins.get(task.id, ())):
            self._fail(failed, exc)

    def _fail(self, task: Task, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        message = message.strip()
        log.debug("task %s failed:\n%s", task.short_id, "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))
        self.ledgers[self.roots[task.job]].record_failed(task, message)
        with self._counts_lock:
            self.counts.failed += 1
            self.counts.failures.append((task, message))
        self.progress.advance(task, ok=False)

    # -- write (writer thread) -------------------------------------------------------------
    def _write(self, result: Result) -> None:
        task = result.task
        try:
            job = self.jobs[task.job]
            root = self.roots[task.job]
            path = self._path_for(task)
            versions, device = self._environment()
            infotext, prov = metadata.describe_result(result, self.plugins, versions, device)
            result = dataclasses.replace(result, provenance=prov)
            start = time.monotonic()
            written = self.hook.write_output(result=result, path=path, fmt=job.output.format)
            if not written:
                raise UserError(f"no writer for format {job.output.format!r}")
            for suffix, image in result.extras.items():
                # An extra "control-0" is saved only when output.save_control is on.
                if not job.output.options.get(f"save_{suffix.split('-', 1)[0]}"):
                    continue
                extra = path.with_name(f"{path.stem}-{suffix}.png")
                output.atomic_write(extra, lambda p, im=image: im.save(p, format="PNG"))
                written.append(extra)
            result.timings["write"] = time.monotonic() - start
            self.ledgers[root].record_done(task, [str(p) for p in written], result.timings,
                                           infotext)
            with self._counts_lock:
                self.counts.rendered += 1
            self.progress.advance(task, ok=True)
        except Exception as exc:
            self._fail(task, exc)

    def _path_for(self, task: Task) -> Path:
        path = self._paths[(task.job, task.index)]
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @functools.cache  # noqa: B019 - one Runner per invocation; the engine never changes
    def _environment(self) -> tuple[dict[str, str], str]:
        """Versions (torch, diffusers, each plugin's source) and the device, once per run."""
        described = self.engine.describe() if self.engine else {}
        versions = {"render": __version__, **described.get("versions", {}),
                    **{f"plugin:{name}": source for name, source in self.plugins.sources.items()}}
        return versions, described.get("device", "")

    # -- report ----------------------------------------------------------------------------
    def _report(self) -> RunReport:
        from render import gallery, grids

        report = RunReport(sorted(self.ledgers), self.jobs, self.ledgers, self.counts,
                           self.stop.is_set())
        for name, job in self.jobs.items():
            if not (job.output.grid and job.grid_axes):
                continue
            rows = self.ledgers[self.roots[name]].rows(job=name)
            try:
                report.grids[name] = grids.build_grids(rows, job, output.job_dir(
                    job, self.roots[name], now=self._started))
            except Exception as exc:  # a sheet must never cost the night's images
                log.warning("grid sheet for job %s failed: %s", name, exc)
        for root, ledger in self.ledgers.items():
            try:
                gallery.build_gallery(root, ledger, report.grids)
            except Exception as exc:
                log.warning("gallery for %s failed: %s", root, exc)
        try:
            self.hook.run_finished(run=report)
        except PluginError as exc:  # the night's images are written: a warning, not a failure
            print(f"warning: {exc}", file=sys.stderr)
        return report

    def _summary(self) -> str:
        from render.progress import summary

        return summary(self.counts, interrupted=self.stop.is_set())
