"""Hypernetworks: A1111's ``<hypernet:name:strength>`` and a ``hypernetwork:`` section.

Written against ``render.api`` only, like every built-in plugin. What it handles::

    models:
      anime_style: {source: anime_style.pt, allow_pickle: true}   # A1111's .pt is a pickle
    jobs:
      - name: styled
        prompt: "a castle <hypernet:ink_wash:0.5>"   # strength optional (default 1)
        hypernetwork: {anime_style: 0.7}              # name -> strength; several stack
        grid:
          hypernetwork.anime_style: [0, 0.5, 1]       # an axis over one strength
      - name: ordered
        hypernetwork: [{ink_wash: 0.5}, anime_style]  # a list: applied in this order

Names are found by the run's ``ModelResolver``: a file in a ``hypernetworks/`` folder (A1111's
``models/hypernetworks/`` and ComfyUI's ``models/hypernetworks/`` alike; extension optional,
subfolders searched) or an alias from ``models:``. ``hypernetwork: name`` is short for
``{name: 1}``; a list of names and one-entry mappings sets the order in which they apply.

Files. A1111's ``.pt`` is a pickle: a dict whose integer keys are context widths (768; old
NovelAI-style files also 320, 640 and 1280) and whose values are two state dicts, for keys and
for values, of a ``Sequential`` (``linear.0.weight`` ...), beside metadata (``layer_structure``,
``activation_func``, ``is_layer_norm``, ``activate_output``, ``use_dropout``, ``name`` ...).
Loading a pickle can run code, so render refuses a ``.pt`` unless its ``models:`` alias says
``allow_pickle: true`` (the resolver's policy for every kind), and then reads it only with torch's
weights-only unpickler (``render.api.load_state_dict``): a pickle that would run code on loading
is refused with a preflight error and nothing in it runs. A ``.safetensors`` hypernetwork (no
alias needed) holds the same tensors flattened: ``<width>.<0 for keys | 1 for values>.<name in
the state dict>``, e.g. ``768.0.linear.0.weight``, with the metadata in ``__metadata__`` as JSON
values (``"layer_structure": "[1, 2, 1]"``); ``render.testing.write_hypernetwork`` writes both.

The layers are rebuilt from the tensors and the metadata, as A1111 builds them: the tensors give
the linear layers (and layer norms) in order, each checked against the next one's shape, against
the context width and against ``layer_structure``; ``activation_func`` follows every linear
layer but the last (the last too with ``activate_output``, which A1111 reads as true when a file
lacks it), then the layer norm; ``swish`` is torch's Hardswish, as in A1111. Dropout does nothing
at inference and is left out. The old names ``linear1``/``linear2`` are read as A1111 reads them.

Applying, as A1111 does: wherever the UNet attends, keys and values read the context through the
hypernetwork's modules for the context's width, each with its own module:
``context_k = context + strength * hk(context)``, ``context_v = context + strength * hv(context)``.
Cross-attention's context is the text (768 wide for SD 1.x); self-attention's is the image
features themselves, so a file with 320/640/1280 modules also acts on self-attention, as in A1111
and ComfyUI. Several hypernetworks apply in order, each on the previous one's result: the
prompt's tags in prompt order first, then the ``hypernetwork:`` entries not tagged in the
prompt (the order A1111 gets when it pastes our infotext, see below): a list's in the order
written, a mapping's by name (a job file's mappings carry no order; render validates equal
mappings once, whatever order their keys were written in).
A hypernetwork both tagged and in the section takes the prompt's strength (the more specific
place), unless a grid or zip axis varies it: an axis always wins.

Rendering: a diffusers attention processor (:class:`HypernetProcessor`) wraps the processor
already there on each attention layer of the UNet whose width the stack has modules for; it
hands the wrapped processor the attention module with its key and value projections reading the
transformed contexts, so SDPA, sliced or any other attention still computes the attention
itself. ``configure_pipeline`` installs the batch's stack and puts the original processors back
for a batch without one; a hypernetwork at strength 0 is not applied at all, so it renders
exactly like none. The stack is the batch key (``group_key``), so a pipeline call never mixes two
stacks. ``task_inputs``, the last hook before each pipeline call, installs the stack again
should the engine's out-of-memory fallback (attention slicing, which replaces every processor)
have taken it away: the image is never silently rendered without its hypernetwork. Modules are
built once per file content, device and dtype (at most :data:`MAX_RESIDENT` kept), on the
UNet's device and in its dtype; preflight inspects each file once per file version. A
ControlNet's own attention layers are not touched (A1111 also reaches those).

Preflight errors (``file:line``): a name that is not found; a ``.pt`` without ``allow_pickle``;
a pickle the weights-only unpickler refuses; a file that is not a hypernetwork (no modules by
width, tensors that do not chain, metadata that contradicts the tensors, an activation A1111
does not have); a hypernetwork without modules for the model's cross-attention width, i.e. made
for another base (an SD 1.x one on SDXL): A1111 would apply it partly or not at all without a
word. A malformed tag, and a hypernetwork tagged twice (A1111 would apply it twice), are errors
too. Tags count in the prompt only, not in the negative prompt (as in A1111); the engine takes
every tag out of the text the encoder sees.

Infotext: older A1111 wrote ``Hypernet: <name>``, ``Hypernet hash: <hash>`` and ``Hypernet
strength: <s>``; A1111 today writes none, the tags in the prompt say it all, and when it pastes
an infotext with ``Hypernet:`` it appends ``<hypernet:name:strength>`` to the prompt. So the
fields are written for the last hypernetwork of the section that the prompt does not already
tag (at a strength other than 0): a tagged one would then be applied twice. The infotext's
prompt gets a tag for every other untagged one (``infotext_prompt``), so a paste rebuilds the
stack in the order it rendered: the prompt's tags, those, then the one A1111 appends. The hash
is the one old A1111 wrote, its legacy model hash (sha256 of the 64 KiB at 1 MiB into the file,
8 hex digits); every file's sha256 is in the task id and the provenance.

The normalised section (``task.sections["hypernetwork"]``) is a tuple of ``(name, strength)``
pairs in the order they apply, strengths as floats: order matters, and a mapping's order would
not survive the task id's sorted JSON.

No torch at import time. Preflight of a ``.pt`` imports torch (its weights-only unpickler is
the only safe way into a nested pickle), so a ``--dry-run`` of a job using one does too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from render.api import (
    CONTEXT_FAMILY,
    PICKLE_EXTS,
    Batch,
    FieldContext,
    FieldError,
    FileRef,
    ModelKind,
    Result,
    Task,
    checkpoint_info,
    describe,
    expect_number,
    extra_network_tags,
    family_text,
    format_number,
    hookimpl,
    load_state_dict,
    per_file_version,
    safetensors_metadata,
    section_axis_label,
    tensor_shapes,
)

KEY = "hypernetwork"
KIND = "hypernetwork"
TAG = "hypernet"
#: How many built hypernetworks (per file content, device and dtype) stay in memory.
MAX_RESIDENT = 8
#: A1111's activation names -> torch.nn class; "linear" (and none) is no activation.
ACTIVATIONS: dict[str, str | None] = {
    "linear": None, "relu": "ReLU", "leakyrelu": "LeakyReLU", "elu": "ELU",
    "swish": "Hardswish", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign",
    "mish": "Mish", "gelu": "GELU", "silu": "SiLU", "hardswish": "Hardswish",
    "hardsigmoid": "Hardsigmoid", "hardtanh": "Hardtanh", "relu6": "ReLU6", "selu": "SELU",
    "celu": "CELU", "softplus": "Softplus", "tanhshrink": "Tanhshrink",
    "logsigmoid": "LogSigmoid", "softshrink": "Softshrink", "hardshrink": "Hardshrink",
    "rrelu": "RReLU",
}
#: The attribute by which a wrapped processor is found again (also across plugin reloads).
WRAPPED = "hypernetwork_wrapped"
_OLD_NAMES = {"linear1": "linear.0", "linear2": "linear.1"}
_PARAM = re.compile(r"linear\.(\d+)\.(weight|bias)")
_FLAT = re.compile(r"(\d+)\.([01])\.(.+)")


# -- load: the model kind and the job key -----------------------------------------------------

@hookimpl
def register_model_kinds(register: Any) -> None:
    # The hash A1111 wrote is its legacy model hash, which no ModelKind hash spec gives: the
    # plugin computes it in task_files (its sha256 is in the FileRef as for every file).
    register(ModelKind(KIND, folders=("hypernetworks",), extensions=(".safetensors", ".pt"),
                       hashes={"a1111_hash": "legacy"}, infotext="Hypernet hash"))


@hookimpl
def register_task_fields(register: Any) -> None:
    register(KEY, validate_section,
             doc="hypernetwork name -> strength, applied in order; also <hypernet:name:s>")


def validate_section(value: Any, ctx: FieldContext | None = None) -> tuple[tuple[str, float], ...]:
    """The ``hypernetwork:`` section as ``((name, strength), ...)`` in the order they apply.

    A mapping applies in name order (job-file mappings carry no order: render validates equal
    mappings once); a list of names or one-entry mappings applies in the order written.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        items = [(str(k), k, v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    elif isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                items.append((str(i), item, 1))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((raw, strength),) = item.items()
                items.append((f"{i}.{raw}", raw, strength))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
                items.append((str(i), item[0], item[1]))   # this function's own output, as
                # JSON holds it: an image's provenance is validated like a job file
            else:
                raise FieldError("expected a hypernetwork name or {name: strength}, got "
                                 f"{describe(item)}", subkey=str(i))
    else:
        raise FieldError("expected a mapping of hypernetwork name -> strength, e.g. "
                         "{anime_style: 0.7}, or a list of them in the order they apply, got "
                         f"{describe(value)}")
    out: dict[str, float] = {}
    for subkey, raw, strength in items:
        name = str(raw).strip()
        bad = sorted(set(":<>") & set(name))
        if not name or bad:
            why = f"cannot contain {' '.join(bad)}" if bad else "cannot be empty"
            raise FieldError(f"a hypernetwork name {why}: {name!r}", subkey=subkey)
        if name in out:
            raise FieldError(f"hypernetwork {name!r} is named twice", subkey=subkey)
        if isinstance(strength, Mapping):  # what a dotted axis over a name with '.' makes
            raise FieldError("expected a strength, got a mapping (a hypernetwork name "
                             "containing '.' cannot be a dotted grid axis: vary the whole "
                             "'hypernetwork' section instead)", subkey=subkey)
        try:
            out[name] = float(expect_number(strength, what="a hypernetwork strength"))
        except FieldError as exc:
            raise FieldError(exc.message, subkey=subkey) from None
    return tuple(out.items())


# -- expand: inline tags --------------------------------------------------------------------

def parse_tag(body: str) -> tuple[str, float]:
    """A tag's body, ``name`` or ``name:strength``, -> (name, strength); ValueError if bad."""
    name, *parts = (p.strip() for p in body.split(":"))
    if not name:
        raise ValueError("the tag has no hypernetwork name")
    if len(parts) > 1:
        raise ValueError("expected <hypernet:name> or <hypernet:name:strength>")
    text = parts[0] if parts else "1"
    try:
        strength = float(text)
    except ValueError:
        strength = float("nan")
    if strength != strength or abs(strength) == float("inf"):
        raise ValueError(f"{text!r} is not a strength")
    return name, strength


def inline_hypernetworks(prompt: str) -> tuple[list[tuple[str, float]], list[str]]:
    """The prompt's ``<hypernet:...>`` tags in order, and an error for each bad one."""
    found: dict[str, float] = {}
    errors: list[str] = []
    for match in extra_network_tags(prompt, TAG):
        try:
            name, strength = parse_tag(match.group(2))
        except ValueError as exc:
            errors.append(f"prompt: bad tag {match.group(0)!r}: {exc}")
            continue
        if name in found:
            errors.append(f"prompt: hypernetwork {name!r} is tagged twice (A1111 would apply "
                          "it twice); tag it once")
        found[name] = strength
    return list(found.items()), errors


@hookimpl
def expand_task(task: Task) -> list[Task] | None:
    """Merge the prompt's tags into the section: tags first, in prompt order, then the
    section's other entries. Bad tags are left for preflight, which can locate them."""
    if "<" not in task.prompt:
        return None
    tagged, errors = inline_hypernetworks(task.prompt)
    if not tagged and not errors:
        return None
    section = tuple(task.sections.get(KEY) or ())
    written = dict(section)
    pinned = {axis.split(".", 1)[1] for axis in task.axes if axis.startswith(KEY + ".")}
    if KEY in task.axes:
        pinned |= set(written)
    merged = [(n, written[n] if n in pinned and n in written else s) for n, s in tagged]
    names = {n for n, _ in tagged}
    merged += [(n, s) for n, s in section if n not in names]
    if KEY in task.sections and tuple(merged) == section:
        return None
    return [dataclasses.replace(task, sections={**task.sections, KEY: tuple(merged)})]


# -- plan (preflight): files, structure, base compatibility ---------------------------------

@dataclass(frozen=True)
class Layer:
    """One layer with weights, at ``index`` of A1111's ``Sequential``."""

    kind: str          # "linear" | "norm"
    index: int
    features: int      # its output width


@dataclass(frozen=True)
class HypernetInfo:
    """A hypernetwork's structure, the same for every width it has modules for."""

    widths: tuple[int, ...]
    layers: Mapping[int, tuple[Layer, ...]]   # width -> its layers (keys and values alike)
    activation: str | None                    # torch.nn class name, None for linear
    activate_output: bool

    @property
    def families(self) -> frozenset[str]:
        return frozenset(CONTEXT_FAMILY[w] for w in self.widths if w in CONTEXT_FAMILY)


def split_modules(obj: Mapping[Any, Any], flat_metadata: Mapping[str, str] | None = None
                  ) -> tuple[dict[int, tuple[Mapping[str, Any], Mapping[str, Any]]],
                             dict[str, Any]]:
    """An A1111 dict (``{768: (k_state, v_state), 'name': ...}``), or a flattened safetensors
    file with its metadata, -> ``({width: (k_state, v_state)}, metadata)``. The state values
    are tensors or shapes, whatever ``obj`` holds."""
    modules: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    if flat_metadata is not None:
        for key, value in obj.items():
            match = _FLAT.fullmatch(str(key))
            if not match:
                raise FieldError(f"it is not a hypernetwork (a tensor {key!r}; expected "
                                 "'<width>.<0|1>.linear.<n>.weight')")
            pair = modules.setdefault(int(match[1]), ({}, {}))
            pair[int(match[2])][match[3]] = value
        return dict(modules), {k: _json_value(v) for k, v in flat_metadata.items()}
    metadata = {}
    for key, value in obj.items():
        width = key if isinstance(key, int) and not isinstance(key, bool) else None
        if width is None and isinstance(key, str) and key.isdigit():
            width = int(key)  # what ComfyUI also accepts
        if width is None:
            metadata[str(key)] = value
        elif (isinstance(value, (list, tuple)) and len(value) == 2
              and all(isinstance(v, Mapping) for v in value)):
            modules[width] = (dict(value[0]), dict(value[1]))
        else:
            raise FieldError(f"it is not a hypernetwork (its entry {key!r} is "
                             f"{describe(value)}, not a pair of state dicts)")
    return dict(modules), metadata


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def hypernet_info(modules: Mapping[int, tuple[Mapping[str, Any], Mapping[str, Any]]],
                  metadata: Mapping[str, Any]) -> HypernetInfo:
    """Check the modules against each other and the metadata; FieldError says what is wrong."""
    if not modules:
        shown = ", ".join(sorted(map(str, metadata))[:5]) or "none"
        raise FieldError(f"it is not a hypernetwork (no modules keyed by context width; "
                         f"keys: {shown})")
    name = metadata.get("activation_func")
    if name is not None and str(name).lower() not in ACTIVATIONS:
        raise FieldError(f"its activation function {name!r} is not one A1111 has that render "
                         f"supports ({', '.join(sorted(ACTIVATIONS))})")
    structure = metadata.get("layer_structure")
    layer_norm = metadata.get("is_layer_norm")
    layers = {}
    for width, pair in sorted(modules.items()):
        found = [_layers(width, state, part) for part, state in zip(("keys", "values"), pair,
                                                                   strict=True)]
        if found[0] != found[1]:
            raise FieldError(f"its {width}-wide modules for keys and values differ in shape")
        linears = [layer.features for layer in found[0] if layer.kind == "linear"]
        if structure is not None and not _fits(structure, width, linears):
            raise FieldError(f"its layer_structure {structure!r} does not match its {width}-wide"
                             f" layers ({width} -> {' -> '.join(map(str, linears))})")
        norms = any(layer.kind == "norm" for layer in found[0])
        if layer_norm is not None and _truthy(layer_norm) != norms:
            raise FieldError(f"its metadata says is_layer_norm={layer_norm!r}, but its "
                             f"{width}-wide modules {'have' if norms else 'have no'} layer norms")
        layers[width] = found[0]
    activate_output = metadata.get("activate_output")
    return HypernetInfo(
        tuple(sorted(modules)), layers,
        ACTIVATIONS.get(str(name).lower()) if name is not None else None,
        True if activate_output is None else _truthy(activate_output))


def _layers(width: int, state: Mapping[str, Any], part: str) -> tuple[Layer, ...]:
    """The weighted layers of one module from its tensor shapes, checked to chain."""
    params: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, value in state.items():
        head, dot, leaf = str(key).rpartition(".")
        match = _PARAM.fullmatch(f"{_OLD_NAMES.get(head, head)}{dot}{leaf}")
        if not match:
            raise FieldError(f"it is not a hypernetwork (its {width}-wide module for {part} "
                             f"has a tensor {key!r}; expected 'linear.<n>.weight')")
        shape = tuple(value.shape) if hasattr(value, "shape") else tuple(value)
        params.setdefault(int(match[1]), {})[match[2]] = tuple(int(d) for d in shape)
    out: list[Layer] = []
    features = width
    for index in sorted(params):
        weight, bias = params[index].get("weight"), params[index].get("bias")
        if weight is not None and len(weight) == 2 and weight[1] == features and \
                bias == weight[:1]:
            out.append(Layer("linear", index, weight[0]))
            features = weight[0]
        elif out and weight == bias == (features,):
            out.append(Layer("norm", index, features))
        else:
            raise FieldError(f"its {width}-wide module for {part} does not chain at layer "
                             f"{index} (weight {weight}, bias {bias}, after {features} "
                             "features)")
    if not out or features != width:
        raise FieldError(f"its {width}-wide module for {part} ends with {features} features; "
                         f"a hypernetwork module gives back its input's {width}")
    return tuple(out)


def _fits(structure: Any, width: int, linears: list[int]) -> bool:
    try:
        wanted = [int(width * float(f)) for f in structure[1:]]
    except (TypeError, ValueError):
        return False
    return wanted == linears


def _truthy(value: Any) -> bool:
    return value.strip().lower() == "true" if isinstance(value, str) else bool(value)


def inspect_file(path: Path, *, allow_pickle: bool) -> HypernetInfo:
    """The structure of a hypernetwork file: a safetensors header without torch; a pickle
    through torch's weights-only unpickler. FieldError for what cannot be used."""
    if path.suffix.lower() in PICKLE_EXTS:
        try:
            state = load_state_dict(path, allow_pickle=allow_pickle)
        except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, reported plainly
            raise FieldError(_refusal(str(exc))) from None
        return hypernet_info(*split_modules(state))
    return hypernet_info(*split_modules(tensor_shapes(path), safetensors_metadata(path)))


def _refusal(text: str) -> str:
    """One line for a failed load: torch's refusal names the global it would not import."""
    reason = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
    if reason is None:
        return " ".join(text.split())
    return (f"torch's weights-only unpickler refused it ({reason.rstrip('.')}): loading it "
            "would run code or build objects that a hypernetwork file never holds")


#: ``inspect_file`` once per file version (preflight asks for every task), per pickle policy.
_inspected = {allowed: per_file_version(functools.partial(inspect_file, allow_pickle=allowed))
              for allowed in (False, True)}
_model_context = per_file_version(lambda path: checkpoint_info(path).context_dim)




def check_tags(prompt: str) -> None:
    """Raise FieldError (at ``prompt``) for a malformed or repeated ``<hypernet:...>`` tag."""
    _, errors = inline_hypernetworks(prompt)
    if errors:
        raise FieldError(errors[0], key="prompt")


def cross_attention_width(model: FileRef | None) -> int | None:
    """The width of the text the model's cross-attention reads (768 for SD 1.x)."""
    if model is None:
        return None
    try:
        width = _model_context(Path(model.path))
    except (FieldError, OSError):
        width = None
    by_family = {family: w for w, family in CONTEXT_FAMILY.items()}
    return width or by_family.get(model.family or "")


@hookimpl
def task_files(task: Task, models: Any) -> dict[str, FileRef] | None:
    """Find and check every hypernetwork of the task: ``{"hypernetwork:<name>": FileRef}``."""
    check_tags(task.prompt)
    section = task.sections.get(KEY) or ()
    if not section:
        return None
    model = task.files.get("model")
    width = cross_attention_width(model)
    tagged = {name for name, _ in inline_hypernetworks(task.prompt)[0]}
    files: dict[str, FileRef] = {}
    by_file: dict[str, str] = {}
    for name, _strength in section:
        # a tagged name is the prompt's (its strength wins); the section's own at its entry
        where = {"key": "prompt"} if name in tagged else {"subkey": name}
        try:
            path = models.find(KIND, name)
        except FieldError as exc:
            raise FieldError(exc.message, **where) from None
        if path.is_dir():
            raise FieldError(f"hypernetwork {name!r}: {path} is a folder; name the file", **where)
        ref = models.file_ref(KIND, name, path)
        allowed = bool(ref.extra.get("allow_pickle"))
        try:
            info = _inspected[allowed](path)
        except FieldError as exc:
            raise FieldError(f"hypernetwork {name!r} ({path.name}): {exc.message}",
                             **where) from None
        if width and width not in info.widths:
            made_for = f" ({family_text(info.families)})" if info.families else ""
            raise FieldError(
                f"hypernetwork {name!r} ({path.name}) has modules for "
                f"{'/'.join(map(str, info.widths))}-wide contexts{made_for}, but model "
                f"{task.model!r} ({family_text(model.family if model else None)}) "
                f"cross-attends to {width}-wide text: it is made for another base model",
                **where)
        twin = by_file.setdefault(ref.sha256, name)
        if twin != name:
            raise FieldError(f"hypernetwork {name!r} and {twin!r} are the same file "
                             f"({path.name})", **where)
        family = next(iter(info.families)) if len(info.families) == 1 else ref.family
        files[f"{KEY}:{name}"] = dataclasses.replace(ref, family=family, extra={
            **ref.extra, "widths": list(info.widths)})
    return files


@dataclass(frozen=True)
class StackEntry:
    """One hypernetwork a task applies: its file and strength."""

    name: str
    ref: FileRef
    strength: float


def active_stack(task: Task) -> tuple[StackEntry, ...]:
    """The task's hypernetworks that change pixels (strength 0 is left out), in order."""
    stack = []
    for name, strength in task.sections.get(KEY) or ():
        if strength == 0:
            continue
        ref = task.files.get(f"{KEY}:{name}")
        if ref is None:
            raise RuntimeError(f"task {task.job}#{task.index}: hypernetwork {name!r} has no "
                               "file; was the task preflighted?")
        stack.append(StackEntry(name, ref, float(strength)))
    return tuple(stack)


def _stack_key(stack: tuple[StackEntry, ...]) -> tuple[tuple[str, float], ...]:
    return tuple((entry.ref.sha256, entry.strength) for entry in stack)


@hookimpl
def group_key(task: Task) -> Any:
    """The active stack, by file hash and strength, in order."""
    stack = active_stack(task)
    return (KEY, _stack_key(stack)) if stack else None


# -- render: the attention processor -----------------------------------------------------------

class HypernetProcessor:
    """Wraps an attention layer's processor: keys and values read the transformed contexts.

    ``chain`` is ``((k_module, v_module, strength), ...)`` in the order they apply; ``key``
    (file hashes and strengths) identifies the stack, so an installed one is recognised.
    """

    def __init__(self, wrapped: Any, chain: tuple[tuple[Any, Any, float], ...],
                 key: tuple[tuple[str, float], ...]) -> None:
        setattr(self, WRAPPED, wrapped)
        self.chain = chain
        self.hypernetwork_key = key

    def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        view = _ShiftedAttention(attn, self.chain)
        return getattr(self, WRAPPED)(view, hidden_states, *args, **kwargs)


class _ShiftedAttention:
    """The attention module as the wrapped processor sees it: itself, but for ``to_k`` and
    ``to_v``, which first pass their input through the hypernetworks' key/value modules."""

    def __init__(self, attn: Any, chain: tuple[tuple[Any, Any, float], ...]) -> None:
        self._attn = attn
        self.to_k = _Shifted(attn.to_k, tuple((k, s) for k, _, s in chain))
        self.to_v = _Shifted(attn.to_v, tuple((v, s) for _, v, s in chain))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_attn"], name)


class _Shifted:
    """A projection whose input is first moved by each module: ``x + module(x) * s``."""

    def __init__(self, projection: Any, chain: tuple[tuple[Any, float], ...]) -> None:
        self._projection = projection
        self._chain = chain

    def __call__(self, x: Any) -> Any:
        for module, strength in self._chain:
            x = x + module(x) * strength
        return self._projection(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_projection"], name)


@hookimpl
def configure_pipeline(pipe: Any, batch: Batch) -> None:
    """Install the batch's stack on the UNet's attention, or restore the original processors
    for a batch without one (the model's exact pixels)."""
    stack = active_stack(batch.first)
    for task in batch.tasks[1:]:
        if _stack_key(active_stack(task)) != _stack_key(stack):
            raise RuntimeError("a batch mixes hypernetwork stacks; group_key should have "
                               "split it")
    apply_stack(pipe, stack)


@hookimpl
def task_inputs(task: Task, pipe: Any) -> dict[str, Any] | None:
    """No inputs: the last hook before each call, it makes sure the stack is still installed
    (the engine's out-of-memory fallback, attention slicing, replaces every processor)."""
    stack = active_stack(task)
    if stack:
        apply_stack(pipe, stack)
    return None


def apply_stack(pipe: Any, stack: tuple[StackEntry, ...]) -> None:
    """Make the UNet's processors those of ``stack`` (the originals when it is empty)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "set_attn_processor"):
        if stack:
            raise RuntimeError(f"{type(pipe).__name__} has no UNet to apply a hypernetwork to")
        return
    current = unet.attn_processors
    originals = {name: getattr(proc, WRAPPED, proc) for name, proc in current.items()}
    key = _stack_key(stack)
    by_width: dict[int, list[tuple[Any, Any, float]]] = {}
    for entry in stack:
        for width, (k, v) in built_modules(entry.ref, unet.device, unet.dtype).items():
            by_width.setdefault(width, []).append((k, v, entry.strength))
    chains = {name: tuple(by_width.get(_context_width(unet, name)) or ()) for name in current}
    if all(_installed(current[name], originals[name], key if chains[name] else None)
           for name in current):
        return
    unet.set_attn_processor({
        name: HypernetProcessor(originals[name], chains[name], key) if chains[name]
        else originals[name] for name in current})


def _installed(processor: Any, original: Any, key: Any) -> bool:
    """Whether ``processor`` is ``original`` wrapped for stack ``key`` (None: unwrapped)."""
    if key is None:
        return processor is original
    return (getattr(processor, "hypernetwork_key", None) == key
            and getattr(processor, WRAPPED, None) is original)


def _context_width(unet: Any, processor_name: str) -> int | None:
    """The width of what the layer's keys and values read (its ``to_k`` input)."""
    attn = unet.get_submodule(processor_name.removesuffix(".processor"))
    return getattr(attn, "cross_attention_dim", None)


#: Built modules by (file sha256, device, dtype), least recently used first.
_RESIDENT: OrderedDict[tuple[str, str, str], dict[int, tuple[Any, Any]]] = OrderedDict()


def built_modules(ref: FileRef, device: Any, dtype: Any) -> dict[int, tuple[Any, Any]]:
    """``{width: (k_module, v_module)}`` of a file, on ``device`` in ``dtype`` (built once)."""
    key = (ref.sha256, str(device), str(dtype))
    if key in _RESIDENT:
        _RESIDENT.move_to_end(key)
        return _RESIDENT[key]
    path = Path(ref.path)
    state = load_state_dict(path, allow_pickle=bool(ref.extra.get("allow_pickle")))
    flat = None if path.suffix.lower() in PICKLE_EXTS else safetensors_metadata(path)
    modules, metadata = split_modules(state, flat)
    info = hypernet_info(modules, metadata)
    built = {}
    for width, (k_state, v_state) in modules.items():
        built[width] = (_build(info, width, k_state).to(device=device, dtype=dtype),
                        _build(info, width, v_state).to(device=device, dtype=dtype))
    _RESIDENT[key] = built
    while len(_RESIDENT) > MAX_RESIDENT:
        _RESIDENT.popitem(last=False)
    return built


def _build(info: HypernetInfo, width: int, state: Mapping[str, Any]) -> Any:
    """A1111's module without its dropout: Linear, activation, LayerNorm, ... (eval mode)."""
    import torch

    tensors = {}
    for key, value in state.items():
        head, dot, leaf = str(key).rpartition(".")
        tensors[f"{_OLD_NAMES.get(head, head)}{dot}{leaf}"] = value
    layers = info.layers[width]
    last = max(layer.index for layer in layers if layer.kind == "linear")
    modules: list[Any] = []
    features = width
    for layer in layers:
        if layer.kind == "linear":
            module = torch.nn.Linear(features, layer.features)
        else:
            module = torch.nn.LayerNorm(layer.features)
        module.load_state_dict({"weight": tensors[f"linear.{layer.index}.weight"],
                                "bias": tensors[f"linear.{layer.index}.bias"]})
        modules.append(module)
        features = layer.features
        if layer.kind == "linear" and info.activation and (layer.index != last
                                                           or info.activate_output):
            modules.append(getattr(torch.nn, info.activation)())
    return torch.nn.Sequential(*modules).eval().requires_grad_(False)


# -- write: infotext ------------------------------------------------------------------------------

def untagged(task: Task) -> list[tuple[str, float]]:
    """The section's hypernetworks (strength not 0) that the prompt does not tag, in order."""
    tagged = {name for name, _ in inline_hypernetworks(task.prompt)[0]}
    return [(name, float(strength)) for name, strength in task.sections.get(KEY) or ()
            if name not in tagged and strength != 0]


@hookimpl
def infotext_prompt(task: Task, prompt: str) -> str | None:
    """A tag for every untagged hypernetwork but the last, which the ``Hypernet`` fields
    describe: A1111 appends that one as a tag when it pastes the infotext, after these, so
    the stack comes back in the order it rendered in."""
    rest = untagged(task)[:-1]
    if not rest:
        return None
    return prompt + "".join(f" <{TAG}:{name}:{format_number(s)}>" for name, s in rest)


@hookimpl
def result_metadata(task: Task, result: Result) -> dict[str, str] | None:
    """Old A1111's ``Hypernet``, ``Hypernet hash`` and ``Hypernet strength`` for the last
    hypernetwork the prompt does not tag (the others are tags: see ``infotext_prompt``)."""
    rest = untagged(task)
    if not rest:
        return None
    name, strength = rest[-1]
    ref = task.files.get(f"{KEY}:{name}")
    return {"Hypernet": name,
            "Hypernet hash": (ref.extra.get("a1111_hash") if ref else None) or None,
            "Hypernet strength": format_number(strength)}


@hookimpl
def axis_label(key: str) -> str | None:
    return section_axis_label(key, KEY, "Hypernetwork")
