"""Find the files a job names: A1111 and ComfyUI folder layouts, aliases, hub ids.

Validation and ``--dry-run`` run this without torch (it is never imported here). A user
coming from AUTOMATIC1111 or ComfyUI points ``model_dirs`` at their ``models/`` folder and
writes names the way those tools show them.

Name resolution (``ModelResolver.find``), first hit wins:

1. an alias from the job's ``models:`` section (a string or a mapping with ``source:``);
2. a path (absolute, or relative to the job file's folder);
3. a file or folder in the kind's folders of each ``model_dirs`` entry, in order: A1111
   (``Stable-diffusion/``, ``Lora/``, ``VAE/``, ...; embeddings in ``../embeddings``) and
   ComfyUI (``checkpoints/``, ``loras/``, ...) layouts, matched case-insensitively and searched
   recursively like A1111 does. The extension is optional (``.safetensors`` is preferred, then
   the pickle formats). A ``model_dirs`` entry with none of these folders is searched flat;
4. a hub id ``org/name`` that is already in the local Hugging Face cache. render never
   downloads during a run: a night's run must not fail at 3 a.m. on a network error, and the
   GPU box has no network at all.

Searching is bounded: links are followed once each, virtual filesystems (``/proc``) and
unreadable folders are skipped, and a ``model_dirs`` entry that is a file, unreadable, virtual
or a tree past :data:`MAX_SCAN_FOLDERS` folders is an error at its line (:meth:`dir_errors`).
A pickle is refused unless allowed, in a diffusers folder only where diffusers or transformers
would read it (:func:`pickle_files`): a decoy ``.safetensors`` hides nothing.

Hashing is in :mod:`render.hashing`, reading weight files (headers, shapes, families) in
:mod:`render.weights`; this module only turns names into hashed file references.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render.errors import FieldError
from render.folders import TreeTooBig, virtual_fs, walk
from render.hashing import (
    HashCache,
    file_sha256,
    legacy_model_hash,
    lora_full_hash,
)
from render.images import check_image
from render.kinds import ModelKind, hash_spec
from render.tasks import FileRef
from render.weights import (
    PICKLE_EXTS,
    CheckpointInfo,
    checkpoint_info,
    detect_family,
    prediction_hint,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Shipped diffusers configs (in ``render/configs/``) and the UNet facts each expects.
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {"family": "sd1", "width": 320, "context": 768},
    "sd2": {"family": "sd2", "width": 320, "context": 1024},
    "sd2-base": {"family": "sd2", "width": 320, "context": 1024},
    "sdxl": {"family": "sdxl", "width": 320, "context": 2048},
}

#: Keys an alias mapping may carry besides ``source``.
ALIAS_KEYS = ("source", "vae", "config", "allow_pickle", "prediction", "kind")


# -- resolution -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    rel: str       # posix path relative to its root, with extension for files
    path: Path
    is_dir: bool

    @property
    def stem_rel(self) -> str:
        if self.is_dir:
            return self.rel
        return self.rel[: -len(Path(self.rel).suffix)] if Path(self.rel).suffix else self.rel


def _ext_rank(entry: _Entry, extensions: tuple[str, ...]) -> int:
    """Preference among equally named hits: the kind's extensions in order, then folders."""
    if entry.is_dir:
        return len(extensions)
    ext = Path(entry.rel).suffix.lower()
    return extensions.index(ext) if ext in extensions else len(extensions) + 1


def _is_model_dir(path: Path) -> bool:
    try:
        return (path / "model_index.json").is_file() or (path / "config.json").is_file()
    except OSError:   # a folder we may not look into (``/proc/1/fdinfo``): not a model
        return False


def _listing(root: Path) -> list[_Entry]:
    """Every file and model folder under ``root``; the search does not enter model folders."""
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in walk(root):
        keep = []
        for d in dirnames:
            full = Path(dirpath) / d
            if _is_model_dir(full):
                entries.append(_Entry(full.relative_to(root).as_posix(), full, True))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            full = Path(dirpath) / name
            entries.append(_Entry(full.relative_to(root).as_posix(), full, False))
    return entries


@dataclass
class Resolved:
    """A found name: where it is and the alias options that came with it."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)


class ModelResolver:
    """Turns the names a job writes into files, with A1111/ComfyUI layouts and aliases.

    ``aliases`` is the job file's ``models:`` section: name -> hub id / path / file name, or a
    mapping ``{source, vae, config, allow_pickle, prediction, kind}``. An alias applies to every
    kind unless its mapping names ``kind:`` (a kind or a list of kinds).
    """

    def __init__(
        self,
        model_dirs: list[Path] | tuple[Path, ...],
        aliases: Mapping[str, str | Mapping[str, Any]] | None = None,
        base_dir: Path | str = ".",
        *,
        hash_cache: HashCache | None = None,
        kinds: Mapping[str, ModelKind] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.model_dirs = [self._abs(Path(d)) for d in model_dirs]
        self.aliases = dict(aliases or {})
        self.hash_cache = hash_cache
        self._kinds = dict(kinds) if kinds is not None else None
        #: True in a run, False in --dry-run and validation: whether a plugin's ``task_files``
        #: may open weight files with torch to check them (detect an upscaler's architecture).
        self.deep_checks = False
        self._listings: dict[Path, list[_Entry]] = {}
        self._dir_errors: dict[int, FieldError] | None = None
        self._refs: dict[tuple[str, str], FileRef] = {}
        self._located: dict[tuple[str, str], Resolved | FieldError] = {}

    # folders ------------------------------------------------------------------------------
    def _abs(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def kinds(self) -> dict[str, ModelKind]:
        """The registered kinds; by default those of the installed plugins (loaded once)."""
        if self._kinds is None:
            self._kinds = installed_kinds()
        return self._kinds

    def kind(self, kind: str) -> ModelKind:
        """The registration of ``kind``; an unknown kind is the calling plugin's bug."""
        try:
            return self.kinds[kind]
        except KeyError:
            raise ValueError(
                f"unknown model kind {kind!r} (known: {', '.join(sorted(self.kinds))}); a "
                "plugin declares its kinds with the register_model_kinds hook") from None

    def dir_errors(self) -> list[FieldError]:
        """The ``model_dirs`` entries render cannot search, each a
        ``FieldError(key="model_dirs", subkey=<index>)``: a file, a folder it may not read, a
        virtual filesystem, a tree too big to be a models folder. Searches leave them out.
        (A missing folder is no error: "not found" messages list what exists.)"""
        if self._dir_errors is None:
            self._dir_errors = {}
            for index, d in enumerate(self.model_dirs):
                problem = self._dir_problem(d)
                if problem:
                    self._dir_errors[index] = FieldError(problem, str(index), key="model_dirs")
        return list(self._dir_errors.values())

    def _dir_problem(self, d: Path) -> str | None:
        if not d.exists():
            return None
        if not d.is_dir():
            return f"{d} is a file, not a folder of models"
        fstype = virtual_fs(d)
        if fstype:
            return f"{d} is a virtual filesystem ({fstype}), not a folder of models"
        try:
            with os.scandir(d):
                pass
        except OSError as exc:
            return f"cannot read {d}: {exc.strerror or exc}"
        try:
            self._listing(d)
        except TreeTooBig as exc:
            return (f"{exc}; render searches each model_dirs entry recursively (as A1111"
                    " does), so name the folder that holds your models, e.g."
                    " ~/stable-diffusion-webui/models")
        return None

    def _usable_dirs(self) -> list[Path]:
        bad = {int(e.subkey) for e in self.dir_errors()}
        return [d for i, d in enumerate(self.model_dirs) if i not in bad and d.is_dir()]

    def search_dirs(self, kind: str) -> list[Path]:
        """The folders searched for ``kind``, in order (existing, searchable ones only)."""
        spec = self.kind(kind)
        wanted = {n.lower() for n in spec.folders}
        layout = {n.lower() for k in self.kinds.values() for n in k.folders}
        roots: list[Path] = []
        for d in self._usable_dirs():
            children = sorted(c for c in d.iterdir() if _is_dir(c))
            found = [c for c in children if c.name.lower() in wanted]
            for name in reversed(spec.beside):
                beside = d.parent / name
                if _is_dir(beside):
                    found.insert(0, beside)
            if not any(c.name.lower() in layout for c in children):
                found.append(d)  # a flat folder of models
            for f in found:
                if f not in roots:
                    roots.append(f)
        return roots

    def _listing(self, root: Path) -> list[_Entry]:
        if root not in self._listings:
            self._listings[root] = _listing(root)
        return self._listings[root]

    def _entries(self, root: Path, extensions: tuple[str, ...]) -> list[_Entry]:
        try:
            listing = self._listing(root)
        except TreeTooBig as exc:
            raise FieldError(f"{exc}, too many to search for models; keep your models in a"
                             " folder of their own") from None
        return [e for e in listing if e.is_dir or e.rel.lower().endswith(extensions)]

    # aliases ------------------------------------------------------------------------------
    def alias(self, kind: str, name: str) -> dict[str, Any] | None:
        """The alias mapping for ``name`` as ``kind`` (``source`` always set), or None."""
        value = self.aliases.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            return {"source": value}
        if not isinstance(value, Mapping):
            raise FieldError(f"models.{name}: expected a name, path, hub id or mapping")
        unknown = sorted(set(value) - set(ALIAS_KEYS))
        if unknown:
            raise FieldError(
                f"models.{name}: unknown key {unknown[0]!r}; allowed: {', '.join(ALIAS_KEYS)}"
            )
        kinds = value.get("kind")
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            if kind not in kinds:
                return None
        if not value.get("source"):
            raise FieldError(f"models.{name}: a mapping needs 'source:'")
        return dict(value)

    # finding ------------------------------------------------------------------------------
    def locate(self, kind: str, name: str) -> Resolved:
        """Like :meth:`find`, also returning the alias options (``allow_pickle`` ...)."""
        if not isinstance(name, str) or not name.strip():
            raise FieldError(f"{kind} name must be a non-empty string")
        # Remembered: preflight asks again for every task, and folders don't change mid-run.
        found = self._located.get((kind, name))
        if found is None:
            try:
                options = self.alias(kind, name) or {}
                target = str(options.get("source", name))
                path = self._find_path(kind, target, name)
                self._check_pickle(kind, name, path, options)
                found = Resolved(path, options)
            except FieldError as exc:
                found = exc
            self._located[(kind, name)] = found
        if isinstance(found, FieldError):
            raise FieldError(found.message, found.subkey)
        return found

    def find(self, kind: str, name: str) -> Path:
        """The file or folder ``name`` means as a ``kind``; FieldError says where it looked."""
        return self.locate(kind, name).path

    def _find_path(self, kind: str, target: str, asked: str) -> Path:
        """Explicit path, then the model folders, then a path relative to the job, then hub."""
        norm = target.replace("\\", "/")
        explicit = norm.startswith(("/", "./", "../", "~")) or Path(norm).is_absolute()
        candidate = self._abs(Path(norm))
        if explicit:
            if candidate.exists():
                return candidate.resolve()
            raise FieldError(f"{kind} '{asked}': no such file or folder: {candidate}")
        hit = self._search(kind, norm)
        if hit is not None:
            return hit
        if candidate.exists():
            return candidate.resolve()
        if _HUB_ID.match(norm):
            snap = hub_snapshot(norm)
            if snap is not None:
                return snap
        raise FieldError(self._not_found(kind, asked, norm))

    def _search(self, kind: str, name: str) -> Path | None:
        extensions = self.kind(kind).extensions
        has_ext = Path(name).suffix.lower() in extensions
        for root in self.search_dirs(kind):
            entries = self._entries(root, extensions)
            for fold in (False, True):
                hits = [e for e in entries if _matches(e, name, has_ext, fold)]
                if hits:
                    return _pick(hits, name, root, kind, extensions)
        return None

    def _not_found(self, kind: str, asked: str, target: str) -> str:
        spec = self.kind(kind)
        dirs = self.search_dirs(kind)
        stems = sorted({e.stem_rel for d in dirs for e in self._entries(d, spec.extensions)})
        names = sorted({Path(s).name for s in stems})
        close = difflib.get_close_matches(Path(target).name, names, n=3, cutoff=0.6)
        expected = " or ".join(sorted(set(spec.folders), key=str.lower))
        if dirs:
            where = "in " + ", ".join(str(d) for d in dirs)
        else:
            existing = [str(d) for d in self._usable_dirs()]
            tried = ", ".join(str(d) for d in self.model_dirs) or "none given"
            where = (
                f"in no folder: model_dirs ({', '.join(existing)}) hold no folder named "
                f"{expected}" if existing else
                f"in no folder: no model_dirs entry ({tried}) can be searched (see the"
                " model_dirs errors)" if self.dir_errors() else
                f"in no folder: model_dirs ({tried}: none of them exists)"
            )
        msg = (
            f"{kind} '{asked}' not found: looked for '{target}' (extension optional: "
            f"{', '.join(spec.extensions)}, or a diffusers folder) {where}"
        )
        if _HUB_ID.match(target):
            msg += (
                f"; '{target}' is not in the local Hugging Face cache either (render never"
                f" downloads during a run: `huggingface-cli download {target}` first)"
            )
        if asked not in self.aliases:
            msg += "; not an alias in models: either"
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        return msg

    def _check_pickle(self, kind: str, name: str, path: Path, options: Mapping[str, Any]) -> None:
        if options.get("allow_pickle") is True or self.kind(kind).weights_only_pickles:
            return
        try:
            pickles = pickle_files(path)
        except TreeTooBig as exc:
            raise FieldError(f"{kind} '{name}': {exc}; that is no model folder") from None
        if not pickles:
            return
        shown = pickles[0] if path.is_dir() else path
        read = (" (diffusers/transformers would read it: a .safetensors file beside it counts"
                " only under the name they load)" if path.is_dir() else "")
        raise FieldError(
            f"{kind} '{name}': {shown} is a pickle ({shown.suffix}){read} and loading a pickle"
            f" can run code, so render refuses it. Convert it to .safetensors, or, if you trust the"
            f" file, alias it in models: with allow_pickle, e.g. `{name}: {{source: {path},"
            f" allow_pickle: true}}` (it is then read with torch's weights-only unpickler)"
        )

    # references ---------------------------------------------------------------------------
    def file_ref(self, kind: str, name: str, path: Path | str) -> FileRef:
        """A hashed reference to a found file (cached per run by kind and path)."""
        path = Path(path)
        key = (kind, str(path))
        if key in self._refs:
            ref = self._refs[key]
            return ref if ref.name == name else _renamed(ref, name)
        if kind == "image":   # an input that cannot be decoded fails here, not at render
            check_image(path)
        sha = file_sha256(path, self.hash_cache)
        extra: dict[str, Any] = {}
        family: str | None = None
        spec = self.kinds.get(kind)   # "image" and other plain files have no registration
        if kind == "checkpoint":
            family = checkpoint_info(path).family
        elif spec is not None and spec.family:
            family = detect_family(path, kind)
        for label, hash_of in (spec.hashes if spec else {}).items():
            algo, length = hash_spec(hash_of)
            if algo == "addnet" and not path.is_file():
                continue   # A1111's LoRA hash is defined for single files only
            if algo == "legacy":
                extra[label] = legacy_model_hash(path)
                continue
            full = lora_full_hash(path, self.hash_cache) if algo == "addnet" else sha
            extra[label] = full[:length] if length else full
        if (self.alias(kind, name) or {}).get("allow_pickle") is True:
            extra["allow_pickle"] = True
        ref = FileRef(kind, name, str(path), sha, sha[:10], family, False, extra)
        self._refs[key] = ref
        return ref

    def resolve_model(self, name: str) -> FileRef:
        """The checkpoint ``name`` as a FileRef: hashes, family and how to load it.

        ``extra`` holds ``format`` (diffusers | single_file), ``in_channels``, ``config``
        (the diffusers config folder a single file loads with, or None for the shipped one
        named by ``shipped_config``), ``prediction`` (v | epsilon | None = unknown),
        ``allow_pickle`` and ``vae`` (the alias's VAE name, if any).
        """
        found = self.locate("checkpoint", name)
        base = self.file_ref("checkpoint", name, found.path)
        info = checkpoint_info(found.path)
        opts = found.options
        prediction = opts.get("prediction")
        if prediction not in (None, "v", "epsilon"):
            raise FieldError(f"models.{name}.prediction: expected 'v' or 'epsilon'")
        extra: dict[str, Any] = {
            "format": info.format,
            "in_channels": info.in_channels,
            "allow_pickle": bool(opts.get("allow_pickle")),
            "vae": opts.get("vae"),
            "config": None,
            "shipped_config": None,
            "prediction": prediction or prediction_hint(found.path),
        }
        if info.format == "single_file":
            config, shipped = self.single_file_config(name, found.path, info, extra["prediction"])
            extra["config"] = str(config) if config else None
            extra["shipped_config"] = shipped
        return FileRef(
            "checkpoint", name, base.path, base.sha256, base.short_hash, info.family, False, extra
        )

    def single_file_config(
        self, name: str, path: Path, info: CheckpointInfo, prediction: str | None
    ) -> tuple[Path | None, str | None]:
        """Which diffusers config a single file loads with: (folder, None) or (None, shipped).

        1. the alias's ``config:`` (a diffusers folder: path, checkpoint name or cached hub id);
        2. a diffusers folder beside the file with the same stem (``x/`` next to
           ``x.safetensors``) holding a model_index.json;
        3. a config shipped in ``render/configs/`` for the family: sd15, sdxl, and for SD 2.x
           ``sd2`` (768, v-prediction) or ``sd2-base`` (512, epsilon, also when unknown: the
           engine then probes the UNet). Its UNet width and context must match the file.
        """
        opts = self.alias("checkpoint", name) or {}
        if opts.get("config"):
            cfg = self._find_path("checkpoint", str(opts["config"]), str(opts["config"]))
            if not (cfg / "model_index.json").is_file():
                raise FieldError(
                    f"models.{name}.config: {cfg} is not a diffusers folder (no model_index.json)"
                )
            return cfg, None
        beside = path.with_suffix("")
        if (beside / "model_index.json").is_file():
            return beside, None
        if info.in_channels == 5:
            raise FieldError(
                f"checkpoint '{name}': a depth (5-channel) single file needs its diffusers"
                f" config: models: {{{name}: {{source: ..., config: <diffusers folder>}}}}"
            )
        shipped = {"sd1": "sd15", "sdxl": "sdxl"}.get(info.family) or (
            "sd2" if prediction == "v" else "sd2-base"
        )
        want = SHIPPED_CONFIGS[shipped]
        if (info.width, info.context_dim) != (want["width"], want["context"]):
            raise FieldError(
                f"checkpoint '{name}' ({path.name}) has a UNet {info.width} wide with a"
                f" {info.context_dim}-wide context, which matches no shipped config ({shipped}:"
                f" {want['width']}/{want['context']}); name its diffusers config folder:"
                f" models: {{{name}: {{source: {path.name}, config: <folder>}}}}"
            )
        return None, shipped

    def resolve_vae(self, name: str) -> FileRef:
        """A VAE override (file, diffusers folder, or a pipeline folder's ``vae/``)."""
        return self.file_ref("vae", name, self.find("vae", name))


def _matches(entry: _Entry, name: str, has_ext: bool, fold: bool) -> bool:
    rel = entry.rel if has_ext or entry.is_dir else entry.stem_rel
    if entry.is_dir and has_ext:
        return False
    if fold:
        rel, name = rel.lower(), name.lower()
    return rel == name or rel.endswith("/" + name)


def _pick(hits: list[_Entry], name: str, root: Path, kind: str,
          extensions: tuple[str, ...]) -> Path:
    exact = [e for e in hits if e.stem_rel.lower() == name.lower() or e.rel.lower() == name.lower()]
    hits = exact or hits
    places = sorted({e.stem_rel for e in hits})
    if len(places) > 1:
        raise FieldError(
            f"{kind} '{name}' is ambiguous in {root}: {', '.join(places)}; write the subfolder,"
            f" e.g. '{places[0]}'"
        )
    return min(hits, key=lambda e: _ext_rank(e, extensions)).path.resolve()


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


#: The weight files ``from_pretrained`` reads from a component folder, in the order it looks:
#: diffusers' ModelMixin (a sharded index, else the single safetensors file, else the pickle)
#: and transformers' PreTrainedModel. render passes no ``variant``, so ``*.fp16.*`` files are
#: never read. (name, is a sharded index).
DIFFUSERS_WEIGHTS = (("diffusion_pytorch_model.safetensors.index.json", True),
                     ("diffusion_pytorch_model.safetensors", False),
                     ("diffusion_pytorch_model.bin", False))
TRANSFORMERS_WEIGHTS = (("model.safetensors", False), ("model.safetensors.index.json", True),
                        ("pytorch_model.bin", False), ("pytorch_model.bin.index.json", True))


def pickle_files(path: Path) -> list[Path]:
    """The pickle files loading ``path`` would read.

    A file: itself, if a pickle. A folder: for each component folder, the files diffusers or
    transformers would pick there (see :data:`DIFFUSERS_WEIGHTS`); both rules are applied, so
    whichever library loads a component, a pickle it would read is listed, and a decoy
    ``.safetensors`` it would not read hides nothing. In a folder neither rule knows, every
    pickle counts. The root of a pipeline folder (``model_index.json``) is not a component:
    diffusers reads no weights there (a ``v1-5-pruned.ckpt`` kept beside them is ignored).
    """
    if not path.is_dir():
        return [path] if path.suffix.lower() in PICKLE_EXTS else []
    pipeline = (path / "model_index.json").is_file()
    out: list[Path] = []
    for dirpath, _dirs, _files in walk(path):
        folder = Path(dirpath)
        if pipeline and folder == path:
            continue
        reads = component_reads(folder)
        if reads is None:
            reads = [folder / f for f in _files]
        out.extend(f for f in reads if f.suffix.lower() in PICKLE_EXTS)
    return out


def component_reads(folder: Path) -> list[Path] | None:
    """The weight files ``from_pretrained(folder)`` reads under diffusers' rule and under
    transformers' (including a config's ``transformers_weights``), shards of a sharded
    index included; None when neither rule finds a file here."""
    explicit = _explicit_weights(folder)
    rules = [DIFFUSERS_WEIGHTS,
             ((explicit, explicit.endswith(".index.json")),) if explicit else TRANSFORMERS_WEIGHTS]
    reads: list[Path] = []
    found = False
    for rule in rules:
        for name, sharded in rule:
            file = folder / name
            if file.is_file():
                reads.extend(_shards(file) if sharded else [file])
                found = True
                break
    return reads if found else None


def _explicit_weights(folder: Path) -> str | None:
    """A transformers ``config.json``'s ``transformers_weights``: the file it loads first."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("transformers_weights") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names (its ``weight_map`` values); a
    shard is loaded by its extension, so a pickle named in a safetensors index is a pickle."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []   # loading fails on an unreadable index: nothing is read
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return [index.parent / v for v in sorted({v for v in weight_map.values()
                                              if isinstance(v, str)})]


def _renamed(ref: FileRef, name: str) -> FileRef:
    return FileRef(ref.kind, name, ref.path, ref.sha256, ref.short_hash, ref.family, ref.hub,
                   ref.extra)


def installed_kinds() -> dict[str, ModelKind]:
    """The kinds the core and the installed plugins register (for resolvers made without a
    run's plugins, e.g. in scripts and tests); loaded once per process."""
    global _installed_kinds
    if _installed_kinds is None:
        from render.plugins import load_plugins

        _installed_kinds = load_plugins().kinds()
    return _installed_kinds


_installed_kinds: dict[str, ModelKind] | None = None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub repo in the HF cache, or None (never downloads)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if snapshots.is_dir():
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


