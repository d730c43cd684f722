"""Output files: name templates, atomic writes and the core png/webp/jpg writers.

Names come from ``output.dir`` + ``output.name`` (README.md, "Names"). The substitution is our
own (not ``str.format``): ``{lora.add_detail}`` is a plain field name, never attribute
access, and a format spec (``{index:05}``, ``{prompt:.40}``, ``{cfg:.1f}``) is checked before
use. Every substituted value is sanitised and every path component checked, so a prompt or
an axis value can never lead a file outside the output root.

Pure Python + Pillow: no torch here.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from render.errors import FieldError, UserError
from render.hookspecs import hookimpl
from render.ledger import pid_alive
from render.metadata import format_number, save_image
from render.prompts import strip_extra_networks
from render.tasks import Job, OutputSpec, Task

#: Fields every template may use; any grid or zip axis key may be used as well.
BUILTIN_FIELDS = frozenset({
    "job", "index", "seed", "id", "prompt", "model", "sampler", "steps", "cfg", "width",
    "height", "date", "time",
})
#: Fields whose value is the same for every task of a job (usable for the job's folder).
JOB_FIELDS = frozenset({"job", "date", "time"})

#: Output format -> file extension. The core's formats; a plugin's formats are added when the
#: plugins are loaded (``register_output_formats``, collected by ``render.plugins``).
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpg": ".jpg", "jpeg": ".jpg"}

#: Longest path component we produce, in UTF-8 bytes: NAME_MAX is 255, and we leave room for
#: a collision suffix and the temp-file prefix/suffix of ``atomic_write``.
MAX_COMPONENT_BYTES = 180

_FIELD_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*"
_FIELD = re.compile(r"\{(" + _FIELD_NAME + r")(?::([^{}]*))?\}")
_SPEC = re.compile(
    r"(?:[^{}]?[<>=^])?[+\- ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<prec>\d+))?[bcdeEfFgGnosxX%]?"
)
_MAX_SPEC_NUMBER = 255
_UNSAFE_CHARS = set('/\\<>:"|?*')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
             *(f"LPT{i}" for i in range(10))}
TEMP_RE = re.compile(r"^\..*\.tmp-(\d+)-[0-9a-f]{6}(\.[^.]*)?$")


# -- templates -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Field:
    name: str
    spec: str


_Token = str | _Field


def _tokens(template: str) -> list[_Token]:
    """Split a template into literal strings and fields; ``{{``/``}}`` are literal braces."""
    out: list[_Token] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "{" and template.startswith("{{", i):
            literal.append("{")
            i += 2
        elif c == "}" and template.startswith("}}", i):
            literal.append("}")
            i += 2
        elif c == "{":
            m = _FIELD.match(template, i)
            if not m:
                end = template.find("}", i)
                bad = template[i:end + 1] if end >= 0 else template[i:]
                raise ValueError(f"bad field {bad!r} in {template!r}: expected {{name}} or "
                                 "{name:spec} (write {{ for a literal brace)")
            name, spec = m.group(1), m.group(2) or ""
            _check_spec(name, spec)
            if literal:
                out.append("".join(literal))
                literal = []
            out.append(_Field(name, spec))
            i = m.end()
        elif c == "}":
            raise ValueError(f"single '}}' in {template!r} (write }}}} for a literal brace)")
        else:
            literal.append(c)
            i += 1
    if literal:
        out.append("".join(literal))
    return out


def _check_spec(name: str, spec: str) -> None:
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ValueError(f"field {{{name}:{spec}}}: {spec!r} is not a format spec")
    for part in ("width", "prec"):
        if m.group(part) and int(m.group(part)) > _MAX_SPEC_NUMBER:
            raise ValueError(f"field {{{name}:{spec}}}: {part} above {_MAX_SPEC_NUMBER}")


def _components(template: str) -> list[list[_Token]]:
    """The template's path components ('/' in literal text separates them)."""
    comps: list[list[_Token]] = [[]]
    for tok in _tokens(template):
        if isinstance(tok, _Field):
            comps[-1].append(tok)
            continue
        pieces = tok.split("/")
        for k, piece in enumerate(pieces):
            if k:
                comps.append([])
            if piece:
                comps[-1].append(piece)
    return comps


def template_fields(template: str) -> list[str]:
    """Field names used in ``template``, in order of first use."""
    seen: dict[str, None] = {}
    for tok in _tokens(template):
        if isinstance(tok, _Field):
            seen.setdefault(tok.name)
    return list(seen)


def check_template(template: str, allowed: set[str] | frozenset[str], *,
                   what: str = "template") -> None:
    """Raise ``ValueError`` (naming the field) for an unknown field, a bad spec or a ``..``."""
    unknown = [f for f in template_fields(template) if f not in allowed]
    if unknown:
        names = ", ".join("{" + f + "}" for f in unknown)
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {names} in {what} "
                         f"{template!r}; known: {', '.join(sorted(allowed))}")
    comps = _components(template)
    start = _static_count(comps)
    for comp in comps[start:]:
        if comp in (["."], [".."]):
            raise ValueError(f"{what} {template!r}: '..' after the first field would leave "
                             "the output root")


def allowed_fields(job: Job) -> set[str]:
    """Fields ``job``'s templates may use: the built-ins plus its grid and zip axis keys."""
    return set(BUILTIN_FIELDS) | set(job.grid_axes) | set(job.zip_axes)


#: Values each built-in field can take, by type, to try a format spec on at validation:
#: ``{prompt:05d}`` (text) and ``{seed:.40}`` (an integer) fail there, not per task.
#: The largest seed is there for ``{seed:c}``, which no seed past 0x10FFFF fits.
FIELD_SAMPLES: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(("job", "id", "prompt", "model", "sampler", "date", "time"), ("text",)),
    **dict.fromkeys(("index", "seed", "steps", "width", "height"), (0, 2**64 - 1)),
    "cfg": (7, 7.5),
}


def check_output_spec(spec: OutputSpec, allowed: set[str] | frozenset[str], *,
                      samples: Mapping[str, Iterable[Any]] | None = None) -> None:
    """Validate ``output.dir`` and ``output.name`` at job-file validation time; the
    ``FieldError``'s ``subkey`` says which of the two is wrong.

    A field's format spec must fit every value the field can take: ``samples`` (an axis's
    values, the job's ``cfg`` values), else the built-in field's ``FIELD_SAMPLES``.
    """
    for key, template in (("dir", spec.dir), ("name", spec.name)):
        try:
            check_template(template, allowed, what=f"output.{key}")
            _check_specs_fit(template, samples or {}, what=f"output.{key}")
        except ValueError as exc:
            raise FieldError(str(exc), key) from None
    if spec.name.startswith("/") or not spec.name.strip("/"):
        raise FieldError(f"output.name {spec.name!r}: expected a relative file name", "name")
    for comp in _components(spec.name):
        if comp in (["."], [".."]):
            raise FieldError(f"output.name {spec.name!r}: '..' would leave the output folder",
                             "name")


def _check_specs_fit(template: str, samples: Mapping[str, Iterable[Any]], *, what: str) -> None:
    """Format each spec'd field of ``template`` with the values it can take, as writing will."""
    for tok in _tokens(template):
        if not isinstance(tok, _Field) or not tok.spec:
            continue
        values = FIELD_SAMPLES.get(tok.name) if tok.name != "cfg" else None
        if values is None:
            values = tuple(samples.get(tok.name, ())) or FIELD_SAMPLES.get(tok.name, ())
        for value in values:
            try:
                format(value, tok.spec)
            except (ValueError, TypeError, OverflowError) as exc:
                kind = ("text" if isinstance(value, str) else "an integer"
                        if isinstance(value, int) else "a number"
                        if isinstance(value, float) else "a list or mapping")
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise ValueError(f"{what} {template!r}: {{{tok.name}:{tok.spec}}} does not fit "
                                 f"{tok.name}, which is {kind} (e.g. {shown}): {exc}") from None


def _static_count(comps: list[list[_Token]]) -> int:
    """How many leading components contain no field (they make the output root)."""
    for k, comp in enumerate(comps):
        if any(isinstance(t, _Field) for t in comp):
            return k
    return len(comps)


def output_root(output_dir_template: str, base_dir: Path | str) -> Path:
    """The folder before the first templated component, relative to the job file's folder.

    ``out/{job}`` -> ``<base>/out``; ``renders/run-{date}`` -> ``<base>/renders``; an absolute
    or ``~`` prefix is kept. The ledger and the lock live here.
    """
    comps = _components(output_dir_template)
    static = comps[:_static_count(comps)]
    prefix = "/".join("".join(t for t in comp if isinstance(t, str)) for comp in static)
    if output_dir_template.startswith("/"):
        prefix = "/" + prefix.lstrip("/")
    path = Path(os.path.expanduser(prefix)) if prefix else Path()
    if not path.is_absolute():
        path = Path(base_dir) / path
    return Path(os.path.normpath(os.path.abspath(path)))


# -- values ----------------------------------------------------------------------------------
def slug(text: str) -> str:
    """A file-name-friendly prompt: lower-case words joined by ``-`` (any script kept).

    A1111 extra-network tags (``<lora:x:0.6>``) and weights are dropped as punctuation.
    """
    text = strip_extra_networks(text, " ")
    text = unicodedata.normalize("NFKC", text).lower()
    return "-".join(re.findall(r"[^\W_]+(?:_[^\W_]+)*", text))


def model_label(model: str) -> str:
    """A model's short name for file names: the last path/hub-id part, no weight extension."""
    name = re.split(r"[\\/]", model.rstrip("/\\"))[-1]
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin|gguf)$", "", name, flags=re.I)


def field_values(task: Task, now: datetime | None = None) -> dict[str, Any]:
    """The built-in field values of one task (before formatting and sanitising)."""
    now = now or datetime.now()
    sampler = task.sampler
    if task.schedule and task.schedule != "Automatic":
        sampler = f"{sampler} {task.schedule}"
    return {
        "job": task.job, "index": task.index, "seed": task.seed, "id": task.short_id,
        "prompt": slug(task.prompt), "model": model_label(task.model), "sampler": sampler,
        "steps": task.steps, "cfg": task.cfg, "width": task.width, "height": task.height,
        "date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H-%M-%S"),
    }


def _format(name: str, value: Any, spec: str) -> str:
    if spec:
        try:
            text = format(value, spec)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"field {{{name}:{spec}}}: cannot format {value!r}: {exc}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = format_number(value)
    elif isinstance(value, str):
        text = value
    else:
        import json

        text = json.dumps(value, ensure_ascii=False, separators=(",", "="), sort_keys=True)
    if name == "prompt":
        text = text.rstrip("-")
    return _clean_value(text)


def _clean_value(text: str) -> str:
    """Replace separators, reserved and invisible characters (bidi overrides too) with _."""
    out = []
    for ch in unicodedata.normalize("NFC", text):
        cat = unicodedata.category(ch)
        if ch in _UNSAFE_CHARS or cat[0] == "C" or cat in ("Zl", "Zp"):
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _clean_component(text: str, *, limit: int = MAX_COMPONENT_BYTES) -> str:
    """One safe path component: no leading dot (hidden/temp), no trailing dot or space,
    no Windows device name, never empty, '.' or '..', at most ``limit`` UTF-8 bytes."""
    text = _clean_value(text).strip(" ")
    text = _truncate(text, limit).rstrip(". ")
    if text.startswith("."):
        text = "_" + text[1:]
    if not text:
        text = "_"
    if text.split(".")[0].upper() in _RESERVED:
        text = "_" + text
    return text


def safe_name(text: str, *, limit: int = MAX_COMPONENT_BYTES) -> str:
    """``text`` made into one safe file or folder name (the rules of template values)."""
    return _clean_component(text, limit=limit)


def _truncate(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def _render(comp: list[_Token], values: Mapping[str, Any], axes: Mapping[str, Any]) -> str:
    parts = []
    for tok in comp:
        if isinstance(tok, str):
            parts.append(tok)
            continue
        if tok.name in values:
            value = values[tok.name]
        elif tok.name in axes:
            value = axes[tok.name]
        else:
            raise ValueError(f"unknown field {{{tok.name}}}: not a built-in field or an axis "
                             "of this task")
        parts.append(_format(tok.name, value, tok.spec))
    return "".join(parts)


def extension(fmt: str) -> str:
    """The file extension (with dot) for an output format."""
    fmt = fmt.lower()
    return EXTENSIONS.get(fmt) or "." + (re.sub(r"[^a-z0-9]", "", fmt) or "bin")


def output_path(task: Task, job: Job, root: Path, *, now: datetime | None = None) -> Path:
    """Where ``task``'s output goes: ``root`` + the templated rest of ``output.dir`` + name.

    ``root`` is ``output_root(job.output.dir, job.base_dir)`` (or an override); the static
    prefix of ``output.dir`` is that root, the rest is rendered per task. ``now`` fills
    ``{date}``/``{time}``: pass the run's start time so one run lands in one folder.
    """
    values = field_values(task, now)
    comps = _components(job.output.dir)
    rest = comps[_static_count(comps):]
    name_comps = _components(job.output.name)
    parts: list[str] = []
    ext = extension(job.output.format)
    all_comps = [c for c in rest + name_comps if c]
    if not name_comps or not name_comps[-1]:
        raise ValueError(f"output.name {job.output.name!r}: expected a file name")
    for k, comp in enumerate(all_comps):
        if comp in (["."], [".."]):
            raise ValueError(f"output template: '..' would leave the output root {root}")
        text = _render(comp, values, task.axes)
        last = k == len(all_comps) - 1
        limit = MAX_COMPONENT_BYTES - (len(ext) if last else 0)
        parts.append(_clean_component(text, limit=limit))
    parts[-1] += ext
    path = Path(root).joinpath(*parts)
    _assert_inside(path, Path(root))
    return path


def _assert_inside(path: Path, root: Path) -> None:
    root_s = os.path.normpath(os.path.abspath(root))
    path_s = os.path.normpath(os.path.abspath(path))
    if not is_inside(path_s, root_s) or path_s == root_s:
        raise ValueError(f"output path {path} is not inside the output root {root}")


def job_dir(job: Job, root: Path, *, now: datetime | None = None) -> Path:
    """The job's own folder: ``output.dir`` rendered up to its first per-task field.

    ``out/{job}`` -> ``<root>/<job>``; ``out/{job}/{seed}`` -> ``<root>/<job>``; grid sheets
    go below it (``grids/``).
    """
    now = now or datetime.now()
    values = {"job": job.name, "date": now.strftime("%Y-%m-%d"), "time": now.strftime("%H-%M-%S")}
    comps = _components(job.output.dir)
    parts = []
    for comp in comps[_static_count(comps):]:
        if not comp:
            continue
        if any(isinstance(t, _Field) and t.name not in JOB_FIELDS for t in comp):
            break
        if comp in (["."], [".."]):
            raise ValueError(f"output.dir {job.output.dir!r}: '..' would leave the output root")
        parts.append(_clean_component(_render(comp, values, {})))
    return Path(root).joinpath(*parts)


def unique_paths(
    entries: Iterable[tuple[Task, Job, Path]], *, now: datetime | None = None
) -> list[Path]:
    """``output_path`` for every (task, job, root), made unique; same order as ``entries``.

    Paths that collide (compared case-insensitively, for macOS/Windows disks) all get
    ``-<short id>`` appended to their stem; should that still collide (two jobs with the same
    settings writing to one folder), ``-<job>-<index>`` follows. Deterministic: the result
    depends only on the entries, so pass every task of the run (before the plan drops the
    done ones), and a resumed run names each task as the first run did.
    """
    items = list(entries)
    now = now or datetime.now()
    keys = [(t.job, t.index) for t, _, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("unique_paths: the same (job, index) appears twice")
    paths = [output_path(t, j, r, now=now) for t, j, r in items]
    rounds = [0] * len(items)
    for _ in range(3):
        groups: dict[str, list[int]] = {}
        for k, p in enumerate(paths):
            groups.setdefault(os.path.normcase(str(p)).casefold(), []).append(k)
        clashes = [k for group in groups.values() if len(group) > 1 for k in group]
        if not clashes:
            return paths
        for k in clashes:
            task, job, _ = items[k]
            rounds[k] += 1
            suffix = (f"-{task.short_id}" if rounds[k] == 1
                      else f"-{_clean_value(task.job)}-{task.index}")
            p = paths[k]
            stem = _truncate(p.stem, MAX_COMPONENT_BYTES - len(p.suffix) - len(suffix))
            paths[k] = p.with_name(stem + suffix + p.suffix)
    raise ValueError("unique_paths: could not make output names unique")  # pragma: no cover


# -- writing ---------------------------------------------------------------------------------
class OutputRefused(UserError):
    """A write render will not do: it would land outside the output root (a planted
    symlink), or over a file render did not write. That task fails with this one line."""


class TempRegistry(Protocol):
    """Where ``atomic_write`` notes its temp files under a run's output root (the ledger)."""

    def register_temp(self, path: Path) -> None: ...

    def forget_temp(self, path: Path) -> None: ...

    def temps(self) -> list[tuple[Path, int, int | None]]: ...


#: Output roots of the running run (real paths) -> their temp registries (``temp_registry``).
_registries: dict[str, TempRegistry] = {}
_registries_lock = threading.Lock()


@contextlib.contextmanager
def temp_registry(root: Path, registry: TempRegistry) -> Iterator[None]:
    """While a run holds ``root``: every ``atomic_write`` below it (the core writers, grids,
    the gallery, plugins) registers its temp file in ``registry`` before creating it, and
    a write that a symlink would lead out of ``root`` is refused."""
    key = os.path.realpath(root)
    with _registries_lock:
        _registries[key] = registry
    try:
        yield
    finally:
        with _registries_lock:
            _registries.pop(key, None)


def is_inside(path: str, root: str) -> bool:
    """Whether the normalised absolute ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def existing_ancestor(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists (what ``mkdir`` would build on)."""
    folder = Path(os.path.abspath(folder))
    while not os.path.lexists(folder) and folder.parent != folder:
        folder = folder.parent
    return folder


def check_inside(folder: Path, root: Path) -> None:
    """Refuse a ``folder`` that really lies outside ``root`` (as far as it exists yet).

    The root itself may be a symlink (``out -> /mnt/big``); a symlink planted below it that
    leads elsewhere is refused before any folder is made through it.
    """
    real_root = os.path.realpath(root)
    if not is_inside(os.path.realpath(existing_ancestor(folder)), real_root):
        raise OutputRefused(f"{folder} leads outside the output folder {root} (a symlink?): "
                            "nothing written; remove the link or change output.dir")


def _registered_root(path: Path) -> tuple[str, TempRegistry] | None:
    """The running run's output root that ``path`` lies under (lexically or really)."""
    lexical = os.path.abspath(path.parent)
    real = os.path.realpath(existing_ancestor(path.parent))
    with _registries_lock:
        roots = sorted(_registries.items(), key=lambda item: len(item[0]), reverse=True)
    for root, registry in roots:
        if is_inside(lexical, root) or is_inside(real, root):
            return root, registry
    return None


def temp_path(path: Path) -> Path:
    """The temp name ``atomic_write`` uses: hidden, same folder, same extension, our pid."""
    stem = _truncate(path.stem, 150)
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")


def atomic_write(path: Path | str, write_fn: Callable[[Path], Any]) -> Path:
    """Write a file so that readers see the old file, or the complete new one, never a part.

    ``write_fn(tmp)`` writes the content to ``tmp`` (a hidden name in the same folder, with
    the same extension, which readers and the gallery skip); then it is fsynced and renamed
    over ``path``, and the folder is fsynced. On any exception (KeyboardInterrupt included)
    the temp file is removed and nothing appears under ``path``. Under a running run's
    output root the temp is registered in its ledger first (so a crash's leftover is
    swept, and nothing else ever is) and a path leading out of the root is refused.
    """
    path = Path(path)
    owner = _registered_root(path)
    if owner is not None:
        check_inside(path.parent, Path(owner[0]))
    registry = owner[1] if owner else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    if registry is not None:
        registry.register_temp(tmp)   # committed before the file exists
    try:
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _forget(registry, tmp)
        raise
    _forget(registry, tmp)
    _fsync_dir(path.parent)
    return path


def _forget(registry: TempRegistry | None, tmp: Path) -> None:
    # A row left behind (the disk is full) names a file that is gone: the next sweep drops it.
    if registry is not None:
        with contextlib.suppress(Exception):
            registry.forget_temp(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(root: Path, registry: TempRegistry) -> int:
    """Remove the temp files that ``registry`` (the root's ledger) says a dead process of
    ours was writing; nothing else is touched, whatever its name. Returns how many."""
    removed = 0
    real_root = os.path.realpath(root)
    for path, pid, ticks in registry.temps():
        if pid_alive(pid, ticks):
            continue
        if TEMP_RE.match(path.name) and is_inside(os.path.realpath(path.parent), real_root):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed += 1
        registry.forget_temp(path)
    return removed


class CoreWriters:
    """The built-in png/webp/jpg writers, registered with the plugin manager like a plugin.

    Contract: ``result.provenance`` is the complete dict from ``render.metadata.provenance``
    and holds the final infotext under ``"infotext"`` (``render.metadata.describe_result``
    builds both before ``write_output``).
    ``result.images[0]`` is written; animations are left to plugins.
    """

    formats = ("png", "webp", "jpg", "jpeg")

    def __init__(self, quality: int = 92) -> None:
        self.quality = quality

    @hookimpl
    def register_output_formats(self, register: Callable[..., None]) -> None:
        register("png", ".png", doc="PNG, infotext in the parameters chunk (A1111)")
        # animated=True: a result with frames is an animated WebP (plugins/animation.py
        # writes it; this writer keeps single images).
        register("webp", ".webp", animated=True,
                 doc="WebP, infotext in EXIF UserComment, provenance in XMP")
        register("jpg", ".jpg", doc="JPEG, infotext in EXIF UserComment, provenance in XMP")
        register("jpeg", ".jpg", doc="the same as jpg")

    @hookimpl
    def write_output(self, result: Any, path: Any, fmt: str) -> list[Path] | None:
        if fmt.lower() not in self.formats:
            return None
        if not result.images:
            raise ValueError(f"task {result.task.id or result.task.index}: no image to write")
        prov = result.provenance
        if not isinstance(prov.get("infotext"), str):
            raise ValueError("result.provenance has no 'infotext': build it with "
                             "render.metadata.provenance() before writing")
        image = result.images[0]
        written = atomic_write(
            Path(path), lambda tmp: save_image(image, tmp, fmt, prov, quality=self.quality)
        )
        return [written]


#: The instance the plugin manager registers (``pm.register(core_writers, "core-writers")``).
core_writers = CoreWriters()
