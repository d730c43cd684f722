"""Find the files a job names, hash them, and tell which model family they belong to.

Validation and ``--dry-run`` run this without torch (it is never imported here): shapes come
from safetensors headers read as JSON, or from a pickle read by an unpickler that builds
nothing but shapes. A user coming from AUTOMATIC1111 or ComfyUI points ``model_dirs`` at their
``models/`` folder and writes names the way those tools show them.

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

Hashes: ``sha256`` is the full sha256 of the file (A1111's "Model hash" is its first 10
characters). For a diffusers folder it is the sha256 of a manifest listing, in sorted order,
``<sha256 of file>  <relative path>`` for every weight and config file
(``*.safetensors *.bin *.ckpt *.pt *.pth *.json *.txt``), so it changes when any weight or
config does. Every file's hash is cached in SQLite by (path, size, mtime) under
``$RENDER_CACHE_DIR`` or ``~/.cache/render/``.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import os
import pickle
import re
import sqlite3
import struct
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from render.errors import FieldError
from render.tasks import FileRef

#: Weight file extensions, in the order a name without extension tries them.
SAFE_EXTS = (".safetensors", ".sft")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXTS = SAFE_EXTS + PICKLE_EXTS

#: Folder names (any case) holding each kind, A1111 names first, then ComfyUI's.
KIND_DIRS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("Stable-diffusion", "checkpoints", "diffusers"),
    "lora": ("Lora", "LyCORIS", "loras"),
    "vae": ("VAE", "vae"),
    "controlnet": ("ControlNet", "controlnet"),
    "upscaler": ("ESRGAN", "RealESRGAN", "upscale_models"),
    "embedding": ("embeddings",),
    "motion_module": ("AnimateDiff", "animatediff_models"),
    "motion_lora": ("animatediff_motion_lora",),
    "annotator": ("annotator", "Annotators", "ControlNetPreprocessor"),
}
KINDS = tuple(KIND_DIRS)
_LAYOUT_NAMES = {n.lower() for names in KIND_DIRS.values() for n in names}

#: Files hashed for a diffusers folder (weights and the configs that also decide pixels).
_FOLDER_HASH_EXTS = WEIGHT_EXTS + (".json", ".txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1024 * 1024

#: Shipped diffusers configs (in ``render/configs/``) and the UNet facts each expects.
SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {"family": "sd1", "width": 320, "context": 768},
    "sd2": {"family": "sd2", "width": 320, "context": 1024},
    "sd2-base": {"family": "sd2", "width": 320, "context": 1024},
    "sdxl": {"family": "sdxl", "width": 320, "context": 2048},
}

#: Keys an alias mapping may carry besides ``source``.
ALIAS_KEYS = ("source", "vae", "config", "allow_pickle", "prediction", "kind")


def cache_dir() -> Path:
    """``$RENDER_CACHE_DIR`` or ``~/.cache/render``: hash cache, materialised configs."""
    env = os.environ.get("RENDER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "render"


# -- hashing --------------------------------------------------------------------------------
class HashCache:
    """Hashes by (path, size, mtime_ns) in SQLite, so a file is read once until it changes.

    SQLite rather than a JSON file because two runs (cron and a manual one) may hash at once.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "hashes.sqlite"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.computed = 0  # how many hashes were computed (not served from the cache)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
            db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT, algo TEXT, size INTEGER,"
                " mtime_ns INTEGER, value TEXT, PRIMARY KEY (path, algo))"
            )
            db.commit()
            self._db = db
        return self._db

    def get(self, path: Path, algo: str, compute: Any) -> str:
        """The cached ``algo`` hash of ``path``, computing (and storing) it when stale."""
        path = Path(os.path.abspath(path))
        st = path.stat()
        with self._lock:
            row = self._conn().execute(
                "SELECT size, mtime_ns, value FROM hashes WHERE path=? AND algo=?",
                (str(path), algo),
            ).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        value = compute(path)
        self.computed += 1
        with self._lock:
            db = self._conn()
            db.execute(
                "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                (str(path), algo, st.st_size, st.st_mtime_ns, value),
            )
            db.commit()
        return value


_default_cache: HashCache | None = None


def default_hash_cache() -> HashCache:
    global _default_cache
    if _default_cache is None or _default_cache.path != cache_dir() / "hashes.sqlite":
        _default_cache = HashCache()
    return _default_cache


def _sha256_stream(path: Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Full sha256 of a file's bytes (what ``sha256sum`` and A1111 print)."""
    return _sha256_stream(Path(path))


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's bytes after its header (kohya's "addnet" hash).

    A1111 uses it as a LoRA's hash, so it survives edits of the metadata.
    """
    n = _header_length(Path(path))
    return _sha256_stream(Path(path), 8 + n)


def file_sha256(path: str | Path, cache: HashCache | None = None) -> str:
    """sha256 of a file, or of a diffusers folder's manifest (see the module docstring)."""
    cache = cache or default_hash_cache()
    path = Path(path)
    if path.is_dir():
        lines = []
        for rel, file in _folder_files(path):
            lines.append(f"{cache.get(file, 'sha256', sha256_file)}  {rel}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    return cache.get(path, "sha256", sha256_file)


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Weight and config files under a diffusers folder, sorted by relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(_FOLDER_HASH_EXTS):
                continue
            file = Path(dirpath) / name
            out.append((file.relative_to(folder).as_posix(), file))
    return sorted(out)


#: The name other modules use for :func:`file_sha256`.
sha256_of = file_sha256


def lora_hash(path: str | Path, cache: HashCache | None = None) -> str:
    """The hash A1111 writes for a LoRA in ``Lora hashes`` (12 hex characters).

    As A1111's Lora extension does: the ``sshs_model_hash`` metadata value when the file has
    one, else the addnet hash (safetensors) or the full-file sha256 (other formats); then its
    first 12 characters.
    """
    return lora_full_hash(path, cache)[:12]


def lora_full_hash(path: str | Path, cache: HashCache | None = None) -> str:
    """The untruncated hash behind :func:`lora_hash`."""
    cache = cache or default_hash_cache()
    path = Path(path)
    if path.suffix.lower() in SAFE_EXTS:
        meta = read_safetensors_header(path).get("__metadata__") or {}
        if meta.get("sshs_model_hash"):
            return str(meta["sshs_model_hash"])
        return cache.get(path, "addnet", addnet_hash)
    return file_sha256(path, cache)


# -- headers --------------------------------------------------------------------------------
def _header_length(path: Path) -> int:
    with open(path, "rb") as fh:
        raw = fh.read(8)
    if len(raw) != 8:
        raise FieldError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    n = struct.unpack("<Q", raw)[0]
    if n > _MAX_HEADER or n + 8 > path.stat().st_size:
        raise FieldError(f"{path}: not a safetensors file (header length {n} is impossible)")
    return n


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    path = Path(path)
    n = _header_length(path)
    with open(path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise FieldError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise FieldError(f"{path}: not a safetensors file (header is not a mapping)")
    return header


class _Shape(tuple):
    """A tensor stand-in: just its shape."""


class _Stub:
    """Any other object a checkpoint pickles (optimizer state, callbacks): ignored."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()


def _rebuild_tensor(storage: Any, offset: Any, size: Any, *rest: Any) -> _Shape:
    return _Shape(tuple(size))


class _ShapeUnpickler(pickle.Unpickler):
    """Reads tensor shapes from a torch pickle without importing or running anything.

    ``find_class`` never imports: it answers with inert stand-ins, so a malicious pickle
    gets no code to run. Only dicts, lists and shapes come out.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        return None


def read_pickle_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a torch pickle checkpoint, read safely (no torch, no code)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                with zf.open(member) as fh:
                    obj = _ShapeUnpickler(fh).load()
        else:  # legacy format: magic, protocol, sys info, then the object
            with open(path, "rb") as fh:
                for _ in range(3):
                    _ShapeUnpickler(fh).load()
                obj = _ShapeUnpickler(fh).load()
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot read this file"
        raise FieldError(f"{path}: cannot read tensor shapes from this pickle ({exc})") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FieldError(f"{path}: the pickle holds no state dict")
    return {str(k): tuple(v) for k, v in obj.items() if isinstance(v, _Shape)}


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single weight file (safetensors or pickle)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_EXTS:
        return read_pickle_shapes(path)
    header = read_safetensors_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix.lower() not in SAFE_EXTS:
        return {}
    return dict(read_safetensors_header(path).get("__metadata__") or {})


# -- family detection -----------------------------------------------------------------------
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_UNET = "model.diffusion_model."


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's structure says about it (no weights read)."""

    family: str
    format: str                  # "diffusers" | "single_file"
    in_channels: int = 4         # 4 plain, 9 inpainting, 5 depth
    context_dim: int | None = None
    width: int | None = None     # first UNet block's channels (320 for real SD)
    pipeline_class: str | None = None  # a diffusers folder's model_index class


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FieldError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise FieldError(f"{path}: expected a JSON object")
    return data


def _context_of(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Family and structure of a checkpoint file or diffusers folder, from shapes/configs.

    The rule works for real models (by dimensions) and for the tiny test kit (by structure):
    a second text encoder (``conditioner.embedders.1``, ``label_emb``, ``text_encoder_2``,
    ``addition_embed_type: text_time``) means sdxl; a 5-channel (depth) UNet, an OpenCLIP
    text encoder or a 1024-wide cross-attention context means sd2; anything else is sd1.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_info(path)
    shapes = tensor_shapes(path)
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise FieldError(f"{path}: not a Stable Diffusion checkpoint (no {_UNET}* UNet weights)")
    width, in_ch = int(conv_in[0]), int(conv_in[1])
    context = next(
        (int(s[1]) for k, s in sorted(shapes.items())
         if k.startswith(_UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2),
        None,
    )
    xl = any(
        k.startswith(("conditioner.embedders.1.", _UNET + "label_emb.")) for k in shapes
    )
    openclip = any(k.startswith("cond_stage_model.model.") for k in shapes)
    if xl:
        family = "sdxl"
    elif in_ch == 5 or openclip or context == 1024:
        family = "sd2"
    else:
        family = "sd1"
    return CheckpointInfo(family, "single_file", in_ch, context, width)


def _folder_info(path: Path) -> CheckpointInfo:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FieldError(f"{path}: a folder model needs a diffusers model_index.json")
    index = _read_json(index_file)
    unet_file = path / "unet" / "config.json"
    unet = _read_json(unet_file) if unet_file.is_file() else {}
    context = _context_of(unet.get("cross_attention_dim"))
    in_ch = int(unet.get("in_channels") or 4)
    blocks = unet.get("block_out_channels") or [None]
    has_te2 = bool((index.get("text_encoder_2") or [None])[0])
    if has_te2 or unet.get("addition_embed_type") == "text_time" or context == 2048:
        family = "sdxl"
    elif in_ch == 5 or "depth_estimator" in index or context == 1024:
        family = "sd2"
    else:
        family = "sd1"
    return CheckpointInfo(
        family, "diffusers", in_ch, context, blocks[0], index.get("_class_name")
    )


def detect_family(path: str | Path, kind: str = "checkpoint") -> str | None:
    """"sd1", "sd2" or "sdxl" from tensor shapes or configs, never from names.

    For a checkpoint the answer is always one of the three (see :func:`checkpoint_info`).
    For other kinds it is best effort and None when the dimensions are not SD's (a LoRA or
    ControlNet of the tiny kit has 32-wide layers; only structure can place those).
    """
    if kind == "checkpoint":
        return checkpoint_info(path).family
    path = Path(path)
    try:
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                return None
            config = _read_json(config_file)
            if config.get("addition_embed_type") == "text_time":
                return "sdxl"
            return _CONTEXT_FAMILY.get(_context_of(config.get("cross_attention_dim")) or 0)
        shapes = tensor_shapes(path)
    except FieldError:
        return None
    if kind == "embedding":
        if "clip_g" in shapes:
            return "sdxl"
        vec = shapes.get("emb_params") or next(iter(shapes.values()), None)
        return {768: "sd1", 1024: "sd2"}.get(vec[-1] if vec else 0)
    if any(("lora_te2_" in k or "text_encoder_2." in k or "label_emb" in k) for k in shapes):
        return "sdxl"
    for key, shape in sorted(shapes.items()):
        if re.search(r"attn2[._]to_k", key) and len(shape) == 2:
            # LoRA down/A: (rank, context); a full weight: (inner, context)
            found = _CONTEXT_FAMILY.get(int(shape[1]))
            if found:
                return found
    return None


def prediction_hint(path: str | Path) -> str | None:
    """"v" or "epsilon" when the file says so; None when it cannot be known from the file.

    SD 2.x 768-v and 512-base checkpoints have identical shapes, so shapes cannot decide.
    Read in order: safetensors metadata ``modelspec.prediction_type``, then an A1111-style
    original config ``<stem>.yaml`` beside the file (``parameterization: "v"``).
    """
    path = Path(path)
    if path.is_dir():
        return None
    meta = safetensors_metadata(path)
    value = str(meta.get("modelspec.prediction_type", "")).lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v"
    if value in ("epsilon", "eps"):
        return "epsilon"
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        import yaml

        try:
            config = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        params = (config.get("model") or {}).get("params") or {}
        return "v" if params.get("parameterization") == "v" else "epsilon"
    return None


def is_v_prediction(path: str | Path) -> bool | None:
    """True/False when the file tells (see :func:`prediction_hint`), None when unknown."""
    hint = prediction_hint(path)
    return None if hint is None else hint == "v"


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


def _ext_rank(entry: _Entry) -> int:
    """Preference among equally named hits: safetensors, pickles, then folders."""
    if entry.is_dir:
        return len(WEIGHT_EXTS)
    ext = Path(entry.rel).suffix.lower()
    return WEIGHT_EXTS.index(ext) if ext in WEIGHT_EXTS else len(WEIGHT_EXTS) + 1


def _is_model_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "config.json").is_file()


def _scan(root: Path) -> list[_Entry]:
    """Weight files and model folders under ``root`` (recursive, symlinks followed once)."""
    entries: list[_Entry] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            full = Path(dirpath) / d
            if _is_model_dir(full):
                entries.append(_Entry(full.relative_to(root).as_posix(), full, True))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.lower().endswith(WEIGHT_EXTS) and not name.startswith("."):
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
    ) -> None:
        self.base_dir = Path(base_dir)
        self.model_dirs = [self._abs(Path(d)) for d in model_dirs]
        self.aliases = dict(aliases or {})
        self.hash_cache = hash_cache
        self._index: dict[Path, list[_Entry]] = {}
        self._refs: dict[tuple[str, str], FileRef] = {}
        self._located: dict[tuple[str, str], Resolved | FieldError] = {}

    # folders ------------------------------------------------------------------------------
    def _abs(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def search_dirs(self, kind: str) -> list[Path]:
        """The folders searched for ``kind``, in order (existing ones only)."""
        if kind not in KIND_DIRS:
            raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        wanted = {n.lower() for n in KIND_DIRS[kind]}
        roots: list[Path] = []
        for d in self.model_dirs:
            if not d.is_dir():
                continue
            children = sorted(c for c in d.iterdir() if c.is_dir())
            found = [c for c in children if c.name.lower() in wanted]
            if kind == "embedding":
                beside = d.parent / "embeddings"
                if beside.is_dir():
                    found.insert(0, beside)
            if not any(c.name.lower() in _LAYOUT_NAMES for c in children):
                found.append(d)  # a flat folder of models
            for f in found:
                if f not in roots:
                    roots.append(f)
        return roots

    def _entries(self, root: Path) -> list[_Entry]:
        if root not in self._index:
            self._index[root] = _scan(root)
        return self._index[root]

    def refresh(self) -> None:
        """Forget the folder listings (after files were added)."""
        self._index.clear()
        self._refs.clear()

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
        has_ext = Path(name).suffix.lower() in WEIGHT_EXTS
        for root in self.search_dirs(kind):
            entries = self._entries(root)
            for fold in (False, True):
                hits = [e for e in entries if _matches(e, name, has_ext, fold)]
                if hits:
                    return _pick(hits, name, root, kind)
        return None

    def _not_found(self, kind: str, asked: str, target: str) -> str:
        dirs = self.search_dirs(kind)
        stems = sorted({e.stem_rel for d in dirs for e in self._entries(d)})
        names = sorted({Path(s).name for s in stems})
        close = difflib.get_close_matches(Path(target).name, names, n=3, cutoff=0.6)
        expected = " or ".join(sorted(set(KIND_DIRS[kind]), key=str.lower))
        if dirs:
            where = "in " + ", ".join(str(d) for d in dirs)
        else:
            existing = [str(d) for d in self.model_dirs if d.is_dir()]
            where = (
                f"in no folder: model_dirs ({', '.join(existing) or 'none of them exists'})"
                f" hold no folder named {expected}"
            )
        msg = (
            f"{kind} '{asked}' not found: looked for '{target}' (extension optional: "
            f"{', '.join(WEIGHT_EXTS)}, or a diffusers folder) {where}"
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
        pickles = _pickle_files(path)
        if not pickles or options.get("allow_pickle") is True:
            return
        shown = pickles[0] if path.is_dir() else path
        raise FieldError(
            f"{kind} '{name}': {shown} is a pickle ({shown.suffix}) and loading a pickle can run"
            f" code, so render refuses it. Convert it to .safetensors, or, if you trust the"
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
        sha = file_sha256(path, self.hash_cache)
        extra: dict[str, Any] = {}
        family: str | None = None
        if kind == "checkpoint":
            family = checkpoint_info(path).family
        elif kind in ("lora", "controlnet", "embedding", "motion_lora"):
            family = detect_family(path, kind)
        if kind in ("lora", "motion_lora") and path.is_file():
            full = lora_full_hash(path, self.hash_cache)
            extra = {"lora_hash": full[:12], "addnet_hash": full}
        elif kind == "embedding":
            extra = {"ti_hash": sha[:12]}
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


def _pick(hits: list[_Entry], name: str, root: Path, kind: str) -> Path:
    exact = [e for e in hits if e.stem_rel.lower() == name.lower() or e.rel.lower() == name.lower()]
    hits = exact or hits
    places = sorted({e.stem_rel for e in hits})
    if len(places) > 1:
        raise FieldError(
            f"{kind} '{name}' is ambiguous in {root}: {', '.join(places)}; write the subfolder,"
            f" e.g. '{places[0]}'"
        )
    return min(hits, key=_ext_rank).path.resolve()


def _pickle_files(path: Path) -> list[Path]:
    """The pickle files that loading ``path`` would read (a folder: components without
    safetensors weights)."""
    if path.is_file():
        return [path] if path.suffix.lower() in PICKLE_EXTS else []
    out = []
    for _rel, file in _folder_files(path):
        if file.suffix.lower() in PICKLE_EXTS:
            siblings = list(file.parent.glob("*.safetensors"))
            if not siblings:
                out.append(file)
    return out


def _renamed(ref: FileRef, name: str) -> FileRef:
    return FileRef(ref.kind, name, ref.path, ref.sha256, ref.short_hash, ref.family, ref.hub,
                   ref.extra)


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


_Info = TypeVar("_Info")


def per_file_version(inspect: Callable[[Path], _Info]) -> Callable[[Path], _Info]:
    """Memoise ``inspect(path)`` per file version (path, size, mtime).

    Preflight asks about the same file for every task; a file replaced on disk is read anew.
    """
    cache: dict[tuple[str, int, int], _Info] = {}

    def cached(path: Path) -> _Info:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in cache:
            cache[key] = inspect(path)
        return cache[key]

    return cached
