"""The values that flow between stages: jobs, tasks, file references, batches and results.

Every stage takes the previous stage's values and returns new ones (``dataclasses.replace``),
so data flows one way: load -> expand -> plan -> render -> post -> write -> report.
Pure Python: no torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from render.errors import Location

#: A1111's default denoising strength, for an img2img/inpaint/depth task that gives none.
DEFAULT_STRENGTH = 0.75

#: Keys of a task whose values decide its pixels (besides plugin sections and file hashes).
PIXEL_KEYS = (
    "prompt", "negative", "seed", "width", "height", "steps", "cfg", "sampler", "schedule",
    "clip_skip", "strength",
)


@dataclass(frozen=True)
class FileRef:
    """A file a task uses, found on disk (or a hub id), with the hashes A1111 and we record."""

    kind: str                 # "checkpoint", "vae", "lora", "embedding", "controlnet", "image", ...
    name: str                 # the name as the user wrote it (or the file stem)
    path: str                 # absolute path, or the hub id when ``hub`` is true
    sha256: str = ""          # full sha256 of the file (of the weight files, for a folder)
    short_hash: str = ""      # A1111's "Model hash": sha256[:10]
    family: str | None = None  # "sd1" | "sd2" | "sdxl" for models; None for plain files
    hub: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. lora's A1111 "addnet" hash

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "name": self.name, "path": self.path, "sha256": self.sha256,
            "short_hash": self.short_hash, "family": self.family, "hub": self.hub,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


#: The default pixel limit of one grid sheet: well under Pillow's decompression-bomb limit
#: (89.5 MP), so every viewer, Pillow and A1111's PNG Info open it.
GRID_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class GridSpec:
    """``output.grid`` as a mapping: which dimension runs across (x), down (y) and from
    sheet to sheet (z); None: the next one in the job's order. ``max_pixels``: the most one
    sheet may have before it is split into parts."""

    x: str | None = None
    y: str | None = None
    z: str | None = None
    max_pixels: int = GRID_MAX_PIXELS

    @property
    def chosen(self) -> dict[str, str]:
        return {k: v for k, v in (("x", self.x), ("y", self.y), ("z", self.z)) if v}


@dataclass(frozen=True)
class OutputSpec:
    """A job's ``output:`` section after defaults are applied."""

    dir: str = "out/{job}"
    name: str = "{index:05}-{seed}"
    format: str = "png"
    grid: bool = True
    grid_spec: GridSpec = GridSpec()
    options: Mapping[str, Any] = field(default_factory=dict)  # plugin-claimed output keys


@dataclass(frozen=True)
class Job:
    """One entry of ``jobs:`` with everything expansion and output naming need."""

    name: str
    file: str                  # the job file, as given on the command line
    base_dir: Path             # the job file's folder; relative paths start here
    where: Location            # the job entry in the job file
    output: OutputSpec
    grid_axes: tuple[str, ...] = ()   # grid axis keys in the order written (first = X)
    zip_axes: tuple[str, ...] = ()
    task_count: int = 0


@dataclass(frozen=True)
class Task:
    """One output image (or animation): every setting resolved, nothing left to look up.

    ``sections`` holds each plugin's section (``lora``, ``controlnet`` ...) as its validator
    normalised it. ``files`` and ``id`` are filled in by preflight (``render.plan``), once
    every name has been resolved to a file and hashed.
    """

    job: str
    index: int
    prompt: str                     # after wildcards, as written (A1111 tags kept)
    negative: str
    seed: int
    model: str                      # as written: alias, file name, path or hub id
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str                    # canonical A1111 name, e.g. "DPM++ 2M"
    schedule: str = "Automatic"     # A1111 schedule type: Automatic, Karras, ...
    clip_skip: int = 1
    vae: str | None = None
    image: str | None = None        # absolute path: img2img / inpainting input
    strength: float | None = None   # img2img denoising strength
    mask: str | None = None         # absolute path: makes the task inpainting
    sections: Mapping[str, Any] = field(default_factory=dict)
    template: str = ""              # the prompt before wildcard expansion
    picks: tuple[str, ...] = ()     # the wildcard values chosen, in order
    axes: Mapping[str, Any] = field(default_factory=dict)  # grid/zip key -> this task's value
    where: Location | None = None   # the job entry in the job file, for preflight errors
    files: Mapping[str, FileRef] = field(default_factory=dict)
    id: str = ""

    @property
    def kind(self) -> str:
        """The core pipeline kind: txt2img, img2img or inpaint."""
        if self.mask:
            return "inpaint"
        if self.image:
            return "img2img"
        return "txt2img"

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def evolve(self, **changes: Any) -> Task:
        """``dataclasses.replace`` for the hot path: a shallow copy with ``changes`` set,
        without running ``__init__`` again (Task has no ``__post_init__`` to skip). Preflight
        makes two per task; through ``replace`` they were a third of a 100,000-task dry run."""
        unknown = changes.keys() - _TASK_FIELDS
        if unknown:
            raise TypeError(f"Task has no field {sorted(unknown)[0]!r}")
        new = object.__new__(Task)
        state = new.__dict__   # frozen guards setattr, not the instance dict
        state.update(self.__dict__)
        state.update(changes)
        return new

    def __getstate__(self) -> dict[str, Any]:
        """Picklable, for a Ray worker: a read-only view (preflight shares one ``files`` view
        among plugins) travels as a plain dict."""
        return {k: dict(v) if isinstance(v, MappingProxyType) else v
                for k, v in self.__dict__.items()}

    def pixel_settings(self) -> dict[str, Any]:
        """Everything that decides the pixels, in a JSON-able form (the basis of the id)."""
        data: dict[str, Any] = {k: getattr(self, k) for k in PIXEL_KEYS}
        data["kind"] = self.kind
        data["sections"] = _jsonable(self.sections)
        data["files"] = {
            label: (ref.path if ref.hub else ref.sha256)
            for label, ref in sorted(self.files.items())
        }
        if "model" not in self.files:
            data["model"] = self.model
        return data

    def first_pass_id(self, post_keys: Collection[str]) -> str:
        """The id of the image before the ``post_keys`` sections act (each one registered
        with ``stage="post"``), without them and their files (labelled ``"<key>:..."``):
        tasks that differ only there share their first pass."""
        data = self.pixel_settings()
        data["sections"] = {k: v for k, v in data["sections"].items() if k not in post_keys}
        data["files"] = {label: v for label, v in data["files"].items()
                         if label.split(":", 1)[0] not in post_keys}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def compute_id(self) -> str:
        """A content hash of what decides the pixels: same settings, same id, any run."""
        blob = json.dumps(self.pixel_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The resolved task as written to ``--dry-run --json`` and the provenance chunk."""
        data: dict[str, Any] = {
            "id": self.id, "job": self.job, "index": self.index, "prompt": self.prompt,
            "negative": self.negative, "seed": self.seed, "steps": self.steps, "cfg": self.cfg,
            "sampler": self.sampler, "schedule": self.schedule, "width": self.width,
            "height": self.height, "model": self.model, "clip_skip": self.clip_skip,
            "vae": self.vae, "image": self.image, "strength": self.strength, "mask": self.mask,
            "template": self.template, "picks": list(self.picks), "axes": _jsonable(self.axes),
        }
        data.update(_jsonable(self.sections))
        if self.files:
            data["files"] = {label: ref.to_json() for label, ref in sorted(self.files.items())}
        return data


_TASK_FIELDS = frozenset(f.name for f in fields(Task))


def task_from_json(data: Mapping[str, Any], section_keys: list[str]) -> Task:
    """Rebuild a Task from ``Task.to_json()`` output (the provenance of an image)."""
    files = {label: FileRef(**{k: v for k, v in ref.items() if k != "extra"},
                            extra=ref.get("extra") or {})
             for label, ref in (data.get("files") or {}).items()}
    return Task(
        job=data["job"], index=data["index"], prompt=data["prompt"], negative=data["negative"],
        seed=data["seed"], model=data["model"], width=data["width"], height=data["height"],
        steps=data["steps"], cfg=data["cfg"], sampler=data["sampler"],
        schedule=data.get("schedule", "Automatic"), clip_skip=data.get("clip_skip", 1),
        vae=data.get("vae"), image=data.get("image"), strength=data.get("strength"),
        mask=data.get("mask"), sections={k: data[k] for k in section_keys if k in data},
        template=data.get("template", ""), picks=tuple(data.get("picks") or ()),
        axes=data.get("axes") or {}, files=files, id=data.get("id", ""),
    )


def _jsonable(value: Any) -> Any:
    """Mappings and sequences as plain dicts/lists so they serialise and compare stably."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Batch:
    """Tasks that share one pipeline call (same model, kind, size, steps, sampler, ...)."""

    key: tuple[Any, ...]
    tasks: tuple[Task, ...]

    @property
    def first(self) -> Task:
        return self.tasks[0]


@dataclass
class Result:
    """What the render stage produced for one task, on its way to the writers.

    ``images`` holds one PIL image, or the frames of an animation; ``extras`` are side files
    (e.g. a ControlNet's preprocessed image) keyed by a suffix for their file name. The
    write stage sets ``provenance`` (with the final infotext) on the copy it writes.

    An animation is a result with more than one image: its frames in order, shown at ``fps``
    frames per second (None: the writer's default, 8) and repeated forever when ``loop``
    (else played once). Whatever makes the frames sets both (AnimateDiff; a ``postprocess``).
    """

    task: Task
    images: list[Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # e.g. "vae tiling" after an OOM
    fps: float | None = None   # an animation's frame rate; None: the writer's default
    loop: bool = True          # an animation repeats (GIF/WebP loop 0, the gallery's loop)
    #: Where it rendered, when the executor says (``--executor ray``: worker, node, pid);
    #: recorded in the provenance as ``"executor"``. Empty for the local executor.
    executor: dict[str, Any] = field(default_factory=dict)
