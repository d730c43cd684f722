"""Preflight and planning: resolve every file, give each task its id, group into batches.

Preflight runs over every task before the first render, so a missing model, LoRA or image
stops the run with a ``file:line`` error instead of failing at 3 a.m. after an hour of work.
Planning then drops tasks the ledger already holds and orders the rest so each model loads
once (the most expensive switch outermost, as A1111's X/Y/Z plot does).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

from render import jobfile
from render.errors import FieldError, JobError, Location, PluginError, UserError
from render.expand import JobFile, JobPlan
from render.tasks import Batch, FileRef, Task


class Preflight:
    """Resolves the files of tasks from one job file; remembers answers per name."""

    def __init__(self, jf: JobFile, *, deep: bool = False) -> None:
        from render.models import ModelResolver

        self.jf = jf
        self.models = ModelResolver(jf.model_dirs, jf.models, jf.base_dir,
                                    kinds=jf.plugins.kinds())
        self.models.deep_checks = deep
        self.errors: list[JobError] = []
        #: Tasks a plugin failed on (not user mistakes): job name -> one error per message.
        self.broken: dict[str, list[JobError]] = {}
        #: Tasks that cannot render for a user mistake (a missing file ...), per job name.
        self.blocked: Counter[str] = Counter()
        self._seen_errors: set[str] = set()
        self._cache: dict[tuple[str, str], FileRef | FieldError] = {}
        self._text_layers: dict[str, int | None] = {}
        for exc in self.models.dir_errors():   # a model_dirs entry no search can use
            where, key = _top_level_where(jf.path, "model_dirs", int(exc.subkey))
            self._record(JobError(where, key, exc.message))

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
        self._record(JobError(where, path, exc.message))

    def _record(self, error: JobError) -> None:
        if str(error) not in self._seen_errors:
            self._seen_errors.add(str(error))
            self.errors.append(error)

    def _check_clip_skip(self, task: Task, model: FileRef) -> None:
        """clip_skip must not pass the text encoder's layers (prompts.py would raise at render
        time); the count comes from configs or tensor names, without torch."""
        from render.weights import text_encoder_layers

        if task.clip_skip <= 1 or model.hub:
            return
        if model.path not in self._text_layers:
            extra = model.extra or {}
            config = extra.get("config")
            if not config and extra.get("shipped_config"):
                from render.configs import source_dir

                config = source_dir(str(extra["shipped_config"]))
            self._text_layers[model.path] = text_encoder_layers(
                model.path, Path(config) if config else None)
        layers = self._text_layers[model.path]
        if layers is not None and task.clip_skip > layers:
            xl = (" (SDXL always encodes from the penultimate layer: 1 and 2 render alike)"
                  if model.family == "sdxl" else "")
            raise FieldError(f"clip_skip {task.clip_skip} exceeds the text encoder of model"
                             f" '{task.model}', which has {layers} layers; use 1 to"
                             f" {layers}{xl}")

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
        if "model" in files:
            try:
                self._check_clip_skip(task, files["model"])
            except FieldError as exc:
                self._fail(plan, "clip_skip", exc)
                failed = True
        # The task's vae, else the model alias's (the resolver keeps it in the model's extra).
        vae = task.vae or (files["model"].extra.get("vae") if "model" in files else None)
        if vae:
            try:
                files["vae"] = self._ref("vae", vae)
            except FieldError as exc:
                self._fail(plan, "vae" if task.vae else "model", exc)
                failed = True
        # Each plugin sees the files found so far (the core's, then earlier plugins'), read
        # only, on a task made again only when a plugin added some (a copy per plugin and
        # task was most of a 100,000-task dry run); the task with every file and its id is
        # made once, at the end.
        view: Task | None = None
        for plugin_name, task_files in self.jf.plugins.ordered("task_files"):
            if view is None:
                view = task.evolve(files=MappingProxyType(dict(files)))
            try:
                extra = task_files(task=view, models=self.models)
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
                view = None
        if failed:
            self.blocked[plan.job.name] += 1
            return None
        task = task.evolve(files=files)
        return task.evolve(id=task.compute_id())

    def plugin_failed(self, plan: JobPlan, exc: PluginError, key: str = "model") -> None:
        """Record that a plugin failed on a task of ``plan`` (at ``key``): it is left out."""
        mine = self.broken.setdefault(plan.job.name, [])
        where, path = plan.locate(key)
        error = JobError(where, path, str(exc))
        if all(str(e) != str(error) for e in mine):
            mine.append(error)


def _top_level_where(path: str, key: str, index: int) -> tuple[Location, str]:
    """Where item ``index`` of the top-level list ``key`` is written (the file is parsed
    again: only an error needs this, and the file was valid a moment ago)."""
    try:
        data = jobfile.load(path)
    except JobError:
        return Location(path), key
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, list):
        return jobfile.where(value, index) or Location(path), f"{key}[{index}]"
    return jobfile.where(data, key) or Location(path), key


#: What ``--device`` takes: a torch device type render can render on, and an optional index.
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def check_device_name(device: str | None) -> None:
    """``--device`` must name a device (a typo such as ``cudax`` failed after an hour of
    preflight and loading); no torch needed for this."""
    if device is not None and not _DEVICE.match(device):
        raise UserError(f"--device {device!r} names no device; use cpu, cuda, cuda:N (N from"
                        " 0), mps or xpu, or leave it out to use the best one available")


def check_device_available(device: str | None) -> None:
    """The ``--device`` asked for must exist on this machine: checked once preflight has
    passed, before a ledger, gallery or model is touched (imports torch)."""
    if device is None:
        return
    import torch

    kind, _, index = device.partition(":")
    number = int(index) if index else 0
    if kind == "cpu":
        return
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        count = 1 if mps is not None and mps.is_available() else 0
        name = "Apple MPS device"
    else:
        backend = getattr(torch, kind, None)
        available = backend is not None and backend.is_available()
        count = backend.device_count() if available else 0
        name = f"{kind.upper()} device"
    if count == 0:
        raise UserError(f"--device {device}: this machine has no {name} (torch"
                        f" {torch.__version__}); use --device cpu or leave --device out")
    if number >= count:
        have = ", ".join(f"{kind}:{i}" for i in range(count))
        raise UserError(f"--device {device}: this machine has {count} {name}"
                        f"{'s' if count != 1 else ''} ({have})")


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
