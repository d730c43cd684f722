"""Textual-inversion embeddings: a file's name in a prompt is enough, as in A1111.

What it handles::

    defaults:
      negative: "EasyNegative, lowres"      # a file embeddings/easynegative.safetensors
    jobs:
      - name: hands
        prompt: "a pianist's hands, badhandv4"
        embeddings: [badhandv4]              # optional: also load these, fail early if missing

An embedding file in an embeddings folder (A1111's ``embeddings/`` beside ``models/``,
ComfyUI's ``models/embeddings/``, subfolders too) is used when its file name (without
extension) appears in the prompt or the negative prompt as a whole word, in any case, as
A1111 does: ``easynegative``, ``(EasyNegative:1.2)`` and ``easynegative,`` count,
``easynegatives`` does not. Text inside ``<...>`` tags does not count (the engine takes tags
out). ``embeddings:`` lists names (or aliases) to load in any case; each must exist, which
turns a typo into an error before anything renders instead of literal prompt text.

The normalised section (``task.sections["embeddings"]``) is the list of names as written,
duplicates removed: ``["badhandv4"]``. Each embedding a task uses, listed or found in its
text, is a file of the task: ``task.files["embedding:<file stem>"]``, whose ``extra`` holds
the ``token`` and the number of ``vectors``.

Preflight checks each embedding against the model: SD 1.x vectors are 768 wide, SD 2.x 1024;
SDXL embeddings hold a ``clip_l`` and a ``clip_g`` part. Using one with a model of another
family is an error naming both (A1111 silently skips such embeddings, leaving their name as
literal text: a night's renders would quietly differ from what the job says).

Rendering: each embedding is loaded once per pipeline with diffusers'
``load_textual_inversion`` (SDXL: ``clip_l`` into ``text_encoder``/``tokenizer``, ``clip_g``
into ``text_encoder_2``/``tokenizer_2``) under the token ``<file stem, lower case>``; an
n-vector embedding adds ``token, token_1 ... token_{n-1}``, which ``render.prompts`` expands.
The tokens are then marked ``single_word``: diffusers adds them as tokens that match anywhere,
even inside words, so once loaded ``tiny-emb`` would also change every later prompt saying
``tiny-embroidery``, and an image would depend on what rendered before it. Lower case
because CLIP's tokenizer lowercases the text before it matches added tokens. Embeddings do
not split batches: a loaded embedding changes only the prompts that name it. (One case is
refused at render time: a prompt naming an embedding that the pipeline loaded for another
job file while this task's own folders have no such file.)

Infotext: A1111's ``TI hashes: "name: hash, ..."`` for the embeddings the prompt or negative
prompt uses (hash: the first 12 hex characters of the file's sha256).

No torch at import time: validation and ``--dry-run`` load every plugin without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import (
    CONTEXT_FAMILY,
    PICKLE_EXTS,
    WEIGHT_EXTS,
    Batch,
    FieldContext,
    FieldError,
    FileRef,
    ModelKind,
    Result,
    Task,
    describe,
    family_text,
    hookimpl,
    load_state_dict,
    per_file_version,
    quiet_logger,
    section_axis_label,
    strip_extra_networks,
    tensor_shapes,
    walk_models,
)

KEY = "embeddings"
LABEL = "embedding:"


# -- load: the job key --------------------------------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    # A1111 keeps embeddings beside its models/ folder; ComfyUI inside it.
    register(ModelKind("embedding", folders=("embeddings",), beside=("embeddings",),
                       family=True, hashes={"ti_hash": "sha256:12"}, infotext="TI hashes"))


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section,
             doc="textual-inversion embeddings to load (names in prompts load by themselves)")


def validate_section(value: Any, ctx: FieldContext | None = None) -> list[str]:
    """A name or a list of names -> the list, duplicates removed, order kept."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise FieldError(f"expected a list of embedding names, got {describe(value)}")
    names: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or not str(
                item).strip():
            raise FieldError(f"expected an embedding name, got {describe(item)}", subkey=str(i))
        name = str(item).strip()
        if name not in names:
            names.append(name)
    return names


# -- plan (preflight): which embeddings, and do they fit the model ------------------------------

def visible_text(text: str) -> str:
    """What the text encoder sees of a prompt, as far as names go: tags taken out."""
    return strip_extra_networks(text, " ")


def word_pattern(names: Iterator[str] | list[str] | set[str]) -> re.Pattern[str] | None:
    """One regex finding any of ``names`` as a whole word, any case, longest name first.

    "Whole word" is what the tokenizer's ``single_word`` tokens match: no letter, digit or
    ``_`` right before or after.
    """
    ordered = sorted(set(names), key=lambda n: (-len(n), n))
    if not ordered:
        return None
    alternatives = "|".join(re.escape(n) for n in ordered)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


_DIR_CACHE: dict[tuple[str, ...], tuple[dict[str, str], re.Pattern[str] | None]] = {}
#: Per resolver: its embedding folders.
_ROOTS: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def available(models: Any) -> tuple[dict[str, str], re.Pattern[str] | None]:
    """Embedding names in the resolver's embedding folders: ``{lower stem: stem}`` and a
    pattern finding any of them (cached per set of folders for the run)."""
    if models not in _ROOTS:
        _ROOTS[models] = tuple(str(p) for p in models.search_dirs("embedding"))
    roots = _ROOTS[models]
    if roots not in _DIR_CACHE:
        names: dict[str, str] = {}
        for root in roots:
            # Bounded like the core's model search: a link loop or a link to /proc ends.
            for _dirpath, _dirnames, filenames in walk_models(Path(root)):
                for filename in filenames:
                    stem, ext = os.path.splitext(filename)
                    if ext.lower() in WEIGHT_EXTS:
                        names.setdefault(stem.lower(), stem)
        _DIR_CACHE[roots] = (names, word_pattern(names.values()))
    return _DIR_CACHE[roots]


@dataclass(frozen=True)
class EmbeddingInfo:
    """What an embedding file's tensor shapes say, read without torch."""

    families: frozenset[str] | None   # None: cannot be told (an A1111 .pt nests its tensor)
    reason: str
    vectors: int | None


def inspect_embedding(path: Path) -> EmbeddingInfo:
    """Family and vector count of a textual-inversion file from its header or pickle."""
    shapes = tensor_shapes(path)
    if "clip_l" in shapes and "clip_g" in shapes:
        return EmbeddingInfo(frozenset({"sdxl"}), "it holds clip_l and clip_g vectors",
                             _count(shapes["clip_l"]))
    vec = shapes.get("emb_params") or shapes.get("string_to_param.*")
    if vec is None and len(shapes) == 1:
        vec = next(iter(shapes.values()))
    if vec is None:
        if not shapes and path.suffix.lower() in PICKLE_EXTS:
            return EmbeddingInfo(None, "", None)
        raise FieldError(f"{path} is not a textual-inversion embedding (tensors: "
                         f"{', '.join(sorted(shapes)[:5]) or 'none'})")
    width = int(vec[-1]) if vec else 0
    family = CONTEXT_FAMILY.get(width) if width != 2048 else None  # SDXL needs two
    if family:
        return EmbeddingInfo(frozenset({family}), f"its vectors are {width} wide", _count(vec))
    return EmbeddingInfo(frozenset({"sd1", "sd2"}),
                         "it has vectors for one text encoder; SDXL needs two", _count(vec))


def _count(shape: tuple[int, ...]) -> int:
    return int(shape[0]) if len(shape) == 2 else 1


#: ``inspect_embedding`` once per file version: preflight asks for every task.
_cached_info = per_file_version(inspect_embedding)


@hookimpl
def task_files(task: Task, models: Any) -> dict[str, FileRef] | None:
    """Every embedding the task uses: listed ones, then names found in its prompts.

    Returns ``{"embedding:<file stem>": FileRef}``; raises FieldError for a listed name that
    does not exist or an embedding made for another family than the model.
    """
    wanted: dict[str, tuple[str, Path, str, str]] = {}  # token -> (name, path, origin, subkey)

    def add(name: str, path: Path, origin: str, subkey: str) -> None:
        token = path.stem.lower()
        other = wanted.get(token)
        if other and other[1] != path:
            raise FieldError(f"embeddings {other[1]} and {path} both have the name "
                             f"{path.stem!r}; rename one", subkey=subkey)
        wanted.setdefault(token, (name, path, origin, subkey))

    for i, name in enumerate(task.sections.get(KEY) or []):
        try:
            path = models.find("embedding", name)
        except FieldError as exc:
            raise FieldError(exc.message, subkey=str(i)) from None
        add(name, path, "", str(i))
    names, pattern = available(models)
    if pattern is not None:
        for label, text in (("prompt", task.prompt), ("negative prompt", task.negative)):
            for match in pattern.finditer(visible_text(text)):
                stem = names[match.group(0).lower()]
                if stem.lower() in wanted:
                    continue
                try:
                    path = models.find("embedding", stem)
                except FieldError as exc:
                    raise FieldError(
                        f"{exc.message} (the {label} names embedding {stem!r})",
                        key="prompt" if label == "prompt" else "negative") from None
                add(stem, path, f", named in the {label}", "")
    if not wanted:
        return None
    model = task.files.get("model")
    model_family = model.family if model else None
    files: dict[str, FileRef] = {}
    for token, (name, path, origin, subkey) in wanted.items():
        info = _cached_info(path)
        if info.families and model_family and model_family not in info.families:
            raise FieldError(
                f"embedding {path.stem!r} ({path.name}{origin}) is for "
                f"{family_text(info.families)} ({info.reason}), but model {task.model!r} is "
                f"{family_text(model_family)}", subkey=subkey,
                key="" if subkey else ("negative" if "negative" in origin else "prompt"))
        ref = models.file_ref("embedding", name, path)
        family = next(iter(info.families)) if info.families and len(info.families) == 1 else None
        files[LABEL + path.stem] = dataclasses.replace(
            ref, family=family or ref.family,
            extra={**ref.extra, "token": token, "vectors": info.vectors},
        )
    return files


# -- render: load once per pipeline ------------------------------------------------------------

#: Per tokenizer (shared by every ``from_pipe`` view): token -> sha256 of the loaded file.
_LOADED: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


@hookimpl
def configure_pipeline(pipe: Any, batch: Batch) -> None:
    """Load the embeddings of every task of the batch that the pipeline does not have yet."""
    wanted: dict[str, FileRef] = {}
    for task in batch.tasks:
        for label, ref in task.files.items():
            if label.startswith(LABEL):
                wanted.setdefault(str(ref.extra.get("token") or Path(ref.path).stem.lower()),
                                  ref)
    for token, ref in wanted.items():
        _ensure_loaded(pipe, token, ref)
    _check_strays(pipe, batch)


def _check_strays(pipe: Any, batch: Batch) -> None:
    """Refuse a prompt naming a token this pipeline has loaded for another job file (whose
    folders hold that embedding) when the task's own folders do not: its pixels would depend
    on what rendered before it."""
    pairs = _encoders(pipe)
    loaded = _LOADED.get(pairs[0][0]) if pairs else None
    pattern = word_pattern(set(loaded or ()))
    if pattern is None:
        return
    for task in batch.tasks:
        mine = {str(ref.extra.get("token")) for label, ref in task.files.items()
                if label.startswith(LABEL)}
        for text in (task.prompt, task.negative):
            for match in pattern.finditer(visible_text(text)):
                if match.group(0).lower() not in mine:
                    raise RuntimeError(
                        f"task {task.job}#{task.index}: the prompt names {match.group(0)!r}, "
                        "an embedding loaded for another job file; this job's model_dirs "
                        "have no such embedding, so its image would depend on what ran before")


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def _ensure_loaded(pipe: Any, token: str, ref: FileRef) -> None:
    pairs = _encoders(pipe)
    if not pairs or not hasattr(pipe, "load_textual_inversion"):
        raise RuntimeError(f"{type(pipe).__name__} cannot load textual-inversion embeddings")
    registry = _LOADED.setdefault(pairs[0][0], {})
    if registry.get(token) == ref.sha256:
        return
    name = Path(ref.path).name
    if token in registry:
        raise RuntimeError(f"two different embedding files are named {token!r} in one run "
                           f"({name} is the second); rename one")
    for tokenizer, _ in pairs:
        if token in tokenizer.get_vocab():
            raise RuntimeError(f"embedding {name}: {token!r} is already a token of the "
                               "tokenizer, so its name cannot be told apart from the word; "
                               "rename the file")
    vectors = _vectors(ref)
    if len(vectors) != len(pairs):
        raise RuntimeError(f"embedding {name} has vectors for {len(vectors)} text encoder(s), "
                           f"{type(pipe).__name__} has {len(pairs)}")
    # transformers announces how it initialises the rows it then overwrites: noise here
    with quiet_logger("transformers"):
        for (tokenizer, text_encoder), vector in zip(pairs, vectors, strict=True):
            pipe.load_textual_inversion(vector, token=token, tokenizer=tokenizer,
                                        text_encoder=text_encoder)
            count = int(vector.shape[0]) if vector.dim() == 2 else 1
            _single_word(tokenizer, [token] + [f"{token}_{i}" for i in range(1, count)])
    registry[token] = ref.sha256


def _vectors(ref: FileRef) -> list[Any]:
    """The embedding's tensors, one per text encoder (A1111, diffusers and SDXL layouts)."""
    path = Path(ref.path)
    state = load_state_dict(path, allow_pickle=bool(ref.extra.get("allow_pickle")))
    if "clip_l" in state and "clip_g" in state:
        return [state["clip_l"], state["clip_g"]]
    params = state.get("string_to_param")
    if isinstance(params, Mapping) and params:
        return [next(iter(params.values()))]
    if "emb_params" in state:
        return [state["emb_params"]]
    tensors = [v for v in state.values() if hasattr(v, "shape")]
    if len(tensors) == 1:
        return tensors
    raise RuntimeError(f"{path}: not a textual-inversion embedding ({', '.join(sorted(state))})")


def _single_word(tokenizer: Any, tokens: list[str]) -> None:
    """Re-register added tokens as ``single_word`` so they never match inside a word."""
    from tokenizers import AddedToken

    before = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True) for t in tokens])
    after = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    if before != after:
        raise RuntimeError(f"re-registering {tokens[0]!r} as a whole-word token changed its "
                           f"ids ({before} -> {after}); this tokenizer is not supported")


# -- write: infotext -----------------------------------------------------------------------------

@hookimpl
def result_metadata(task: Task, result: Result) -> dict[str, str] | None:
    """A1111's ``TI hashes: "name: hash, ..."`` for the embeddings the prompts use."""
    refs = {label[len(LABEL):]: ref for label, ref in task.files.items()
            if label.startswith(LABEL)}
    pattern = word_pattern(refs)
    if pattern is None:
        return None
    text = visible_text(task.prompt) + "\n" + visible_text(task.negative)
    used = {m.group(0).lower() for m in pattern.finditer(text)}
    entries = []
    for stem, ref in sorted(refs.items()):
        short = ref.extra.get("ti_hash") or ref.sha256[:12]
        if stem.lower() in used and short:
            entries.append(f"{stem.replace(':', '').replace(',', '')}: {short}")
    if not entries:
        return None
    return {"TI hashes": json.dumps(", ".join(entries), ensure_ascii=False)}


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "Embeddings")
