"""LoRA stacks: a ``lora:`` section in a job, and A1111's ``<lora:name:weight>`` in prompts.

The first built-in feature plugin, and the one to copy when you write your own: it claims a
job key, merges inline prompt tags into it, checks its files before anything renders, keeps
batches with different stacks apart, configures the pipeline and adds its part of the
infotext. The hooks below appear in the order the stages call them.

What it handles::

    defaults:
      lora: {add_detail: 0.6}               # name -> weight (text encoder and UNet alike)
    jobs:
      - name: portraits
        prompt: "a portrait, film grain <lora:film_grain:0.3> <lora:sharp:0.8:0.5>"
        lora:
          add_detail: 0.6
          ink_style: {te: 0.5, unet: 1.0}    # A1111's two weights, spelled out
        grid:
          lora.add_detail: [0, 0.5, 1]       # an axis over one weight
          # lora.ink_style.unet: [0.5, 1]    # ... or over one of the two weights

Names are found by the run's ``ModelResolver`` (``render.models``): a file in a LoRA folder
(A1111 ``Lora/`` or ``LyCORIS/``, ComfyUI ``loras/``; extension optional, case-insensitive,
subfolders searched) or an alias from ``models:``.

Inline tags, as in A1111: ``<lora:name>`` (weight 1), ``<lora:name:w>``,
``<lora:name:te:unet>`` (text-encoder and UNet weights), named ``te=`` / ``unet=`` parts
(``<lora:name:0.8:unet=0.5>``) and ``<lyco:...>`` as a synonym. Tags count in the prompt
only (A1111 ignores them in the negative prompt, and so do we). A malformed tag is a
preflight error. Weights, in tags and in ``lora:``, are finite numbers within
+-:data:`MAX_WEIGHT` (20): past that a LoRA only wrecks the image (1e308 rendered black).
The engine takes every tag out of the text the encoder sees; the infotext keeps the prompt
exactly as written.

Where a LoRA is named twice: in the prompt and in ``lora:``, the prompt's weight wins (the
prompt is the more specific place: it may come from a wildcard line), unless a grid or zip
axis varies that LoRA; an axis always wins, so ``grid: {lora.x: [0, 0.5, 1]}`` works on a
prompt that carries ``<lora:x:0.8>``. The same LoRA tagged twice in one prompt: the last tag
wins. Two names that resolve to the same file are an error.

The normalised section (``task.sections["lora"]``), sorted by name, weights as floats::

    {"add_detail": {"te": 0.6, "unet": 0.6}, "ink_style": {"te": 0.5, "unet": 1.0}}

Files: kohya/A1111 ``.safetensors`` (``lora_unet_*``/``lora_te*_`` with ``.alpha``) and
diffusers/peft files (``unet.*.lora_A.weight``); diffusers' ``load_lora_weights`` reads both.
Preflight refuses what diffusers cannot load for Stable Diffusion, naming the file and its
type: LyCORIS LoHa, LoKr, (IA)^3, GLoRA, OFT, full/diff, LoCon with CP decomposition
(``lora_mid``), and kohya DoRA (diffusers would silently drop its ``dora_scale`` and render
something else). It also refuses a LoRA made for another base than the model (an SDXL LoRA
on SD 1.5 or the reverse), judged from tensor names and shapes, then kohya's metadata
(:func:`lora_family`).

Rendering: each file is loaded once per pipeline as a diffusers adapter named after its
sha256, and every batch sets its own stack with ``set_adapters`` (per-component weights for
the two-weight form). A batch without LoRAs disables the adapters, so it renders exactly
like the base model; a LoRA at weight 0 is not activated at all, which renders the same.
Stacks are part of the batch key, so a batch never mixes two stacks; switching stacks never
reloads the base model. At most :data:`MAX_RESIDENT_ADAPTERS` stay loaded; the least recently
used one is unloaded beyond that.

Infotext: A1111's ``Lora hashes: "name: hash, ..."``, names as written. The hash is the one
A1111 shows for a LoRA (``render.models.lora_hash``): the first 12 hex characters of the
sha256 of the tensor data after the safetensors header (kohya's "addnet" hash), or of the
file's ``sshs_model_hash`` metadata when it has one, as A1111 does. The full sha256 of each
file is in its ``FileRef``, and so in the task id and the provenance.

No torch at import time: validation and ``--dry-run`` load every plugin without it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import (
    CONTEXT_FAMILY,
    Batch,
    FieldContext,
    FieldError,
    FileRef,
    ModelKind,
    Result,
    Task,
    describe,
    expect_number,
    extra_network_tags,
    family_text,
    format_number,
    hookimpl,
    load_state_dict,
    per_file_version,
    raise_all,
    safetensors_metadata,
    section_axis_label,
    tensor_shapes,
)

KEY = "lora"
#: The largest LoRA weight accepted (either sign). Useful weights are within about +-3; past
#: this a LoRA only saturates the model (1e308 rendered an all-black image recorded as done).
MAX_WEIGHT = 20.0
#: How many LoRA adapters stay loaded in one pipeline before the least recently used goes.
MAX_RESIDENT_ADAPTERS = 16

#: ``<lora:...>`` and A1111's synonym ``<lyco:...>``; the body is split on ``:``.
#: Characters a LoRA name cannot hold: they would break the inline tag syntax.
_BAD_NAME_CHARS = set(":<>")


# -- load: the job key --------------------------------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    # A1111 shows a LoRA's "addnet" hash (of its tensors only) in Lora hashes.
    register(ModelKind("lora", folders=("Lora", "LyCORIS", "loras"), family=True,
                       hashes={"lora_hash": "addnet:12", "addnet_hash": "addnet"},
                       infotext="Lora hashes"))


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section,
             doc="LoRA name -> weight, or -> {te: w, unet: w}; also <lora:name:w> in prompts")


def validate_section(value: Any, ctx: FieldContext | None = None) -> dict[str, dict[str, float]]:
    """The ``lora:`` mapping, normalised to ``{name: {"te": w, "unet": w}}`` sorted by name.

    Also re-run on every grid value: ``grid: {lora.x: [...]}`` patches one weight into the
    raw section and the whole section is validated again.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FieldError(f"expected a mapping of LoRA name -> weight, e.g. {{add_detail: 0.6}},"
                         f" got {describe(value)}")
    out: dict[str, dict[str, float]] = {}
    for raw_name, weight in value.items():
        name = _check_name(raw_name)
        if name in out:
            raise FieldError(f"LoRA {name!r} is named twice", subkey=str(raw_name))
        out[name] = _weights(weight, str(raw_name))
    return dict(sorted(out.items()))


def _check_name(raw: Any) -> str:
    name = str(raw).strip()
    if not name:
        raise FieldError("expected a LoRA name, got an empty one", subkey=str(raw))
    bad = sorted(_BAD_NAME_CHARS & set(name))
    if bad:
        raise FieldError(f"a LoRA name cannot contain {' '.join(bad)}: {name!r}",
                         subkey=str(raw))
    return name


def _weights(value: Any, subkey: str) -> dict[str, float]:
    """A number (both weights) or ``{te: w, unet: w}``; floats, so 1 and 1.0 are one task."""
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in ("te", "unet"))
        if unknown:
            # {"5": w} under "add_detail_v1" is what a grid axis lora.add_detail_v1.5 makes
            hint = (" (a LoRA name containing '.' cannot be a dotted grid axis: vary the whole"
                    " 'lora' section instead)" if not {"te", "unet"} & set(value) else "")
            raise FieldError(f"expected {{te: weight, unet: weight}}, got the key "
                             f"{unknown[0]!r}{hint}", subkey=subkey)
        missing = [k for k in ("te", "unet") if k not in value]
        if missing:
            raise FieldError(f"expected both te and unet weights, {missing[0]} is missing",
                             subkey=subkey)
        try:
            return {k: _weight(value[k], f"a {k} weight") for k in ("te", "unet")}
        except FieldError as exc:
            raise FieldError(exc.message, subkey=subkey) from None
    try:
        weight = _weight(value, "a LoRA weight (or {te: w, unet: w})")
    except FieldError as exc:
        raise FieldError(exc.message, subkey=subkey) from None
    return {"te": weight, "unet": weight}


def _weight(value: Any, what: str) -> float:
    """A finite weight within +-:data:`MAX_WEIGHT`, as a float."""
    return float(expect_number(value, minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT, what=what))


# -- expand: inline tags ----------------------------------------------------------------------

def parse_tag(body: str) -> tuple[str, dict[str, float]]:
    """One tag's body (``name:0.8:unet=0.5``) -> (name, {"te": .., "unet": ..}).

    A1111's rules: the first number is the text-encoder weight (default 1), the second the
    UNet weight (default: the text-encoder weight); ``te=`` and ``unet=`` set them by name.
    Raises ValueError with a readable reason.
    """
    name, *parts = (p.strip() for p in body.split(":"))
    if not name:
        raise ValueError("the tag has no LoRA name")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(part)
    if "dyn" in named or len(positional) > 2:
        raise ValueError("a DyLoRA dimension ('dyn', the third number) is not supported")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise ValueError(f"unknown part {unknown[0]!r}= (expected te= or unet=)")
    te = _tag_number(named.get("te", positional[0] if positional else "1"))
    unet = _tag_number(named.get("unet", positional[1] if len(positional) > 1 else str(te)))
    return name, {"te": te, "unet": unet}


def _tag_number(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a weight") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a weight")
    if abs(number) > MAX_WEIGHT:
        raise ValueError(f"weight {text} is out of range; a LoRA weight is within"
                         f" [{-MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return number


def inline_loras(prompt: str) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The LoRAs tagged in a prompt, in order, and an error for each malformed tag."""
    found: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for match in extra_network_tags(prompt, "lora", "lyco"):
        try:
            name, weights = parse_tag(match.group(2))
        except ValueError as exc:
            errors.append(f"prompt: bad tag {match.group(0)!r}: {exc}")
            continue
        found.pop(name, None)  # the last tag wins, and keeps its place
        found[name] = weights
    return found, errors


@hookimpl
def expand_task(task: Task) -> list[Task] | None:
    """Merge the prompt's ``<lora:...>`` tags into the ``lora`` section (see precedence).

    No errors here (expansion cannot report a located one): preflight reports bad tags.
    """
    if "<" not in task.prompt:
        return None
    tagged, errors = inline_loras(task.prompt)
    if not tagged and not errors:
        return None
    section = dict(task.sections.get(KEY) or {})
    pinned = _axis_names(task, section)
    for name, weights in tagged.items():
        if name not in pinned:
            section[name] = weights
    merged = dict(sorted(section.items()))
    if KEY in task.sections and merged == task.sections[KEY]:
        return None
    # (a bad tag alone still makes a section, so its preflight error points at ``lora``)
    return [dataclasses.replace(task, sections={**task.sections, KEY: merged})]


def _axis_names(task: Task, section: Mapping[str, Any]) -> set[str]:
    """LoRAs whose weight a grid or zip axis sets in this task: those beat inline tags."""
    pinned: set[str] = set()
    for axis in task.axes:
        if axis == KEY:
            pinned.update(section)
        elif axis.startswith(KEY + "."):
            rest = axis[len(KEY) + 1:]
            for suffix in (".te", ".unet"):
                if rest.endswith(suffix) and rest[: -len(suffix)] in section:
                    rest = rest[: -len(suffix)]
            pinned.add(rest)
    return pinned


# -- plan (preflight): files, formats, base compatibility ---------------------------------------

@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says, read without torch."""

    format: str                          # "kohya" | "peft" | "other"
    families: frozenset[str] | None      # the bases it fits; None when it cannot be told
    reason: str                          # why we think so, for error messages
    unsupported: str | None = None       # a LyCORIS/DoRA type diffusers cannot load
    example: str = ""                    # a tensor name that shows the unsupported type


#: Tensor name endings of network types diffusers cannot load for SD/SDXL, with their names.
UNSUPPORTED_TYPES: tuple[tuple[str, str], ...] = (
    (r"\.hada_(w[12]_[ab]|t[12])$", "LyCORIS LoHa"),
    (r"\.lokr_(w[12](_[ab])?|t2)$", "LyCORIS LoKr"),
    (r"\.on_input$", "LyCORIS (IA)^3"),
    (r"\.[ab][12]\.weight$", "LyCORIS GLoRA"),
    (r"\.(oft_blocks|oft_diag|oft_R|boft_\w+)$", "LyCORIS OFT/BOFT"),
    (r"\.(diff|diff_b)$", "LyCORIS full (diff)"),
    (r"\.lora_mid\.weight$", "LyCORIS LoCon with CP decomposition (lora_mid)"),
    (r"\.dora_scale$", "kohya DoRA"),
)
_UNSUPPORTED = [(re.compile(p), kind) for p, kind in UNSUPPORTED_TYPES]
_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_CROSS_ATTN_DOWN = re.compile(r"attn2[._]to_[kv][._](lora[._]down|lora_A|down)[._]weight$")
_TE_DOWN = re.compile(r"q_proj[._](lora[._]down|lora_A|down)[._]weight$")
_DEEP_BLOCK = re.compile(r"transformer_blocks[._][1-9]")
_FULL_RES_ATTN = re.compile(r"(down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._])")


def inspect_lora(path: Path) -> LoraInfo:
    """Format, base family and unsupported type of a LoRA file, from its header only."""
    shapes = tensor_shapes(path)
    metadata = safetensors_metadata(path)
    for name in sorted(shapes):
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(name):
                return LoraInfo("lycoris", None, "", kind, name)
    keys = list(shapes)
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))
                    for k in keys):
        fmt = "kohya"
    elif keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        fmt = "peft"
    else:
        fmt = "other"
    families, reason = lora_family(shapes, metadata)
    return LoraInfo(fmt, families, reason)


def lora_family(shapes: Mapping[str, tuple[int, ...]],
                metadata: Mapping[str, str]) -> tuple[frozenset[str] | None, str]:
    """The bases a LoRA fits, and why we think so; ``(None, "")`` when it cannot be told.

    In order, first answer wins (structure first: it is what loading will meet):

    1. layers of SDXL's second text encoder (``lora_te2_``, ``text_encoder_2.``) or its
       added-conditioning MLP (``label_emb``, ``add_embedding``) -> SDXL;
    2. transformer blocks deeper than one (``transformer_blocks_1``): only SDXL has them;
    3. the width of the cross-attention input: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL;
    4. kohya/SAI metadata: ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``
       ...), ``modelspec.architecture``, ``ss_v2``;
    5. the text encoder's width: 768 SD 1.x, 1024 SD 2.x;
    6. attention at the UNet's full resolution (``down_blocks_0_attentions``): SD 1.x or 2.x.

    The tiny test kit's LoRAs are placed by 1, 2, 4 and 6; real ones mostly by 1-3.
    """
    keys = list(shapes)
    te2 = next((k for k in keys if k.startswith(("lora_te2_", "text_encoder_2."))), None)
    if te2:
        return frozenset({"sdxl"}), "it has layers for a second text encoder"
    if any("label_emb" in k or "add_embedding" in k for k in keys):
        return frozenset({"sdxl"}), "it has layers for SDXL's added conditioning"
    if any(_DEEP_BLOCK.search(k) for k in keys if "unet" in k):
        return frozenset({"sdxl"}), "its UNet has multi-layer transformer blocks"
    for key in sorted(keys):
        shape = shapes[key]
        if _CROSS_ATTN_DOWN.search(key) and len(shape) == 2 and shape[1] in _CONTEXT:
            family = _CONTEXT[shape[1]]
            return frozenset({family}), f"its cross-attention reads {shape[1]}-wide text"
    meta_family, meta_reason = _metadata_family(metadata)
    if meta_family:
        return frozenset({meta_family}), meta_reason
    for key in sorted(keys):
        shape = shapes[key]
        family = CONTEXT_FAMILY.get(shape[1]) if len(shape) == 2 else None
        if _TE_DOWN.search(key) and family in ("sd1", "sd2"):
            return frozenset({family}), f"its text-encoder layers are {shape[1]} wide"
    if any(_FULL_RES_ATTN.search(k) for k in keys):
        return (frozenset({"sd1", "sd2"}),
                "it has attention layers at the UNet's full resolution, which SDXL lacks")
    return None, ""


def _metadata_family(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    version = str(metadata.get("ss_base_model_version") or "").strip().lower()
    if version:
        said = f"its metadata says ss_base_model_version={version}"
        if version.startswith("sdxl"):
            return "sdxl", said
        if version.startswith(("sd_v2", "sd_2", "v2")):
            return "sd2", said
        if version.startswith(("sd_v1", "sd_1", "v1")):
            return "sd1", said
        return version, said  # flux1, sd3 ...: fits no SD model
    arch = str(metadata.get("modelspec.architecture") or "").strip().lower()
    if arch:
        said = f"its metadata says modelspec.architecture={arch}"
        if arch.startswith("stable-diffusion-xl"):
            return "sdxl", said
        if arch.startswith("stable-diffusion-v2"):
            return "sd2", said
        if arch.startswith("stable-diffusion-v1"):
            return "sd1", said
    if str(metadata.get("ss_v2") or "") == "True":
        return "sd2", "its metadata says ss_v2=True"
    return None, ""


#: ``inspect_lora`` once per file version: preflight asks for every task.
_cached_info = per_file_version(inspect_lora)


def check_tags(prompt: str) -> None:
    """Raise FieldError for a malformed ``<lora:...>`` tag (expand skipped it)."""
    _, errors = inline_loras(prompt)
    if errors:
        raise FieldError(errors[0], key="prompt")


@hookimpl
def task_files(task: Task, models: Any) -> dict[str, FileRef] | None:
    """Find and check every LoRA of the task: ``{"lora:<name>": FileRef}``.

    Raises ``FieldError(message, subkey=name)`` for a missing file, a LyCORIS type diffusers
    cannot load, or a LoRA made for another base than the task's model.
    """
    check_tags(task.prompt)
    section = task.sections.get(KEY) or {}
    if not section:
        return None
    model = task.files.get("model")
    model_family = model.family if model else None
    tagged = set(inline_loras(task.prompt)[0])
    files: dict[str, FileRef] = {}
    by_file: dict[str, str] = {}
    errors: list[FieldError] = []
    for name in section:
        try:
            ref = _lora_ref(task, models, name, model_family, by_file)
        except FieldError as exc:  # every LoRA of the stack is checked: all problems at once
            where = {"key": "prompt"} if name in tagged else {"subkey": name}
            errors.append(FieldError(exc.message, **where))
            continue
        files[f"{KEY}:{name}"] = ref
    raise_all(errors)
    return files


def _lora_ref(task: Task, models: Any, name: str, model_family: str | None,
              by_file: dict[str, str]) -> FileRef:
    """One LoRA found and checked (format, type, base); FieldError says what is wrong."""
    path = models.find("lora", name)
    if path.is_dir():
        raise FieldError(f"LoRA {name!r}: {path} is a folder; name the weight file")
    try:
        info = _cached_info(path)
    except FieldError as exc:  # not a readable safetensors/pickle file
        raise FieldError(f"LoRA {name!r}: {exc.message}") from None
    if info.unsupported:
        raise FieldError(
            f"LoRA {name!r}: {path} is a {info.unsupported} network (tensors like "
            f"{info.example!r}), which diffusers cannot load; only LoRA/LoCon files "
            "(lora_down/lora_up, or peft lora_A/lora_B) are supported")
    if info.families and model_family and model_family not in info.families:
        raise FieldError(
            f"LoRA {name!r} ({path.name}) is for {family_text(info.families)} "
            f"({info.reason}), but model {task.model!r} is {family_text(model_family)}")
    ref = models.file_ref("lora", name, path)
    twin = by_file.get(ref.sha256)
    if twin is not None:
        raise FieldError(f"LoRA {name!r} and {twin!r} are the same file ({path.name})")
    by_file[ref.sha256] = name
    family = next(iter(info.families)) if info.families and len(info.families) == 1 else None
    return dataclasses.replace(ref, family=family or ref.family,
                               extra={**ref.extra, "format": info.format})


@dataclass(frozen=True)
class StackEntry:
    """One active LoRA of a task: its file and two weights."""

    name: str
    ref: FileRef
    te: float
    unet: float

    @property
    def adapter(self) -> str:
        """The diffusers adapter name: from the file's hash, so a file loads once."""
        return "lora_" + self.ref.sha256[:16]


def active_stack(task: Task) -> list[StackEntry]:
    """The task's LoRAs that change pixels (weight 0 on both parts is left out)."""
    section = task.sections.get(KEY) or {}
    stack = []
    for name, weights in section.items():
        if weights["te"] == 0 and weights["unet"] == 0:
            continue
        ref = task.files.get(f"{KEY}:{name}")
        if ref is None:
            raise RuntimeError(f"task {task.job}#{task.index}: LoRA {name!r} has no file; "
                               "was the task preflighted?")
        stack.append(StackEntry(name, ref, float(weights["te"]), float(weights["unet"])))
    return sorted(stack, key=lambda e: e.adapter)


@hookimpl
def group_key(task: Task) -> Any:
    """The active stack by file hash and weights: different stacks never share a call."""
    stack = active_stack(task)
    if not stack:
        return None
    return (KEY, tuple((e.ref.sha256, e.te, e.unet) for e in stack))


# -- render: adapters --------------------------------------------------------------------------

#: Per UNet (shared by every ``from_pipe`` view of a model): adapters by last use.
_RECENT: weakref.WeakKeyDictionary[Any, OrderedDict[str, None]] = weakref.WeakKeyDictionary()


@hookimpl
def configure_pipeline(pipe: Any, batch: Batch) -> None:
    """Load what the batch's stack needs (once per pipeline) and set its weights.

    A batch without LoRAs disables every loaded adapter: the base model's exact pixels.
    """
    stack = active_stack(batch.first)
    key = [(e.adapter, e.te, e.unet) for e in stack]
    for task in batch.tasks[1:]:
        if [(e.adapter, e.te, e.unet) for e in active_stack(task)] != key:
            raise RuntimeError("a batch mixes LoRA stacks; group_key should have split it")
    loaded = _adapters(pipe)
    if not stack:
        if loaded:
            _enable(pipe, loaded, False)
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise RuntimeError(f"{type(pipe).__name__} cannot load LoRAs (no load_lora_weights)")
    present = {name for names in loaded.values() for name in names}
    for entry in stack:
        if entry.adapter not in present:
            _load(pipe, entry)
    recent = _RECENT.setdefault(_owner(pipe), OrderedDict())
    for entry in stack:
        recent.pop(entry.adapter, None)
        recent[entry.adapter] = None
    _evict(pipe, recent, keep={e.adapter for e in stack})
    loaded = _adapters(pipe)
    _enable(pipe, loaded, True)
    weights = []
    for entry in stack:
        parts = [c for c, names in loaded.items() if entry.adapter in names]
        weights.append({c: entry.te if c.startswith("text_encoder") else entry.unet
                        for c in parts})
    pipe.set_adapters([e.adapter for e in stack], weights)


def _owner(pipe: Any) -> Any:
    """What adapters live in: the denoiser, shared by every view of a model."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    return pipe


def _adapters(pipe: Any) -> dict[str, list[str]]:
    """Component -> adapter names actually loaded (the modules are the truth, not us)."""
    if not hasattr(pipe, "get_list_adapters"):
        return {}
    try:
        return {c: list(n) for c, n in pipe.get_list_adapters().items() if n}
    except ValueError:  # no PEFT backend
        return {}


def _enable(pipe: Any, loaded: Mapping[str, list[str]], enabled: bool) -> None:
    """Switch the LoRA layers of every component that has some (diffusers' pipeline-level
    ``disable_lora`` raises on a component without adapters, e.g. a text-encoder-only LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in loaded:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)


def _load(pipe: Any, entry: StackEntry) -> None:
    path = Path(entry.ref.path)
    try:
        with _quiet():
            if path.suffix.lower() == ".safetensors":
                pipe.load_lora_weights(str(path.parent), weight_name=path.name,
                                       adapter_name=entry.adapter)
            else:  # a pickle its alias allowed: torch's weights-only unpickler, via the core

                state = load_state_dict(path, allow_pickle=bool(entry.ref.extra.get(
                    "allow_pickle")))
                pipe.load_lora_weights(state, adapter_name=entry.adapter)
    except Exception as exc:
        raise RuntimeError(f"LoRA {entry.name!r} ({path}) failed to load into "
                           f"{type(pipe).__name__}: {exc}") from exc


def _evict(pipe: Any, recent: OrderedDict[str, None], keep: set[str]) -> None:
    """Unload the least recently used adapters beyond :data:`MAX_RESIDENT_ADAPTERS`."""
    loaded = {name for names in _adapters(pipe).values() for name in names}
    for name in list(recent):
        if name not in loaded:
            del recent[name]
    extra = len(loaded) - MAX_RESIDENT_ADAPTERS
    victims = [name for name in recent if name not in keep][:max(0, extra)]
    if victims:
        with _quiet():
            pipe.delete_adapters(victims)
        for name in victims:
            del recent[name]


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide what loading adapters one by one always prints: transformers' load report lists
    the other adapters' weights as "missing", peft warns that a model has several adapters."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            warnings.filterwarnings("ignore", message=".*which is now deleted.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# -- write: infotext -----------------------------------------------------------------------------

def lora_tag(name: str, weights: Mapping[str, float]) -> str:
    """A1111's tag for a LoRA at these weights: ``<lora:name:w>`` or ``<lora:name:te:unet>``."""
    te, unet = format_number(weights["te"]), format_number(weights["unet"])
    return f"<lora:{name}:{te}>" if te == unet else f"<lora:{name}:{te}:{unet}>"


@hookimpl
def infotext_prompt(task: Task, prompt: str) -> str | None:
    """The prompt as A1111 rebuilds the stack from it: the tags as written, a tag whose
    weights a grid axis changed rewritten to what rendered, and a tag appended for every
    LoRA only the section (or an axis) names. Appended after a space: the engine takes tags
    out of the encoder's text, and ``a house `` encodes like ``a house``."""
    section = task.sections.get(KEY) or {}
    if not section:
        return None
    text = prompt
    for match in reversed(extra_network_tags(prompt, "lora", "lyco")):
        try:
            name, weights = parse_tag(match.group(2))
        except ValueError:
            continue
        if name in section and section[name] != weights:
            text = text[:match.start()] + lora_tag(name, section[name]) + text[match.end():]
    tagged, _ = inline_loras(prompt)
    text += "".join(f" {lora_tag(name, section[name])}" for name in section
                    if name not in tagged)
    return None if text == prompt else text


@hookimpl
def result_metadata(task: Task, result: Result) -> dict[str, str] | None:
    """A1111's ``Lora hashes: "name: hash, ..."`` for every LoRA of the task (weight 0 too,
    as A1111 lists every network the prompt names). Pre-quoted as A1111 writes it."""
    section = task.sections.get(KEY) or {}
    entries = []
    for name in section:
        ref = task.files.get(f"{KEY}:{name}")
        short = (ref.extra.get("lora_hash") if ref else None) or ""
        if short:
            alias = name.replace(":", "").replace(",", "")
            entries.append(f"{alias}: {short}")
    if not entries:
        return None
    return {"Lora hashes": json.dumps(", ".join(entries), ensure_ascii=False)}


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "LoRA", {"te": "TE", "unet": "UNet"})
