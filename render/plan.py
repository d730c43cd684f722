"""Preflight and planning: resolve every file, give each task its id, group into batches.

Preflight runs over every task before the first render, so a missing model, LoRA or image
stops the run with a ``file:line`` error instead of failing at 3 a.m. after an hour of work.
Planning then drops tasks the ledger already holds and orders the rest so each model loads
once (the most expensive switch outermost, as A1111's X/Y/Z plot does).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from render.errors import FieldError, JobError, PluginError
from render.expand import JobFile, JobPlan
from render.tasks import Batch, FileRef, Task


class Preflight:
    """Resolves the files of tasks from one job file; remembers answers per name."""

    def __init__(self, jf: JobFile) -> None:
        from render.models import ModelResolver

        self.jf = jf
        self.models = ModelResolver(jf.model_dirs, jf.models, jf.base_dir,
                                    kinds=jf.plugins.kinds())
        self.errors: list[JobError] = []
        #: Tasks a plugin failed on (not user mistakes): job name -> one error per message.
        self.broken: dict[str, list[JobError]] = {}
        #: Tasks that cannot render for a user mistake (a missing file ...), per job name.
        self.blocked: Counter[str] = Counter()
        self._seen_errors: set[str] = set()
        self._cache: dict[tuple[str, str], FileRef | FieldError] = {}

    def _ref(self, kind: str, name: str) -> FileRef:
        key = (kind, name)
        if key not in self._cache:
            try:
                if kind == "checkpoint":
                    self._cache[key] = self.models.resolve_model(name)
                elif kind == "vae":
                    self._cache[key] = self.models.resolve_vae(name)
                else:
                    self._cache[key] = self.models.file_ref(kind, name, name)
            except FieldError as exc:
                self._cache[key] = exc
        found = self._cache[key]
        if isinstance(found, FieldError):
            raise found
        return found

    def _fail(self, plan: JobPlan, key: str, exc: FieldError) -> None:
        where, path = plan.locate(key + (f".{exc.subkey}" if exc.subkey else ""))
        error = JobError(where, path, exc.message)
        if str(error) not in self._seen_errors:
            self._seen_errors.add(str(error))
            self.errors.append(error)

    def resolve(self, task: Task, plan: JobPlan) -> Task | None:
        """The task with ``files`` and ``id`` filled in, or None after recording its errors.

        Every check runs even after one failed (a missing model does not hide a missing
        LoRA), so one dry run reports everything a job file lacks."""
        files: dict[str, FileRef] = {}
        failed = False
        checks: list[tuple[str, str, str | None]] = [
            ("model", "checkpoint", task.model), ("image", "image", task.image),
            ("mask", "image", task.mask)]
        for label, kind, name in checks:
            if not name:
                continue
            try:
                files[label] = self._ref(kind, name)
            except FieldError as exc:
                self._fail(plan, label, exc)
                failed = True
        # The task's vae, else the model alias's (the resolver keeps it in the model's extra).
        vae = task.vae or (files["model"].extra.get("vae") if "model" in files else None)
        if vae:
            try:
                files["vae"] = self._ref("vae", vae)
            except FieldError as exc:
                self._fail(plan, "vae" if task.vae else "model", exc)
                failed = True
        # Each plugin sees the files found so far (the core's, then earlier plugins') on a
        # task of its own; the task with every file and its id is made once, at the end.
        for plugin_name, task_files in self.jf.plugins.ordered("task_files"):
            try:
                extra = task_files(task=dataclasses.replace(task, files=dict(files)),
                                   models=self.models)
            except FieldError as exc:
                for error in getattr(exc, "errors", [exc]):   # FieldErrors: several at once
                    self._fail(plan, error.key or plugin_key(task, plugin_name), error)
                failed = True
                continue
            except PluginError as exc:
                self.plugin_failed(plan, exc, plugin_key(task, plugin_name))
                return None
            if extra:
                files.update(extra)
        if failed:
            self.blocked[plan.job.name] += 1
            return None
        task = dataclasses.replace(task, files=files)
        return dataclasses.replace(task, id=task.compute_id())

    def plugin_failed(self, plan: JobPlan, exc: PluginError, key: str = "model") -> None:
        """Record that a plugin failed on a task of ``plan`` (at ``key``): it is left out."""
        mine = self.broken.setdefault(plan.job.name, [])
        where, path = plan.locate(key)
        error = JobError(where, path, str(exc))
        if all(str(e) != str(error) for e in mine):
            mine.append(error)


def plugin_key(task: Task, plugin_name: str | None) -> str:
    """The section a plugin owns, to locate its preflight errors (plugin name == key).

    A plugin whose error concerns another key says so with ``FieldError(key=...)``; the
    fallback is the model, the one key every task has.
    """
    if plugin_name and plugin_name in task.sections:
        return plugin_name
    return "model"


def group_key(task: Task, plugin_keys: tuple[Any, ...]) -> tuple[Any, ...]:
    """Tasks with equal keys can share one pipeline call."""
    model = task.files.get("model")
    vae = task.files.get("vae")
    return (
        model.path if model else task.model,
        task.kind, task.width, task.height, task.steps, task.cfg, task.sampler,
        task.schedule, task.clip_skip, vae.path if vae else None, task.strength,
        plugin_keys,
    )


def _plugin_group_keys(task: Task, hook: Any) -> tuple[Any, ...]:
    return tuple(_freeze(v) for v in hook.group_key(task=task) if v is not None)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def make_batches(tasks: Iterable[Task], hook: Any, batch_size: int,
                 failed: Callable[[Task, PluginError], None] | None = None) -> list[Batch]:
    """Group tasks, order groups model-outermost, split each group into batches.

    Within a model, groups keep the order of their first task so a run renders in roughly
    the order the job file reads. ``batch_size`` < 1 means one batch per group (the caller
    splits further when the engine picks a size from free memory). A task whose plugin
    ``group_key`` raises goes to ``failed`` and into no batch.
    """
    groups: dict[tuple[Any, ...], list[Task]] = {}
    first_seen: dict[Any, int] = {}
    for position, task in enumerate(tasks):
        try:
            key = group_key(task, _plugin_group_keys(task, hook))
        except PluginError as exc:
            if failed is None:
                raise
            failed(task, exc)
            continue
        groups.setdefault(key, []).append(task)
        first_seen.setdefault(key[0], position)
    ordered = sorted(groups.items(), key=lambda item: first_seen[item[0][0]])
    batches = []
    for key, members in ordered:
        size = batch_size if batch_size > 0 else len(members)
        for start in range(0, len(members), size):
            batches.append(Batch(key, tuple(members[start:start + size])))
    return batches


def split(batches: Iterable[Batch], size_for: Any) -> Iterator[Batch]:
    """Split batches further with a per-batch size (``size_for(first_task) -> int``)."""
    for batch in batches:
        size = max(1, size_for(batch.first))
        for start in range(0, len(batch.tasks), size):
            yield Batch(batch.key, batch.tasks[start:start + size])
