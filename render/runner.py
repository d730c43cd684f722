"""The render loop: ledger and lock, batches through the executor, writes, the report.

The GPU never waits for the disk: encoding and writing run on writer threads while the next
batch renders. Where batches render is the executor's business (``render.executors``: in this
process, or on Ray workers); this module alone records, writes and counts, so the ledger has
one writer whatever the executor. The ledger row for a task is committed only after its file
is in place, so ``kill -9`` at any moment loses at most the images in flight and never leaves
a partial file under a final name; the next run believes the disk over the ledger
(``render.reconcile``). SIGINT/SIGTERM finish the batches in flight, write them, and stop; a
second signal aborts at once, the summary still printed (exit 130). A full disk stops the
run cleanly: one message, the summary, exit 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from render import __version__, metadata, output, reconcile
from render.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    JobError,
    JobErrors,
    PluginError,
    UserError,
)
from render.executors.work import Failure, failure_message
from render.expand import JobPlan
from render.plan import make_batches
from render.plugins import Plugins
from render.tasks import Job, Result, Task

log = logging.getLogger("render")


def _reason(exc: BaseException) -> str:
    """The innermost error's own words (``No space left on device``)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return getattr(exc, "strerror", None) or str(exc)


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

    def __init__(self, plans: list[JobPlan], plugins: Plugins, args: Any,
                 executor: Any) -> None:
        self.plans = plans
        self.executor = executor   # render.executors: where the batches render
        self.plugins = plugins
        self.hook = plugins.pm.hook
        self.args = args
        self.jobs = {plan.job.name: plan.job for plan in plans}
        self.roots = {name: output.output_root(job.output.dir, job.base_dir).resolve()
                      for name, job in self.jobs.items()}
        self.counts = Counts()
        self._counts_lock = threading.Lock()   # the writer thread counts too
        self.stop = threading.Event()
        self.ledgers: dict[Path, Any] = {}
        self._paths: dict[tuple[str, int], Path] = {}
        self._started = datetime.now()
        self._twins: dict[str, list[Task]] = {}   # id -> other jobs' tasks with its pixels
        # id -> tasks whose first pass is that task's (they differ only in post sections)
        self._shared: dict[str, list[Task]] = {}
        self.progress: Any = None
        self._damaged: dict[Path, tuple[Any, Path]] = {}   # root -> (LedgerCorrupt, moved to)
        self.disk_full: str | None = None   # the message, once a write met a full disk

    # -- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        print(f"\n{signal.Signals(signum).name}: finishing the batches in flight, then stopping "
              "(again to abort)", file=sys.stderr)

    # -- the run ---------------------------------------------------------------------------
    def run(self, tasks: list[Task]) -> int:
        """Render ``tasks``; the exit code. The run's signal handlers stay until the summary
        is printed: a second signal aborts the rest (grids, gallery included), and the summary
        still tells what is on disk."""
        self._planned: dict[str, list[Task]] = {}
        for task in tasks:
            self._planned.setdefault(task.job, []).append(task)
        roots = sorted(set(self.roots.values()))
        self._check_roots(roots)   # one located line, exit 2, before anything is written
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                with ExitStack() as stack:
                    if not self._open_roots(stack, roots):
                        return EXIT_LOCKED
                    self._render_all(self._todo(tasks))
                    self._report()
            except KeyboardInterrupt:   # the second signal: stop now
                self.stop.set()
                if self.progress is not None:
                    self.progress.close()
                print("aborted", file=sys.stderr)
            except Exception as exc:   # the ledger's own commits (reconciling) on a full disk
                if not reconcile.disk_full(exc):
                    raise
                self._stop_disk_full(roots[0] if len(roots) == 1 else roots, exc)
            if self.disk_full:
                print(self.disk_full, file=sys.stderr)
            print(self._summary(), file=sys.stderr if self.args.quiet else sys.stdout)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.disk_full:
            return EXIT_FAILED
        if self.stop.is_set():
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.counts.failed else EXIT_OK

    # -- the output roots ------------------------------------------------------------------
    def _root_error(self, root: Path, message: str) -> JobError:
        """``message`` located at the ``output.dir`` of the first job writing to ``root``."""
        plan = next(p for p in self.plans if self.roots[p.job.name] == root)
        where, key = plan.locate("output.dir")
        return JobError(where, key, message)

    def _check_roots(self, roots: list[Path]) -> None:
        """Every unusable output folder, one located line each. A folder behind a link to
        nothing (a disk not mounted tonight) is checked as written, before ``resolve()``
        turned the link into a path that ``mkdir`` would create on the wrong disk."""
        problems: dict[Path, str | None] = {}
        for name, job in self.jobs.items():
            declared = output.output_root(job.output.dir, job.base_dir)
            if reconcile.dangling_link(declared):
                problems.setdefault(self.roots[name], reconcile.check_root(declared))
        for root in roots:
            problems.setdefault(root, reconcile.check_root(root))
        errors = [self._root_error(root, problem) for root, problem in problems.items()
                  if problem]
        if errors:
            raise JobErrors(errors)

    def _open_roots(self, stack: ExitStack, roots: list[Path]) -> bool:
        """Lock each root, open its ledger (setting a damaged one aside), install its temp
        registry and sweep the temps a dead run of ours left; False when a root is locked."""
        from render.ledger import LockedError, RunLock

        for root in roots:
            try:
                root.mkdir(parents=True, exist_ok=True)
                stack.enter_context(RunLock(root))
            except LockedError as exc:
                print(f"render: {exc}", file=sys.stderr)
                return False
            except OSError as exc:
                raise self._root_error(root, f"cannot use the output folder {root}: "
                                       f"{exc.strerror or exc}") from None
        for root in roots:
            try:
                ledger, damage, moved = reconcile.open_ledger(root)
            except (OSError, sqlite3.Error) as exc:
                raise self._root_error(root, f"cannot open the ledger {root / 'render.db'}: "
                                       f"{exc}") from None
            self.ledgers[root] = stack.enter_context(closing(ledger))
            stack.enter_context(output.temp_registry(root, ledger))
            output.remove_stale_temps(root, ledger)
            if damage is not None and moved is not None:
                self._damaged[root] = (damage, moved)
        return True

    def _todo(self, tasks: list[Task]) -> list[Task]:
        """Tasks to render: not done on disk (all with --force), each id once.

        Names come from every task of the run, done or not, so a resumed run names each
        task exactly as the first run did. The ledger is checked against the disk first
        (``render.reconcile``). A task whose pixels another job of this run renders too
        (same id) is not rendered twice: it becomes a twin of that task and gets its own
        file from the same images.
        """
        paths = output.unique_paths(
            [(t, self.jobs[t.job], self.roots[t.job]) for t in tasks], now=self._started)
        self._paths = {(t.job, t.index): p for t, p in zip(tasks, paths, strict=True)}
        done = {root: self._reconcile(root, ledger, tasks)
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

    def _reconcile(self, root: Path, ledger: Any, tasks: list[Task]) -> set[tuple[str, str]]:
        """The done keys of ``root``, the disk believed over the ledger, each finding told in
        one line; a damaged ledger that was set aside is rebuilt from the images."""
        planned = [(t, self._paths[(t.job, t.index)]) for t in tasks if self.roots[t.job] == root]
        found = reconcile.reconcile(ledger, planned)
        if root in self._damaged:
            damage, moved = self._damaged[root]
            recovered = len(found.adopted) + reconcile.rebuild(ledger, root)
            self._say(f"warning: the ledger {damage.path} was damaged ({damage.reason}); kept "
                      f"it as {moved.name} and rebuilt the ledger from the images in {root}: "
                      f"{recovered} image{'s' if recovered != 1 else ''} recovered")
        elif found.adopted:
            n = len(found.adopted)
            self._say(f"{root}: {n} image{'s' if n != 1 else ''} on disk had no ledger row (a "
                      "run stopped between writing and recording): kept, not rendered again")
        gone = len(found.missing) + len(found.changed)
        if gone:
            self._say(f"{root}: {len(found.missing)} finished file{'s' if gone != 1 else ''} "
                      f"missing and {len(found.changed)} changed on disk since render wrote "
                      "them: rendering those tasks again")
        return found.done

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def _render_all(self, todo: list[Task]) -> None:
        from render.progress import Progress

        twins = sum(len(t) for t in self._twins.values())
        self.progress = Progress(len(todo) + twins, quiet=self.args.quiet)
        if self.counts.skipped:
            self.progress.skip(self.counts.skipped)
        if not todo:
            self.progress.close()
            return
        firsts, self._shared = share_first_passes(todo, self.plugins.post_keys())
        batches = make_batches(firsts, self.hook, self.args.batch_size,
                               lambda task, exc: self._fail_rendering(task, failure_message(exc)))
        pending: list[Future[Any]] = []
        threads = self.executor.writers
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="writer") as writer:
            # No "started" line here: the writer announces a job with its first written
            # image, so every count a line shows is what is on disk at that moment.
            for outcomes in self.executor.render(batches, self._shared, self.stop):
                for outcome in outcomes:
                    if isinstance(outcome, Failure):
                        self._fail_rendering(outcome.task, outcome.message,
                                             shared=outcome.shared)
                        continue
                    pending.append(writer.submit(self._write, outcome))
                    for twin in self._twins.get(outcome.task.id, ()):
                        pending.append(writer.submit(self._write, dataclasses.replace(
                            outcome, task=twin, provenance={},
                            timings=dict(outcome.timings))))
                # Bound memory: at most about two batches of images per writer wait.
                while len(pending) > 2 * threads * max(1, len(outcomes)):
                    pending.pop(0).result()
            for future in pending:
                future.result()
        self.progress.close()

    def _fail_rendering(self, task: Task, message: str, *, shared: bool = True) -> None:
        """A task that could not be rendered fails with the twins waiting for its images,
        and (``shared``: its first pass failed) with the tasks sharing its first pass."""
        waiting = [task, *(self._shared.get(task.id, ()) if shared else ())]
        for each in waiting:
            for failed in (each, *self._twins.get(each.id, ())):
                self._fail(failed, message)

    def _fail(self, task: Task, message: str) -> None:
        try:
            self.ledgers[self.roots[task.job]].record_failed(task, message)
        except Exception as error:
            if not reconcile.disk_full(error):
                raise
            self._stop_disk_full(self.roots[task.job], error)
            return
        with self._counts_lock:
            self.counts.failed += 1
            self.counts.failures.append((task, message))
        self.progress.advance(task, ok=False)

    def _stop_disk_full(self, root: Path | list[Path], exc: BaseException) -> None:
        """Stop cleanly: finish nothing new; what is on disk is whole, and the next run
        reconciles an image written before its ledger row could be."""
        where = ", ".join(map(str, root)) if isinstance(root, list) else root
        with self._counts_lock:
            if self.disk_full is None:
                self.disk_full = (
                    f"error: the disk holding {where} is full ({_reason(exc)}): stopped, every "
                    "finished image is kept; free some space, then run the same command again "
                    "to render the rest")
        self.stop.set()

    # -- write (writer thread) -------------------------------------------------------------
    def _write(self, result: Result) -> None:
        task = result.task
        root = self.roots[task.job]
        if self.disk_full:   # finish nothing new: the next run renders it
            return
        try:
            job = self.jobs[task.job]
            ledger = self.ledgers[root]
            path = self._path_for(task)
            self._claim(ledger, path, task)
            versions, device = self._environment(result)
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
                self._claim(ledger, extra, task)
                info = reconcile.extra_pnginfo(task, suffix)
                output.atomic_write(extra, lambda p, im=image, info=info: im.save(
                    p, format="PNG", pnginfo=info))
                written.append(extra)
            result.timings["write"] = time.monotonic() - start
            ledger.record_done(task, [str(p) for p in written], result.timings, infotext)
            with self._counts_lock:
                self.counts.rendered += 1
            self.progress.advance(task, ok=True)
        except Exception as exc:
            if reconcile.disk_full(exc):
                self._stop_disk_full(root, exc)
            else:
                self._fail(task, failure_message(exc))

    def _claim(self, ledger: Any, path: Path, task: Task) -> None:
        """Free ``path`` for ``task``'s file: a changed file of ours is moved aside (one
        warning line); a foreign one raises ``OutputRefused`` and the task fails."""
        moved = reconcile.claim_target(ledger, path, (task.id, task.job))
        if moved is not None:
            self._say(f"warning: {path} is not the file render wrote (changed or damaged "
                      f"since); kept it as {moved.name}, writing the new one in its place")

    def _path_for(self, task: Task) -> Path:
        """The task's path, its folder made, never through a link leading out of the root."""
        path = self._paths[(task.job, task.index)]
        output.check_inside(path.parent, self.roots[task.job])
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _environment(self, result: Result) -> tuple[dict[str, str], str]:
        """Versions (torch, diffusers, each plugin's source) and the device that rendered
        ``result`` (the executor's engine for it)."""
        described = self.executor.describe(result)
        versions = {"render": __version__, **described.get("versions", {}),
                    **{f"plugin:{name}": source for name, source in self.plugins.sources.items()}}
        return versions, described.get("device", "")

    # -- report ----------------------------------------------------------------------------
    def _report(self) -> RunReport:
        from render import gallery, grids

        report = RunReport(sorted(self.ledgers), self.jobs, self.ledgers, self.counts,
                           self.stop.is_set())
        for name, job in ({} if self.disk_full else self.jobs).items():   # nothing new written
            if not (job.output.grid and (job.grid_axes or job.output.grid_spec.chosen)):
                continue
            ledger = self.ledgers[self.roots[name]]
            try:
                entries = grids.grid_entries(job, self._planned.get(name, []),
                                             ledger.rows(job=name))
                report.grids[name] = grids.build_grids(
                    job, entries, output.job_dir(job, self.roots[name], now=self._started),
                    ledger=ledger, axis_name=self._axis_name, warn=self._say)
            except Exception as exc:  # a sheet must never cost the night's images
                log.warning("grid sheet for job %s failed: %s", name, exc)
        for root, ledger in ({} if self.disk_full else self.ledgers).items():
            try:
                gallery.build_gallery(root, ledger)
            except Exception as exc:
                log.warning("gallery for %s failed: %s", root, exc)
        try:
            self.hook.run_finished(run=report)
        except PluginError as exc:  # the night's images are written: a warning, not a failure
            print(f"warning: {exc}", file=sys.stderr)
        return report

    @functools.cache  # noqa: B019 - one Runner per invocation; plugins never change
    def _axis_name(self, key: str) -> str:
        """A plugin's name for its axis, else the core's (a failing plugin: the key)."""
        from render.grids import default_axis_name

        try:
            named = self.hook.axis_label(key=key)
        except PluginError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            named = None
        return named if isinstance(named, str) and named else default_axis_name(key)

    def _summary(self) -> str:
        from render.progress import summary

        text = summary(self.counts, interrupted=self.stop.is_set() and not self.disk_full)
        return "\n".join([text, *self.executor.worker_lines()])


def share_first_passes(tasks: list[Task], post_keys: frozenset[str],
                       ) -> tuple[list[Task], dict[str, list[Task]]]:
    """Tasks that differ only in post sections (upscale, hires fix ...) render their first
    pass once: ``(tasks to render, {rendered id: the tasks that reuse its first pass})``."""
    if not post_keys:
        return tasks, {}
    firsts: dict[str, Task] = {}
    shared: dict[str, list[Task]] = {}
    for task in tasks:
        key = task.first_pass_id(post_keys)
        if key in firsts:
            shared.setdefault(firsts[key].id, []).append(task)
        else:
            firsts[key] = task
    return list(firsts.values()), shared

