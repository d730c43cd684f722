"""Job file -> validated job plans -> a flat, streamed list of tasks.

Like dvc's ``matrix``: a declarative file expands into a flat task list, and every error
names ``file:line:col`` and the key path. Expansion order (the job format in README.md):
prompt expansions x product(grid axes) x zip rows x seeds; ``index`` counts from 0 within a job.
The task count of a job is known before a single task is built, so an accidental
10^9-task grid is refused instantly. Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import random
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render import jobfile, wildcards
from render import prompts as prompt_syntax
from render.errors import FieldError, JobError, JobErrors, Location, PluginError
from render.fields import (
    AXIS_ONLY_KEYS,
    CORE_FIELDS,
    EXPANSION_KEYS,
    JOB_ONLY_KEYS,
    MAX_PROMPT_CHARS,
    FieldContext,
    describe,
    expect_bool,
    expect_int,
    expect_str,
)
from render.jobfile import MarkedList, MarkedMap
from render.models import ALIAS_KEYS as MODEL_MAPPING_KEYS
from render.plugins import FieldSpec, Plugins
from render.tasks import DEFAULT_STRENGTH, GridSpec, Job, OutputSpec, Task

TOP_LEVEL_KEYS = ("version", "model_dirs", "wildcard_dirs", "models", "output", "defaults",
                  "jobs")
OUTPUT_KEYS = ("dir", "name", "format", "grid")
#: The core's formats (a plugin adds more: ``register_output_formats``, ``Plugins.formats``).
OUTPUT_FORMATS = ("png", "webp", "jpg")
JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MAX_SEED = 2**64 - 1
#: Expansions of a prompt template whose syntax is checked at load (each task's at build).
PROMPT_CHECKS = 256

#: Task defaults when neither ``defaults:`` nor the job sets a key (A1111's defaults).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative": "", "size": "512x512", "steps": 20, "cfg": 7,
    "sampler": "Euler a", "clip_skip": 1, "vae": None, "image": None, "strength": None,
    "mask": None,
}


# -- what loading produces ----------------------------------------------------------------------

@dataclass
class Axis:
    """One grid or zip axis: a key (maybe dotted) and its raw values with their locations."""

    key: str
    values: list[Any]
    where: list[Location]

    @property
    def top(self) -> str:
        return self.key.split(".", 1)[0]


@dataclass
class JobPlan:
    """One validated job: enough to count and stream its tasks without re-validation."""

    job: Job
    raw: dict[str, Any]                      # merged defaults + job, raw YAML values
    locations: dict[str, Location]           # top-level key -> where it was written
    key_paths: dict[str, str]                # top-level key -> "jobs[1].cfg" / "defaults.cfg"
    grid: list[Axis]
    zip: list[Axis]
    seeds: Sequence[int]                     # a range for "N" and "a-b": never materialised
    mode: str                                # "random" | "combinatorial"
    draws: int                               # random mode: prompt draws
    prompt_count: int
    file: JobFile = field(repr=False)

    @property
    def seed_count(self) -> int:
        """How many seeds, counted (``len`` of a range past 2**63 overflows)."""
        return _length(self.seeds)

    @property
    def task_count(self) -> int:
        zip_rows = len(self.zip[0].values) if self.zip else 1
        return (self.prompt_count * math.prod(len(a.values) for a in self.grid) * zip_rows
                * self.seed_count)

    def locate(self, key_path: str) -> tuple[Location | None, str]:
        """Where a (dotted) key of this job was written, and how to name it in an error."""
        top, _, rest = key_path.partition(".")
        where, subpath = _sub_location(self.raw.get(top), rest,
                                       self.locations.get(top, self.job.where))
        return where, self.key_paths.get(top, f"jobs[{self.job.name}].{top}") + subpath


_SCALARS = (str, int, float, bool)


@dataclass
class JobFile:
    """A loaded, fully validated job file."""

    path: str
    base_dir: Path
    model_dirs: list[Path]
    wildcard_dirs: list[Path]
    models: dict[str, Any]
    jobs: list[JobPlan]
    plugins: Plugins
    library: wildcards.Library
    fields: dict[tuple[str, str], FieldSpec]
    #: Jobs a failed plugin keeps from rendering: name -> why (the rest of the file renders).
    broken: dict[str, list[JobError]] = field(default_factory=dict)
    _cache: dict[tuple[str, Any], Any] = field(default_factory=dict, repr=False)

    @property
    def task_count(self) -> int:
        return sum(plan.task_count for plan in self.jobs)

    def normalise(self, key: str, raw: Any) -> Any:
        """Validate one top-level task key (cached: a grid revisits the same values)."""
        # A plain scalar (most grid values) is its own key; anything else its JSON.
        token: Any = ((type(raw).__name__, raw) if raw is None or type(raw) in _SCALARS
                      else json.dumps(jobfile.plain(raw), sort_keys=True, default=str))
        cached = self._cache.get((key, token))
        if cached is None:
            ctx = FieldContext(self.path, self.base_dir)
            validator = CORE_FIELDS.get(key) or self.fields[("task", key)].validator
            cached = (validator(raw, ctx),)
            self._cache[(key, token)] = cached
        return cached[0]


def _length(seeds: Sequence[int]) -> int:
    if isinstance(seeds, range):
        return max(0, (seeds.stop - seeds.start + seeds.step - 1) // seeds.step)
    return len(seeds)


def _format_subkey(rest: str) -> str:
    if not rest:
        return ""
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in rest.split("."))


# -- loading and validation ---------------------------------------------------------------------

class _Collector:
    """Gathers every error of a file so one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[JobError] = []
        self._seen: set[str] = set()
        #: The job being read cannot render because a plugin failed (not a user mistake).
        self.broken: list[JobError] = []

    def add(self, where: Location | None, key: str, message: str, *,
            plugin: bool = False) -> None:
        error = JobError(where, key, message)
        if plugin:
            self.broken.append(error)
            return
        if str(error) not in self._seen:   # a bad default is reported once, not per job
            self._seen.add(str(error))
            self.errors.append(error)

    def sorted(self) -> list[JobError]:
        return sorted(self.errors, key=lambda e: (e.where.line, e.where.col) if e.where
                      else (0, 0))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_job_file(path: str | Path, plugins: Plugins) -> JobFile:
    """Load and validate a whole job file; raise ``JobErrors`` listing every problem."""
    name = str(path)
    data = jobfile.load(name)
    errors = _Collector()
    base_dir = Path(name).resolve().parent
    if not isinstance(data, MarkedMap):
        raise JobErrors([JobError(Location(name, 1, 1), "", "expected a mapping at the top "
                                  "level (version, defaults, jobs, ...)")])
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            errors.add(jobfile.where(data, key, of_key=True), str(key),
                       f"unknown key{_did_you_mean(str(key), list(TOP_LEVEL_KEYS))}")
    if "version" not in data:
        errors.add(data.where, "version", "missing; add 'version: 1' at the top")
    elif data["version"] != 1:
        errors.add(jobfile.where(data, "version"), "version",
                   f"unsupported version {describe(data['version'])}; this render reads "
                   "version 1")

    model_dirs = _dir_list(data, "model_dirs", base_dir, errors, default=["models"])
    wildcard_dirs = _dir_list(data, "wildcard_dirs", base_dir, errors, default=["wildcards"])
    models = _models(data, errors)
    fields = plugins.fields()
    output_defaults = _mapping(data, "output", "output", errors)
    defaults = _mapping(data, "defaults", "defaults", errors)

    library = wildcards.Library(wildcard_dirs)
    jf = JobFile(name, base_dir, model_dirs, wildcard_dirs, models, [], plugins, library, fields)

    jobs = data.get("jobs")
    if jobs is None:
        errors.add(data.where, "jobs", "missing; list at least one job under 'jobs:'")
    elif not isinstance(jobs, MarkedList) or not jobs:
        errors.add(jobfile.where(data, "jobs"), "jobs", "expected a non-empty list of jobs")
    else:
        seen: dict[str, Location] = {}
        for i, entry in enumerate(jobs):
            errors.broken = []
            plan = _job(jf, i, entry, jobfile.where(jobs, i), defaults, output_defaults,
                        seen, errors)
            if plan is not None:
                jf.jobs.append(plan)
    if errors.errors:
        raise JobErrors(errors.sorted())
    return jf


def _mapping(container: MarkedMap, key: str, path: str, errors: _Collector) -> MarkedMap:
    value = container.get(key)
    if value is None:
        empty = MarkedMap()
        empty.where, empty.marks = jobfile.where(container, key), {}
        return empty
    if not isinstance(value, MarkedMap):
        errors.add(jobfile.where(container, key), path,
                   f"expected a mapping, got {describe(value)}")
        empty = MarkedMap()
        empty.where, empty.marks = jobfile.where(container, key), {}
        return empty
    return value


def _dir_list(data: MarkedMap, key: str, base_dir: Path, errors: _Collector,
              default: list[str]) -> list[Path]:
    value = data.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.add(jobfile.where(data, key), key, f"expected a list of folders, got "
                   f"{describe(value)}")
        return []
    return [(base_dir / Path(v).expanduser()).resolve() for v in value]


def _models(data: MarkedMap, errors: _Collector) -> dict[str, Any]:
    models = _mapping(data, "models", "models", errors)
    result: dict[str, Any] = {}
    for alias, value in models.items():
        key = f"models.{alias}"
        where = jobfile.where(models, alias)
        if isinstance(value, str) and value.strip():
            result[str(alias)] = value
        elif isinstance(value, MarkedMap):
            for sub in value:
                if sub not in MODEL_MAPPING_KEYS:
                    errors.add(jobfile.where(value, sub, of_key=True), f"{key}.{sub}", "unknown key"
                               + _did_you_mean(str(sub), list(MODEL_MAPPING_KEYS)))
            if not isinstance(value.get("source"), str):
                errors.add(where, f"{key}.source", "missing; give the hub id, path or file name")
            if "allow_pickle" in value and not isinstance(value["allow_pickle"], bool):
                errors.add(jobfile.where(value, "allow_pickle"), f"{key}.allow_pickle",
                           f"expected true or false, got {describe(value['allow_pickle'])}")
            result[str(alias)] = jobfile.plain(value)
        else:
            errors.add(where, key, f"expected a hub id, a path or a mapping, got "
                       f"{describe(value)}")
    return result


def _job(jf: JobFile, i: int, entry: Any, entry_where: Location | None, defaults: MarkedMap,
         output_defaults: MarkedMap, seen: dict[str, Location],
         errors: _Collector) -> JobPlan | None:
    prefix = f"jobs[{i}]"
    if not isinstance(entry, MarkedMap):
        errors.add(entry_where, prefix, f"expected a mapping (name, prompt, ...), got "
                   f"{describe(entry)}")
        return None
    before = len(errors.errors)
    name = entry.get("name")
    if name is None:
        errors.add(entry.where, f"{prefix}.name", "missing; every job needs a unique name")
        name = f"job{i}"
    elif not isinstance(name, str) or not JOB_NAME.match(name):
        errors.add(jobfile.where(entry, "name"), f"{prefix}.name",
                   f"expected letters, digits, '_', '.' or '-', got {describe(name)}")
        name = f"job{i}"
    elif name in seen:
        errors.add(jobfile.where(entry, "name"), f"{prefix}.name",
                   f"duplicate job name {name!r} (first used at line {seen[name].line})")
    elif reserved := _reserved_name(name):
        errors.add(jobfile.where(entry, "name"), f"{prefix}.name", reserved)
    else:
        seen[name] = jobfile.where(entry, "name") or Location(jf.path)

    raw: dict[str, Any] = dict(BUILTIN_DEFAULTS)
    locations: dict[str, Location] = {}
    key_locations: dict[str, Location] = {}
    key_paths: dict[str, str] = {}
    for source, source_prefix in ((defaults, "defaults"), (entry, prefix)):
        for key, value in source.items():
            if key in JOB_ONLY_KEYS:
                if source is defaults:
                    errors.add(jobfile.where(source, key), f"defaults.{key}",
                               "only allowed on a job entry")
                continue
            raw[key] = value
            locations[key] = jobfile.where(source, key) or entry.where
            key_locations[key] = jobfile.where(source, key, of_key=True) or entry.where
            key_paths[key] = f"{source_prefix}.{key}"
    # ``plan.locate("name")``: where another file's job of the same name is reported
    locations["name"] = jobfile.where(entry, "name") or entry.where
    key_paths["name"] = f"{prefix}.name"
    known = sorted(set(CORE_FIELDS) | set(EXPANSION_KEYS) | set(JOB_ONLY_KEYS)
                   | {k for (w, k) in jf.fields if w == "task"})

    def err(key: str, message: str, where: Location | None = None, path: str | None = None) -> None:
        errors.add(where or locations.get(key, entry.where), path or key_paths.get(key, key),
                   message)

    def check(key: str, value: Any, where: Location | None = None,
              path: str | None = None) -> bool:
        """Validate a top-level key's raw value; record a located error on failure."""
        try:
            jf.normalise(key, value)
            return True
        except FieldError as exc:
            sub_where, sub_path = _sub_location(value, exc.subkey, where or locations.get(key))
            err(key, exc.message, sub_where, (path or key_paths.get(key, key)) + sub_path)
            return False
        except PluginError as exc:
            errors.add(where or locations.get(key, entry.where),
                       path or key_paths.get(key, key), str(exc), plugin=True)
            return False

    for key in list(raw):
        if key in EXPANSION_KEYS or key in CORE_FIELDS:
            if key in CORE_FIELDS and key in locations:
                check(key, raw[key])
            continue
        if ("task", key) in jf.fields:
            check(key, raw[key])
            continue
        failure = jf.plugins.failure_for(key)
        if failure:
            errors.add(key_locations.get(key, entry.where), key_paths.get(key, key),
                       f"needs plugin {failure.name!r} ({failure.source}), which failed to "
                       f"load: {failure.error}", plugin=True)
        else:
            err(key, "unknown key" + _did_you_mean(key, known), key_locations.get(key))
        raw.pop(key)

    if not raw.get("model") and "model" not in {str(k).split(".")[0] for k in
                                                  (raw.get("grid") or {})}:
        err("model", "missing; set 'model' in defaults or on the job", entry.where,
            f"{prefix}.model")
    output = _output(jf, entry, output_defaults, prefix, errors, raw)
    grid = _axes(jf, raw, entry, "grid", prefix, errors, check)
    zip_axes = _axes(jf, raw, entry, "zip", prefix, errors, check)
    if zip_axes and len({len(a.values) for a in zip_axes}) > 1:
        lengths = ", ".join(f"{a.key}: {len(a.values)}" for a in zip_axes)
        err("zip", f"zip axes must have the same length, got {lengths}")
    for axis in grid:
        if axis.key in {a.key for a in zip_axes}:
            err("zip", f"{axis.key!r} is both a grid and a zip axis")
    axis_tops = {a.top for a in grid + zip_axes}
    output = _animation_format(jf, raw, axis_tops, output, entry, output_defaults, err)
    _check_sampler_pairs(jf, raw, grid + zip_axes, err)
    seeds = _seeds(raw, locations, key_paths, errors, entry)
    if "seed" in axis_tops and _length(seeds) > 1:
        err("seeds", "a job with a 'seed' axis takes its seeds from the axis; remove 'seeds'")
    if "seed" in axis_tops:
        seeds = seeds[:1]

    mode = raw.get("wildcards", "random")
    if mode not in ("random", "combinatorial"):
        err("wildcards", f"expected 'random' or 'combinatorial', got {describe(mode)}")
        mode = "random"
    draws = 1
    if "count" in raw:
        try:
            draws = expect_int(raw["count"], minimum=1)
        except FieldError as exc:
            err("count", exc.message)
    prompt_count = 1
    if "prompt" not in axis_tops:
        prompt_count = _prompt_count(jf, raw, mode, draws, err)
    for axis in grid + zip_axes:
        if axis.top in ("prompt", "negative"):
            for value, where in zip(axis.values, axis.where, strict=True):
                _check_template(jf, value, lambda m, w=where, k=axis.key: err(k, m, w,
                                f"{prefix}.grid.{k}"))
    if "negative" in raw:
        _check_template(jf, raw["negative"], lambda m: err("negative", m))
    for axis, section in [(a, "grid") for a in grid] + [(a, "zip") for a in zip_axes]:
        if axis.key == "prompt_sr":
            template = str(raw.get("prompt", ""))
            first = str(axis.values[0]) if axis.values else ""
            if not first:
                err(section, "prompt_sr: the first value is the text to search for in the "
                    "prompt and may not be empty", axis.where[0] if axis.where else None,
                    f"{prefix}.{section}.prompt_sr")
            elif first not in template:
                err(section, f"prompt_sr: the first value {first!r} must appear in the prompt",
                    axis.where[0] if axis.where else None, f"{prefix}.{section}.prompt_sr")
    _check_image_keys(jf, raw, grid, zip_axes, prefix, err)

    if errors.broken:
        jf.broken[str(name)] = errors.broken
    if len(errors.errors) > before or errors.broken:
        return None
    job = Job(name=str(name), file=jf.path, base_dir=jf.base_dir, where=entry.where,
              output=output, grid_axes=tuple(a.key for a in grid),
              zip_axes=tuple(a.key for a in zip_axes))
    plan = JobPlan(job, raw, locations, key_paths, grid, zip_axes, seeds, mode, draws,
                   prompt_count, jf)
    plan.job = dataclasses.replace(job, task_count=plan.task_count)
    return plan


def _chars(n: int) -> str:
    return f"{n:,} characters" if n < wildcards.COUNT_LIMIT else "over 2**64 characters"


def _image_problem(image: Any, mask: Any, strength: Any, steps: Any) -> tuple[str, str] | None:
    """(key, message) when a task's image settings cannot render, or None.

    diffusers' img2img and inpainting run ``int(steps * strength)`` of the ``steps``
    (``get_timesteps``) and refuse to run none.
    """
    if mask is not None and image is None:
        return "mask", "a mask needs an image to inpaint: set 'image:' as well"
    if image is None or not isinstance(steps, int):
        return None
    used = DEFAULT_STRENGTH if strength is None else strength
    if not isinstance(used, (int, float)) or int(steps * used) >= 1:
        return None
    fix = f"raise strength to at least {math.ceil(100 / steps) / 100:g}"
    if used > 0 and math.ceil(1 / used) <= 1000:
        fix += f" or steps to at least {math.ceil(1 / used)}"
    default = " (the default)" if strength is None else ""
    return "strength", (f"strength {used:g}{default} with steps {steps} runs no denoising "
                        f"step (img2img runs int(steps x strength) = 0 of them); {fix}")


def _check_image_keys(jf: JobFile, raw: dict[str, Any], grid: list[Axis], zip_axes: list[Axis],
                      prefix: str, err: Any) -> None:
    """``mask`` without ``image``, and a strength too low for its steps, at validation.

    Every (image, mask, strength, steps) the job can combine is tried: a grid axis pairs
    with every value of the others, zip axes row by row. Values that failed validation are
    skipped (already reported). The error names the axis value that varies, if one does.
    """
    keys = ("image", "mask", "strength", "steps")
    Choice = dict[str, tuple[Any, Location | None, str]]   # key -> (value, where, key path)
    options: list[list[Choice]] = []
    for axis in grid:
        if axis.key in keys:
            options.append([{axis.key: (v, w, f"{prefix}.grid.{axis.key}")}
                            for v, w in zip(axis.values, axis.where, strict=True)])
    zipped = [a for a in zip_axes if a.key in keys]
    if zipped:
        options.append([{a.key: (a.values[n], a.where[n], f"{prefix}.zip.{a.key}")
                         for a in zipped} for n in range(min(len(a.values) for a in zipped))])
    if math.prod(len(o) for o in options) > 10_000:
        return   # too many to pair up here: each task is checked as it is built
    for combo in itertools.product(*options):
        chosen: Choice = {}
        for choice in combo:
            chosen.update(choice)
        values = {k: chosen[k][0] if k in chosen else raw.get(k) for k in keys}
        try:
            image, mask, strength, steps = (
                None if values[k] is None else jf.normalise(k, values[k]) for k in keys)
        except FieldError:
            continue
        problem = _image_problem(image, mask, strength, steps)
        if problem:
            key = problem[0]   # blame the value that varies, else the one written down
            if key == "strength" and "strength" not in chosen and (
                    "steps" in chosen or raw.get("strength") is None):
                key = "steps"
            where, path = chosen[key][1:] if key in chosen else (None, None)
            err(key, problem[1], where, path)
            return


def _check_sampler_pairs(jf: JobFile, raw: dict[str, Any], axes: list[Axis], err: Any) -> None:
    """Every sampler the job can use must support every schedule it can be paired with."""
    from render import samplers

    def values(key: str) -> list[tuple[Any, Location | None, str | None]]:
        axis = next((a for a in axes if a.key == key), None)
        if axis is not None:
            return [(v, w, f"{key}") for v, w in zip(axis.values, axis.where, strict=True)]
        return [(raw[key], None, None)] if raw.get(key) is not None else []

    schedules = values("schedule") or [(None, None, None)]
    for sampler_raw, where, _ in values("sampler"):
        try:
            name, embedded = jf.normalise("sampler", sampler_raw)
        except FieldError:
            continue   # already reported
        for schedule_raw, schedule_where, _ in schedules:
            try:
                schedule = jf.normalise("schedule", schedule_raw) if schedule_raw else None
            except FieldError:
                continue   # an unknown schedule is reported at the schedule key itself
            try:
                samplers.resolve_sampler(name if embedded is None else f"{name} {embedded}",
                                         schedule)
            except (FieldError, ValueError) as exc:
                err("sampler", getattr(exc, "message", str(exc)), where or schedule_where)
                return


def _sub_location(value: Any, subkey: str, where: Location | None) -> tuple[Location | None, str]:
    """Follow a validator's ``subkey`` ("0.scale") into the marked YAML for a precise line."""
    if not subkey:
        return where, ""
    container = value
    for part in subkey.split("."):
        index: Any = int(part) if part.isdigit() else part
        if isinstance(container, (MarkedMap, MarkedList)):
            try:
                where = jobfile.where(container, index) or where
                container = container[index]
                continue
            except (KeyError, IndexError, TypeError):
                pass
        break
    return where, _format_subkey(subkey)


def _animation_format(jf: JobFile, raw: Mapping[str, Any], axis_tops: set[str],
                      output: OutputSpec, entry: MarkedMap, defaults: MarkedMap,
                      err: Callable[..., None]) -> OutputSpec:
    """A job whose tasks animate (a key registered ``animates=True``, e.g. ``animatediff``)
    writes ``gif`` unless ``output.format`` says otherwise; a format that holds one image
    (png, jpg) would keep the first frame only: an error at the key that animates."""
    animating = sorted(k for (w, k), spec in jf.fields.items()
                       if w == "task" and spec.animates
                       and (raw.get(k) is not None or k in axis_tops))
    if not animating:
        return output
    job_output = entry.get("output")
    given = "format" in defaults or (isinstance(job_output, Mapping) and "format" in job_output)
    formats = jf.plugins.formats()
    if not given and "gif" in formats:
        return dataclasses.replace(output, format="gif")
    spec = formats.get(output.format)
    if spec is not None and not spec.animated:
        animated = ", ".join(n for n, f in sorted(formats.items()) if f.animated)
        err(animating[0], f"renders an animation, and output.format {output.format} holds "
                          f"one image (the first frame only): set output.format to one of "
                          f"{animated}")
    return output


def _output(jf: JobFile, entry: MarkedMap, defaults: MarkedMap, prefix: str,
            errors: _Collector, raw: dict[str, Any]) -> OutputSpec:
    from render import output as output_module

    merged: dict[str, Any] = {}
    where: dict[str, tuple[Location | None, str]] = {}
    job_output = _mapping(entry, "output", f"{prefix}.output", errors)
    for source, path in ((defaults, "output"), (job_output, f"{prefix}.output")):
        for key, value in source.items():
            merged[key] = value
            where[key] = (jobfile.where(source, key), f"{path}.{key}")
    spec = OutputSpec()
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    plugin_keys = {k for (w, k) in jf.fields if w == "output"}
    ctx = FieldContext(jf.path, jf.base_dir)
    for key, value in merged.items():
        loc, path = where[key]
        try:
            if key in ("dir", "name"):
                values[key] = expect_str(value, what="a name template", allow_empty=False)
            elif key == "format":
                fmt = expect_str(value, what="an output format").lower()
                fmt = "jpg" if fmt == "jpeg" else fmt
                known = sorted(jf.plugins.formats()) or list(OUTPUT_FORMATS)
                if fmt not in known:
                    raise FieldError(f"expected one of {', '.join(known)}, got "
                                     f"{describe(value)}" + _did_you_mean(fmt, known))
                values[key] = fmt
            elif key == "grid":
                if isinstance(value, dict):
                    values["grid"] = True
                    values["grid_spec"] = _grid_spec(jf, value, raw, path, errors)
                else:
                    values[key] = expect_bool(value)
            elif key in plugin_keys:
                options[key] = jf.fields[("output", key)].validator(value, ctx)
            else:
                raise FieldError("unknown key" + _did_you_mean(
                    str(key), list(OUTPUT_KEYS) + sorted(plugin_keys)))
        except FieldError as exc:
            errors.add(loc, path, exc.message)
        except PluginError as exc:
            errors.add(loc, path, str(exc), plugin=True)
    spec = dataclasses.replace(spec, **values, options=options)
    try:
        output_module.check_output_spec(spec, _name_fields(raw), samples=_name_samples(raw))
    except FieldError as exc:
        loc, path = where.get(exc.subkey, (entry.where, f"{prefix}.output.{exc.subkey}"))
        errors.add(loc, path, exc.message)
    return spec


GRID_SPEC_KEYS = ("x", "y", "z", "max_pixels")


def _grid_spec(jf: JobFile, value: MarkedMap, raw: dict[str, Any], path: str,
               errors: _Collector) -> GridSpec:
    """``output.grid: {x: cfg, y: sampler, z: seed, max_pixels: N}``: each of x/y/z must
    name one of the job's dimensions (a grid or zip axis, ``seed``, ``prompt``), each once.

    The file's own ``output.grid`` serves every job, so there a name only has to be a task
    key: a job that does not vary it fills that slot from its own dimensions."""
    choices = list(dict.fromkeys([*_axis_keys(raw), "seed", "prompt"]))
    shared = path == "output.grid"
    task_keys = sorted({*CORE_FIELDS, "seed", *AXIS_ONLY_KEYS,
                        *(k for (w, k) in jf.fields if w == "task")})
    spec: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for sub, item in value.items():
        loc, sub_path = jobfile.where(value, sub), f"{path}.{sub}"
        try:
            if sub == "max_pixels":
                spec[sub] = expect_int(item, minimum=64 * 64, what="a number of pixels")
            elif sub in ("x", "y", "z"):
                name = expect_str(item, what="an axis name", allow_empty=False)
                if name in seen:
                    raise FieldError(f"{name!r} is already {seen[name]}")
                seen[name] = str(sub)
                if name in choices:
                    spec[sub] = name
                elif not shared:
                    raise FieldError(f"{name!r} is not an axis of this job (axes: "
                                     f"{', '.join(choices)})" + _did_you_mean(name, choices))
                elif name.split(".", 1)[0] not in task_keys:
                    raise FieldError(f"{name!r} is not a task key"
                                     + _did_you_mean(name, task_keys))
            else:
                raise FieldError("unknown key" + _did_you_mean(str(sub), list(GRID_SPEC_KEYS)))
        except FieldError as exc:
            errors.add(loc, sub_path, exc.message)
    return GridSpec(**spec)


def _name_fields(raw: dict[str, Any]) -> set[str]:
    """Template fields allowed in output names: the standard ones plus this job's axes
    (written on the job or in ``defaults``)."""
    from render import output as output_module

    return {*output_module.BUILTIN_FIELDS, *_axis_keys(raw)}


def _axis_keys(raw: dict[str, Any]) -> list[str]:
    """The job's grid and zip axis keys (written on the job or in ``defaults``), in order."""
    return [str(k) for section in ("grid", "zip") if isinstance(raw.get(section), dict)
            for k in raw[section]]


def _name_samples(raw: dict[str, Any]) -> dict[str, list[Any]]:
    """The values a name field of this job can take, where the job decides them: each
    axis's values, and every ``cfg`` (an int stays an int, so ``{cfg:d}`` may fit)."""
    samples: dict[str, list[Any]] = {}
    for section in ("grid", "zip"):
        axes = raw.get(section)
        if isinstance(axes, dict):
            for key, values in axes.items():
                if isinstance(values, list):
                    samples.setdefault(str(key), []).extend(values)
    cfgs = [raw.get("cfg"), *samples.get("cfg", [])]
    samples["cfg"] = [v for v in cfgs if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return samples


def _reserved_name(name: str) -> str:
    """Why ``name`` cannot be a job's name, or "": the output root's own files live beside
    the job folders (``out/{job}``), compared case-insensitively as macOS/Windows disks do."""
    from render import gallery, ledger

    own = (ledger.DB_NAME, ledger.LOCK_NAME, gallery.INDEX)
    folded = name.casefold()
    if name.startswith("."):
        return (f"job name {name!r} starts with '.': hidden names are the output folder's own "
                "(thumbnails, temp files); rename the job")
    if folded in {n.casefold() for n in own} or folded.startswith(
            (ledger.DB_NAME.casefold(), ledger.LOCK_NAME.casefold())):
        return (f"job name {name!r} is taken by the output folder's own files "
                f"({', '.join(own)}); rename the job")
    return ""


def _axes(jf: JobFile, raw: dict[str, Any], entry: MarkedMap, section: str, prefix: str,
          errors: _Collector, check: Any) -> list[Axis]:
    value = raw.get(section)
    if value is None:
        return []
    section_where = jobfile.where(entry, section)
    if not isinstance(value, MarkedMap):
        errors.add(section_where, f"{prefix}.{section}",
                   f"expected a mapping of key: [values], got {describe(value)}")
        return []
    axes = []
    task_keys = set(CORE_FIELDS) | {k for (w, k) in jf.fields if w == "task"}
    for key, values in value.items():
        key = str(key)
        path = f"{prefix}.{section}.{key}"
        where = jobfile.where(value, key, of_key=True)
        top = key.split(".", 1)[0]
        if top not in task_keys and key not in AXIS_ONLY_KEYS and key != "seed":
            failure = jf.plugins.failure_for(top)
            if failure:
                errors.add(where, path, f"needs plugin {failure.name!r}, which failed to "
                           f"load: {failure.error}", plugin=True)
            else:
                errors.add(where, path, "unknown key" + _did_you_mean(
                    top, sorted(task_keys | set(AXIS_ONLY_KEYS) | {"seed"})))
            continue
        if not isinstance(values, MarkedList) or not values:
            errors.add(where, path, f"expected a non-empty list of values, got "
                       f"{describe(values)}")
            continue
        axis = Axis(key, list(values), list(values.marks))
        ok = True
        for item, item_where in zip(values, values.marks, strict=True):
            if key == "seed":
                try:
                    expect_int(item, minimum=0, maximum=MAX_SEED, what="a seed")
                except FieldError as exc:
                    errors.add(item_where, path, exc.message)
                    ok = False
            elif key == "prompt_sr":
                if not isinstance(item, str):
                    errors.add(item_where, path, f"expected text, got {describe(item)}")
                    ok = False
            elif "." in key:
                try:
                    patched = _apply_dotted(raw.get(top), key.split(".")[1:], item)
                except FieldError as exc:
                    errors.add(item_where, path, exc.message)
                    ok = False
                    continue
                ok &= check(top, patched, item_where, path)
            else:
                ok &= check(top, item, item_where, path)
        if ok:
            axes.append(axis)
    return axes


def _apply_dotted(container: Any, parts: list[str], value: Any) -> Any:
    """A copy of ``container`` with ``parts`` (e.g. ["0", "scale"]) set to ``value``."""
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if head.isdigit():
        if not isinstance(container, list) or int(head) >= len(container):
            raise FieldError(f"no item {head} to vary: the job's list has "
                             f"{len(container) if isinstance(container, list) else 0} items")
        copy = list(container)
        copy[int(head)] = _apply_dotted(copy[int(head)], rest, value)
        return copy
    if container is None:
        container = {}
    if not isinstance(container, dict):
        raise FieldError(f"cannot set {head!r}: the job's value is not a mapping")
    copy = dict(container)
    copy[head] = _apply_dotted(copy.get(head), rest, value)
    return copy


def _seeds(raw: dict[str, Any], locations: dict[str, Location], key_paths: dict[str, str],
           errors: _Collector, entry: MarkedMap) -> Sequence[int]:
    def fail(key: str, message: str) -> list[int]:
        errors.add(locations.get(key, entry.where), key_paths.get(key, key), message)
        return [0]

    base = raw.get("seed", 0)
    if base == "random":
        base = secrets.randbelow(2**32)
    elif isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= MAX_SEED:
        return fail("seed", f"expected a seed (integer >= 0) or 'random', got {describe(base)}")
    try:
        return parse_seeds(raw.get("seeds", 1), base)
    except ValueError as exc:
        return fail("seeds", str(exc))


def parse_seeds(value: Any, base: int = 0) -> Sequence[int]:
    """``N`` -> N seeds from ``base``; ``[1, 5]``; ``"100-107"`` (inclusive); ``"random"``.

    A count or a range stays a ``range``: it is counted, never built, before the guard.
    """
    if value == "random":
        return [secrets.randbelow(2**32)]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"expected a seed count >= 1, got {describe(value)}")
        if base + value - 1 > MAX_SEED:
            raise ValueError(f"{describe(value)} seeds from {base} overflow the largest seed "
                             f"({MAX_SEED})")
        return range(base, base + value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
        if match:
            if max(len(match.group(1)), len(match.group(2))) > len(str(MAX_SEED)):
                raise ValueError(f"seed range {describe(value)} exceeds the largest seed "
                                 f"({MAX_SEED})")
            low, high = int(match.group(1)), int(match.group(2))
            if high < low:
                raise ValueError(f"seed range {value!r} runs backwards")
            if high > MAX_SEED:
                raise ValueError(f"seed range {value!r} exceeds the largest seed ({MAX_SEED})")
            return range(low, high + 1)
    if isinstance(value, list) and value:
        seeds = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_SEED:
                raise ValueError(f"expected seeds as integers >= 0, got {describe(item)}")
            seeds.append(item)
        return seeds
    raise ValueError(f"expected a count, a list of seeds, a range like '100-107' or "
                     f"'random', got {describe(value)}")


def _check_template(jf: JobFile, template: Any, report: Any) -> int:
    """Count a prompt template's expansions; report its wildcard or prompt-syntax problem.

    Wildcards expand first, so the prompt syntax (``AND``, weights, in every branch of a
    prompt edit) is checked on the expansions, the first ``PROMPT_CHECKS`` of them here;
    :func:`_build_task` checks each task's own prompt as it is made.
    """
    if len(str(template)) > MAX_PROMPT_CHARS:
        return 0   # its validator says so
    try:
        combos = wildcards.count(str(template), jf.library)
        longest = wildcards.longest(str(template), jf.library)
        if longest > MAX_PROMPT_CHARS:
            report(f"an expansion of this template can be {_chars(longest)} long, more "
                   f"than the {MAX_PROMPT_CHARS:,} characters a prompt may have; pick fewer "
                   "or shorter values")
            return 0
        expansions = wildcards.combinations(str(template), jf.library)
        for expansion in itertools.islice(expansions, PROMPT_CHECKS):
            problem = prompt_syntax.prompt_problem(expansion.text)
            if problem:
                report(problem)
                break
    except wildcards.WildcardError as exc:   # with the wildcard file:line:col it is in
        report(str(exc))
        return 0
    return combos


def _prompt_count(jf: JobFile, raw: dict[str, Any], mode: str, draws: int, err: Any) -> int:
    template = str(raw.get("prompt") or "")
    combos = _check_template(jf, template, lambda m: err("prompt", m))
    if combos == 0:
        return 1
    if mode == "combinatorial":
        return combos
    return draws if combos > 1 else 1


# -- streaming the tasks ------------------------------------------------------------------------

def _rng(*parts: Any) -> random.Random:
    """A generator seeded from stable text, independent of Python's hash randomisation."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _prompt_expansions(plan: JobPlan) -> Iterator[wildcards.Expansion]:
    template = str(plan.raw.get("prompt") or "")
    if plan.mode == "combinatorial":
        yield from wildcards.combinations(template, plan.file.library)
        return
    for draw in range(plan.prompt_count):
        yield wildcards.sample(template, plan.file.library, _rng(plan.job.name, plan.seeds[0],
                                                                draw), draw)


def iter_tasks(plan: JobPlan) -> Iterator[Task]:
    """Stream the job's tasks in the job format's order, without building the whole list."""
    jf = plan.file
    base = {key: jf.normalise(key, value) for key, value in plan.raw.items()
            if key in CORE_FIELDS or ("task", key) in jf.fields}
    grid_values = [list(zip(a.values, range(len(a.values)), strict=True)) for a in plan.grid]
    zip_rows = list(zip(*(a.values for a in plan.zip), strict=True)) if plan.zip else [()]
    index = 0
    prompt_is_axis = any(a.top == "prompt" for a in plan.grid + plan.zip)
    expansions: Any = ([wildcards.Expansion("", ())] if prompt_is_axis
                       else _prompt_expansions(plan))
    for draw, expansion in enumerate(expansions):
        for cell in itertools.product(*grid_values):
            for row in zip_rows:
                overrides: dict[str, Any] = {}
                for axis, (value, _) in zip(plan.grid, cell, strict=True):
                    overrides[axis.key] = value
                for axis, value in zip(plan.zip, row, strict=True):
                    overrides[axis.key] = value
                # A cell's tasks differ only in seed and index unless something is drawn
                # per task: then the first is built and the rest are copies (100,000 builds
                # were a third of a large dry run).
                first: Task | None = None
                for seed in plan.seeds:
                    if first is not None:
                        yield first.evolve(seed=seed, index=index)
                    else:
                        task, seed_free = _build_task(plan, base, overrides, expansion, draw,
                                                      seed, index)
                        first = task if seed_free else None
                        yield task
                    index += 1


def _build_task(plan: JobPlan, base: dict[str, Any], overrides: dict[str, Any],
                expansion: wildcards.Expansion, draw: int, seed: int,
                index: int) -> tuple[Task, bool]:
    """The task, and whether it is the same for every seed of its cell but the seed and
    index (nothing drawn per task, no seed axis)."""
    jf = plan.file
    settings = dict(base)
    raw_sections: dict[str, Any] = {}
    for key, value in overrides.items():
        top = key.split(".", 1)[0]
        if key in ("seed", "prompt_sr"):
            continue
        if "." in key:
            current = raw_sections.get(top, plan.raw.get(top))
            raw_sections[top] = _apply_dotted(current, key.split(".")[1:], value)
        else:
            raw_sections[top] = value
    for top, value in raw_sections.items():
        settings[top] = jf.normalise(top, value)
    seed = overrides.get("seed", seed)

    negative = str(settings.get("negative") or "")
    negative_has_choices = "{" in negative or "__" in negative
    # Draws for this task only (a prompt axis, a negative with choices), seeded stably.
    rng = (_rng(plan.job.name, seed, draw, index)
           if "prompt" in raw_sections or negative_has_choices else None)
    template = str(plan.raw.get("prompt") or "")
    prompt, picks = expansion.text, tuple(expansion.picks)
    if "prompt" in raw_sections:
        template = str(raw_sections["prompt"])
        sampled = wildcards.sample(template, jf.library, rng)
        prompt, picks = sampled.text, tuple(sampled.picks)
    if "prompt_sr" in overrides:
        axis = next(a for a in plan.grid + plan.zip if a.key == "prompt_sr")
        prompt = prompt.replace(str(axis.values[0]), str(overrides["prompt_sr"]))
    if negative_has_choices:
        negative = wildcards.sample(negative, jf.library, rng).text
    for key, text in (("prompt", prompt), ("negative", negative)):
        if len(text) > MAX_PROMPT_CHARS:   # prompt_sr can lengthen a prompt
            raise JobError(*plan.locate(key), f"task {index}: the {key} is "
                           f"{_chars(len(text))} long, more than the {MAX_PROMPT_CHARS:,} "
                           "characters a prompt may have")
        problem = prompt_syntax.prompt_problem(text)
        if problem:  # from a wildcard value, or an expansion _check_template did not reach
            raise JobError(*plan.locate(key), problem)

    width, height = settings.pop("size")
    width = settings.pop("width", None) or width
    height = settings.pop("height", None) or height
    sampler, schedule = _sampler_and_schedule(settings.pop("sampler"),
                                              settings.pop("schedule", None))
    sections = {k: v for k, v in settings.items() if k not in CORE_FIELDS}
    problem = _image_problem(settings.get("image"), settings.get("mask"),
                             settings.get("strength"), settings["steps"])
    if problem:   # a combination of axis values validation could not pair up
        raise JobError(*plan.locate(problem[0]), f"task {index}: {problem[1]}")
    task = Task(
        job=plan.job.name, index=index, prompt=prompt, negative=negative, seed=seed,
        model=settings.get("model") or "", width=width, height=height,
        steps=settings["steps"], cfg=settings["cfg"], sampler=sampler, schedule=schedule,
        clip_skip=settings["clip_skip"], vae=settings.get("vae"), image=settings.get("image"),
        strength=settings.get("strength"), mask=settings.get("mask"), sections=sections,
        template=template, picks=picks, axes=dict(overrides), where=plan.job.where,
    )
    return task, rng is None and "seed" not in overrides


@functools.lru_cache(maxsize=256)
def _sampler_and_schedule(sampler: tuple[str, str | None], schedule: str | None) -> tuple[str, str]:
    """The canonical pair, with Automatic resolved to what it means for this sampler.

    Resolving here makes ``DPM++ 2M`` and ``DPM++ 2M Karras`` the same task (same id, same
    infotext), as they are the same image. Validation has checked the pair is supported.
    """
    from render import samplers

    name, embedded = sampler
    name, chosen = samplers.resolve_sampler(name, schedule or embedded)
    return name, samplers.resolved_schedule(name, chosen) or "Automatic"


def plugin_expand(task: Task, plugins: Plugins) -> list[Task]:
    """Run each plugin's ``expand_task`` in call order; a returned list replaces the task."""
    tasks = [task]
    for _name, expand_task in plugins.ordered("expand_task"):
        next_tasks: list[Task] = []
        for current in tasks:
            replaced = expand_task(task=current)
            next_tasks.extend(replaced if replaced is not None else [current])
        tasks = next_tasks
    return tasks
