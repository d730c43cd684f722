"""``--replay IMAGE``: re-render an image from the provenance embedded in it, alone.

The provenance holds the resolved task (every setting, every plugin section, the path and
full sha256 of every file used). Replay checks each file is still there with the same
hash, so a re-render can only differ from the original for reasons of hardware or versions.

An image is input like a job file, and anyone can write its text chunks: the provenance is
validated with the job file's own validators (``render.fields`` for the core keys, each
plugin's for its section; errors ``IMAGE: task.width: ...``, exit 2), every file reference
is checked against a schema, and no permission is ever taken from it. ``allow_pickle`` in an
image is ignored: a replay that needs a pickle file is refused unless the command line says
``--allow-pickle`` (the job file's ``models:`` alias is the other place that can grant it).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from render.errors import (
    EXIT_FAILED,
    EXIT_OK,
    FieldError,
    JobError,
    JobErrors,
    Location,
    UserError,
)
from render.fields import CORE_FIELDS, FieldContext, describe, expect_int, expect_str
from render.tasks import Batch, FileRef, Task

log = logging.getLogger("render")


def read_image_metadata(image: str) -> tuple[str | None, dict[str, Any] | None]:
    """(infotext, provenance) of ``image``; an unreadable file is a one-line user error."""
    from PIL import Image

    from render import metadata

    try:
        return metadata.read_metadata(image)
    except FileNotFoundError:
        raise UserError(f"{image}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{image}: is a folder, not an image") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{image}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, RecursionError, zlib.error,
            Image.DecompressionBombError) as exc:   # crafted or damaged chunks
        raise UserError(f"{image}: cannot read image metadata: {exc}") from None


# -- validating a provenance -------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: The keys ``Task.to_json`` writes that are no job-file key, with their checks.
_OWN_KEYS: dict[str, Callable[[Any], Any]] = {
    "job": lambda v: expect_str(v, what="a job name", allow_empty=False),
    "index": lambda v: expect_int(v, minimum=0, what="a task index"),
    "id": lambda v: expect_str(v if v is not None else "", what="a task id"),
    "template": lambda v: expect_str(v if v is not None else "", what="text"),
}
#: Keys every provenance task has (``task_from_json`` needs them).
_REQUIRED = ("job", "index", "prompt", "negative", "seed", "model", "width", "height", "steps",
             "cfg", "sampler")
#: What a checkpoint reference's ``extra`` may hold (the engine reads these to load it).
_CHECKPOINT_EXTRA: dict[str, Callable[[Any], bool]] = {
    "format": lambda v: v in ("diffusers", "single_file"),
    "in_channels": lambda v: type(v) is int and v in (4, 5, 9),
    "prediction": lambda v: v in (None, "v", "epsilon"),
    "shipped_config": lambda v: v is None or v in _shipped(),
    "config": lambda v: v is None or (isinstance(v, str) and Path(v).is_absolute()
                                      and (Path(v) / "model_index.json").is_file()),
    "vae": lambda v: v is None or isinstance(v, str),
}


def _shipped() -> tuple[str, ...]:
    from render.models import SHIPPED_CONFIGS

    return tuple(SHIPPED_CONFIGS)


class _Checker:
    """Collects every problem of one provenance, each as ``IMAGE: task.<key>: message``."""

    def __init__(self, image: str) -> None:
        self.where = Location(image)
        self.ctx = FieldContext(image, Path(image).resolve().parent)
        self.errors: list[JobError] = []

    def fail(self, key: str, message: str) -> None:
        self.errors.append(JobError(self.where, key, message))

    def value(self, key: str, check: Callable[[Any], Any], raw: Any) -> Any:
        try:
            return check(raw)
        except FieldError as exc:
            sub = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in exc.subkey.split(".")
                          if p)
            self.fail(key + sub, exc.message)
            return None


def task_from_provenance(image: str, prov: Mapping[str, Any], plugins: Any) -> Task:
    """The task of ``prov`` after the job file's validation; JobErrors lists every problem."""
    from render.expand import MAX_SEED

    data = prov.get("task")
    if not isinstance(data, Mapping):
        raise UserError(f"{image}: task: expected a mapping, got {describe(data)}")
    check = _Checker(image)
    for key in _REQUIRED:
        if key not in data:
            check.fail(f"task.{key}", "missing")
    values: dict[str, Any] = {}
    for key, validate in CORE_FIELDS.items():
        if key in data and key != "size":
            values[key] = check.value(f"task.{key}", lambda v, f=validate: f(v, check.ctx),
                                      data[key])
    if isinstance(values.get("sampler"), tuple):
        values["sampler"] = values["sampler"][0]
    for key, own in _OWN_KEYS.items():
        if key in data:
            values[key] = check.value(f"task.{key}", own, data[key])
    if "seed" in data:
        values["seed"] = check.value("task.seed", lambda v: expect_int(
            v, minimum=0, maximum=MAX_SEED, what="a seed"), data["seed"])
    picks = data.get("picks") or []
    if not isinstance(picks, list) or not all(isinstance(p, str) for p in picks):
        check.fail("task.picks", f"expected a list of texts, got {describe(picks)}")
    axes = data.get("axes") or {}
    if not isinstance(axes, Mapping):
        check.fail("task.axes", f"expected a mapping, got {describe(axes)}")
    sections = _sections(check, prov, data, plugins)
    files = _files(check, data.get("files"), set(plugins.kinds()) | {"image"})
    if check.errors:
        raise JobErrors(check.errors)
    return Task(
        job=values["job"], index=values["index"], prompt=values["prompt"],
        negative=values["negative"], seed=values["seed"], model=values["model"],
        width=values["width"], height=values["height"], steps=values["steps"],
        cfg=values["cfg"], sampler=values["sampler"],
        schedule=values.get("schedule") or "Automatic", clip_skip=values.get("clip_skip") or 1,
        vae=values.get("vae"), image=values.get("image"), strength=values.get("strength"),
        mask=values.get("mask"), sections=sections, template=values.get("template") or "",
        picks=tuple(picks), axes=dict(axes), files=files, id=values.get("id") or "",
    )


def _sections(check: _Checker, prov: Mapping[str, Any], data: Mapping[str, Any],
              plugins: Any) -> dict[str, Any]:
    """Each plugin section through its plugin's validator, as a job file's would go."""
    names = prov.get("sections", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        check.fail("sections", f"expected a list of section names, got {describe(names)}")
        return {}
    fields = plugins.fields()
    out: dict[str, Any] = {}
    for name in names:
        spec = fields.get(("task", name))
        if spec is None:
            check.fail(f"task.{name}", "no installed plugin claims this key (is the plugin"
                       " that rendered the image installed?)")
        elif name in data:
            out[name] = check.value(f"task.{name}",
                                    lambda v, s=spec: s.validator(v, check.ctx), data[name])
    return out


_REF_KEYS = ("kind", "name", "path", "sha256", "short_hash", "family", "hub", "extra")


def _files(check: _Checker, raw: Any, kinds: set[str]) -> dict[str, FileRef]:
    """The file references, by a schema: every file absolute and hashed (so replay can
    verify it), no hub ids, checkpoint settings the engine understands, no permissions."""
    if not isinstance(raw, Mapping) or "model" not in raw:
        check.fail("task.files", "expected a mapping of the files the task used, with its"
                   " model")
        return {}
    files: dict[str, FileRef] = {}
    for label, ref in raw.items():
        key = f"task.files.{label}"
        if not isinstance(ref, Mapping):
            check.fail(key, f"expected a mapping, got {describe(ref)}")
            continue
        problems: list[tuple[str, str]] = [
            (str(k), "unknown key") for k in ref if k not in _REF_KEYS]
        if ref.get("kind") not in kinds:
            problems.append(("kind", f"no installed plugin knows {describe(ref.get('kind'))}"))
        if not isinstance(ref.get("name"), str):
            problems.append(("name", f"expected a text, got {describe(ref.get('name'))}"))
        path = ref.get("path")
        if not isinstance(path, str) or not Path(path).is_absolute():
            problems.append(("path", f"expected an absolute path, got {describe(path)}"))
        if not isinstance(ref.get("sha256"), str) or not _SHA256.match(ref["sha256"]):
            problems.append(("sha256", "expected the file's 64-digit sha256"))
        if ref.get("hub", False) is not False:
            problems.append(("hub", "render records files, not hub ids; expected false"))
        if not isinstance(ref.get("family"), (str, type(None))):
            problems.append(("family", f"expected a text, got {describe(ref.get('family'))}"))
        extra = ref.get("extra") or {}
        if not isinstance(extra, Mapping):
            problems.append(("extra", f"expected a mapping, got {describe(extra)}"))
            extra = {}
        extra = {str(k): v for k, v in extra.items() if k != "allow_pickle"}  # never granted
        if label == "model":
            problems += [(f"extra.{k}", f"unexpected value {describe(extra.get(k))}")
                         for k, ok in _CHECKPOINT_EXTRA.items() if not ok(extra.get(k))]
            if extra.get("format") == "single_file" and not (
                    extra.get("config") or extra.get("shipped_config")):
                problems.append(("extra.config", "a single file needs its diffusers config"))
        for sub, message in problems:
            check.fail(f"{key}.{sub}", message)
        if problems:
            continue
        files[str(label)] = FileRef(ref["kind"], ref["name"], path, ref["sha256"],
                                    str(ref.get("short_hash") or ""), ref.get("family"),
                                    False, extra)
    return files


def load_task(image: str, plugins: Any) -> tuple[Task, dict[str, Any]]:
    """The validated task and the provenance embedded in ``image``."""
    _, prov = read_image_metadata(image)
    if not prov or "task" not in prov:
        raise UserError(f"{image}: no render provenance in this image (only images written "
                        "by render can be replayed)")
    return task_from_provenance(image, prov, plugins), prov


def verify_files(task: Task, image: str) -> None:
    """Every file the task used must still exist with the recorded sha256."""
    from render.hashing import file_sha256

    for label, ref in sorted(task.files.items()):
        if not Path(ref.path).exists():
            raise UserError(f"{image}: {label} file {ref.path} is gone")
        if file_sha256(Path(ref.path)) != ref.sha256:
            raise UserError(f"{image}: {label} file {ref.path} changed since the image was "
                            "rendered (sha256 differs)")


def grant_pickles(task: Task, image: str, allowed: bool) -> Task:
    """The task with ``allow_pickle`` on each file that loads a pickle, if the command line
    allowed it; else a one-line refusal. An image cannot grant this: anyone can write its
    chunks, and loading a pickle can run code."""
    import dataclasses

    from render.models import pickle_files

    files = dict(task.files)
    for label, ref in sorted(task.files.items()):
        if ref.kind == "image":
            continue
        pickles = pickle_files(Path(ref.path))
        if not pickles:
            continue
        if not allowed:
            raise UserError(
                f"{image}: {label} file {pickles[0]} is a pickle, and replay never takes"
                " allow_pickle from an image (anyone can write its metadata); if you trust"
                " the file, replay with --allow-pickle, or re-render from the job file whose"
                " models: alias says allow_pickle: true")
        files[label] = dataclasses.replace(ref, extra={**ref.extra, "allow_pickle": True})
    return dataclasses.replace(task, files=files)


def replay_image(args: Any) -> int:
    from render import __version__, metadata
    from render.output import atomic_write
    from render.plan import check_device_available
    from render.plugins import load_plugins

    image = args.replay
    plugins = load_plugins(args.plugins_dir)
    task, prov = load_task(image, plugins)
    verify_files(task, image)
    task = grant_pickles(task, image, bool(getattr(args, "allow_pickle", False)))
    check_device_available(args.device)
    from render.engine import Engine

    engine = Engine(plugins.pm, device=args.device, dtype=args.dtype)
    try:
        (result,) = engine.render(Batch(("replay",), (task,)))
        result = plugins.chain("postprocess", "result", result, task=task,
                               renderer=engine.renderer)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the image's settings did not render: one line
        log.debug("replay of %s failed", image, exc_info=True)
        raise UserError(f"{image}: the replay failed: {type(exc).__name__}: {exc}") from None
    out_dir = Path(args.out) if args.out else Path(image).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = plugins.formats()
    fmt = animation_format(image, formats) if len(result.images) > 1 else "png"
    target = out_dir / f"{Path(image).stem}-replay{formats[fmt].extension}"
    described = engine.describe()
    infotext = prov.get("infotext")
    new_prov = metadata.provenance(
        task, versions={"render": __version__, **described.get("versions", {})},
        device=described.get("device", ""), timings=result.timings,
        infotext=infotext if isinstance(infotext, str) else "")
    new_prov["replay_of"] = str(image)
    if fmt == "png":
        atomic_write(target, lambda p: metadata.save_image(result.images[0], p, "png", new_prov))
        written = [target]
    else:   # an animation: written in the original's format by the plugin that owns it
        result.provenance = new_prov
        result.extras.clear()
        written = plugins.pm.hook.write_output(result=result, path=target, fmt=fmt) or []
        if not written:
            raise UserError(f"{image}: no plugin writes the {fmt} format of this animation")
    verdict, within = compare_frames(image, result.images)
    print(f"replayed {image} -> {written[0]}: {verdict}")
    return EXIT_OK if within else EXIT_FAILED


def animation_format(image: str, formats: Mapping[str, Any]) -> str:
    """The ``output.format`` an animation was written in: the animated format registered
    for its file's extension (a PNG holding a whole animation's provenance is frame 0 of
    png-frames); UserError when no plugin writes animations with that extension."""
    suffix = Path(image).suffix.lower()
    names = sorted(n for n, spec in formats.items() if spec.animated and spec.extension == suffix)
    if not names:
        raise UserError(f"{image}: no plugin writes animations as {suffix or 'this'} files")
    return names[0]


def show_image(image: str) -> int:
    """``--show``: the infotext and what the provenance says, never trusting its shape."""
    infotext, provenance = read_image_metadata(image)
    if infotext is None and provenance is None:
        raise UserError(f"{image}: no generation metadata found")
    if infotext:
        print(infotext)
    if provenance:
        task = provenance.get("task")
        if not isinstance(task, Mapping):
            print(f"\n(render provenance present but malformed: task is {describe(task)})")
            return 0
        print(f"\nrender task {_shown(task.get('id', '?'))} (job {_shown(task.get('job'))},"
              f" index {_shown(task.get('index'))})")
        files = task.get("files")
        for label, ref in sorted((files if isinstance(files, Mapping) else {}).items(),
                                 key=lambda item: str(item[0])):
            if isinstance(ref, Mapping):
                print(f"  {_shown(label)}: {_shown(ref.get('path'))}"
                      f" sha256={_shown(ref.get('sha256'))}")
    return 0


def _shown(value: Any) -> str:
    """A provenance value for a terminal: one line, control characters escaped, bounded."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= 200 else text[:197] + "..."


#: What "the same image" means: the same task in another batch, or alone, may differ by float
#: noise of the batch size (at most 1/255 in a few pixels on the CPU).
TOLERANCE = 1


def compare_frames(original: str, frames: list[Any]) -> tuple[str, bool]:
    """:func:`compare` for every frame: a png-frames original (``<name>-0000.png``) is
    compared frame by frame with its siblings ``<name>-0001.png`` ...; a still as one."""
    if len(frames) == 1 or Path(original).suffix.lower() != ".png":
        return compare(original, frames[0])
    path = Path(original)
    stem = path.stem[:-5] if re.search(r"-\d{4}$", path.stem) else path.stem
    worst: tuple[str, bool] = ("identical pixels", True)
    for i, frame in enumerate(frames):
        sibling = path.with_name(f"{stem}-{i:04}.png")
        if not sibling.is_file():
            return f"not compared: frame {i} of the original ({sibling.name}) is missing", True
        verdict, within = compare(str(sibling), frame)
        if not within:
            return f"frame {i}: {verdict}", False
        if verdict != "identical pixels":
            worst = (verdict, within)
    return f"{len(frames)} frames, {worst[0]}", worst[1]


def compare(original: str, replayed: Any) -> tuple[str, bool]:
    """How the replay's pixels compare with the original's, and whether they are within
    :data:`TOLERANCE`; a lossy original (jpg, webp) cannot be compared pixel for pixel."""
    import numpy as np
    from PIL import Image

    from render import metadata

    if Path(original).suffix.lower() in metadata.VIDEO_SUFFIXES:
        return "not compared: the original is a video, a lossy format", True
    with Image.open(original) as im:
        if im.format != "PNG":
            return f"not compared: the original is {im.format}, a lossy format", True
        before = np.asarray(im.convert("RGB"), dtype=np.int16)
    after = np.asarray(replayed.convert("RGB"), dtype=np.int16)
    if before.shape != after.shape:
        return f"a different size ({after.shape[1]}x{after.shape[0]})", False
    worst = int(np.abs(before - after).max())
    if worst == 0:
        return "identical pixels", True
    if worst <= TOLERANCE:
        return (f"max difference {worst}/255, within the {TOLERANCE}/255 tolerance (float "
                "noise of the batch size)"), True
    return (f"max difference {worst}/255, beyond the {TOLERANCE}/255 tolerance: other "
            "hardware or library versions than the provenance records?"), False
