"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, long prompts, clip skip, prompt
editing and alternation.

Users paste prompts from A1111 and civitai, so ``(cat:1.2)``, ``[blurry]``, ``BREAK``,
``[cat:dog:0.5]``, ``[red|blue]`` and prompts past 75 tokens must mean what they mean there.
The parsers are pure Python (job validation calls :func:`prompt_problem` without torch):
:func:`prompt_schedule` is A1111's prompt-editing schedule (which text until which step),
:func:`parse_attention` the weights of one such text. :func:`encode_schedules` turns a
batch's prompts into the ``prompt_embeds`` family of keyword arguments for a diffusers
pipeline call, plus a ``callback_on_step_end`` that switches them between steps when a
schedule changes; :func:`encode_prompts` does the same for prompts without editing.

Why the embeddings are computed here rather than through compel (which the project also
ships): compel cannot express the A1111 semantics this module promises.

- Weights. A1111 multiplies each token's embedding by its weight and then rescales the
  whole chunk so its mean is unchanged. compel instead pushes a token away from the
  empty-prompt embedding (weights > 1) or blends towards a copy of the prompt with the token
  masked out (weights < 1), so compel's ``1.2`` is not A1111's ``1.2``.
- BREAK. compel has no way to end a 75-token chunk early.
- Long prompts. A1111 moves the words after the last comma to the next chunk when that
  comma is within 20 tokens of the chunk's end; compel splits at sentence ends.
- Clip skip. compel offers the last or the penultimate layer only; A1111's setting goes
  deeper (``hidden_states[-N]``).

What we reproduce, and where we differ from A1111 (documented choices):

- Unbalanced brackets follow A1111: a ``(`` or ``[`` never closed applies its factor to
  everything after it; a stray ``)`` or ``]`` is literal text; ``:1.2)`` with no open ``(`` is
  literal text; a lone backslash is dropped; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
  literal characters.
- Prompt editing follows A1111 1.6+ (its default timeline): ``when`` with a '.' is a
  fraction of the steps, without one a step number; the 0-based step ``i`` takes the first
  schedule entry with ``i <= until`` (so ``[a|b]`` runs a, a, b, a, ...). Where A1111's own
  parser is ambiguous (an edit directly followed by a bracket or colon that closes nothing,
  ``[a:b:3]]``) its answer changes from run to run with Python's hash seed; we always read
  the edit. A ``|`` outside ``[a|b]`` or a lone backslash makes A1111 give up on editing for
  the whole prompt, and so do we. The steps counted are the ones the pipeline's loop runs
  (img2img: ``int(steps * strength)``; second-order samplers: their model calls).
- Composition with an uppercase ``AND`` raises ``ValueError`` (job validation reports it);
  a trailing ``:number`` of a whole prompt (``cat:1.5``, ``16:9``), which A1111 takes as a
  composition weight, is text here.
- ``BREAK`` inside brackets, ``(a BREAK b)`` or ``[a BREAK b]``, still ends the chunk; A1111
  multiplies its marker's weight by the bracket's and then encodes the word "break".
- The mean restoration runs per prompt, not per batch as in A1111, so an image does not
  depend on the other prompts in its batch. (Padding still does: every prompt and negative
  of one call is padded to the longest one's chunk count with empty-prompt chunks, as
  A1111's "pad prompt/negative prompt to be same length" option does.)
- A multi-vector textual-inversion embedding (diffusers' tokens ``<x>``, ``<x>_1``, ...) is
  expanded as diffusers' ``maybe_convert_prompt`` does; unlike A1111 it may straddle a
  chunk boundary.
- SDXL: an empty negative prompt gives all-zero embeddings when the pipeline's
  ``force_zeros_for_empty_prompt`` is set (A1111 does this for an empty negative; diffusers
  for a missing one). Clip skip 1 and 2 both mean SDXL's native penultimate layer (as in
  A1111 and ComfyUI); N > 2 takes ``hidden_states[-N]`` of both encoders. The pooled
  embedding comes from the first chunk of the second encoder, unweighted, as in A1111.
- Text-encoder LoRA: adapters set with ``set_adapters`` act here as in diffusers, but a
  ``lora_scale`` / ``cross_attention_kwargs={"scale": ...}`` given to the pipeline call does
  not reach these precomputed embeddings (diffusers applies it inside its own encoding).
- ``<lora:...>``-style tags left in a prompt are an error: the LoRA plugin removes them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "BREAK",
    "ScheduledConditioning",
    "chunk_tokens",
    "conditioning_chunks",
    "encode_prompts",
    "encode_schedules",
    "has_prompt_editing",
    "parse_attention",
    "prompt_problem",
    "prompt_schedule",
    "step_texts",
]

#: How :func:`parse_attention` marks a ``BREAK``; no written weight can be ``-inf``.
BREAK: tuple[str, float] = ("BREAK", float("-inf"))

ROUND = 1.1  # "(x)" multiplies by this, "[x]" divides by it
CHUNK_BACKTRACK = 20  # A1111's default "prompt word wrap length limit", in tokens

_TOKEN = re.compile(
    r"""
      (?P<escaped>\\[()\[\]\\])
    | (?P<backslash>\\)
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")
_AND = re.compile(r"\bAND\b")
#: An A1111 extra-network tag: ``<lora:name:0.6>``, ``<hypernet:name:1>``; kind and body.
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^<>]*)>")


def extra_network_tags(text: str, *kinds: str) -> list[re.Match[str]]:
    """The extra-network tags of ``text`` (of the given kinds, any case; all when none)."""
    wanted = {k.lower() for k in kinds}
    return [m for m in EXTRA_NETWORK_TAG.finditer(text)
            if not wanted or m.group(1).lower() in wanted]


def strip_extra_networks(text: str, replacement: str = "") -> str:
    """The prompt as the text encoder should see it: A1111 ``<kind:...>`` tags removed.

    Like A1111, only the tags go; the commas and spaces around them stay (CLIP's tokenizer
    ignores repeated spaces).
    """
    return EXTRA_NETWORK_TAG.sub(replacement, text)


def _multiply(parts: list[list[Any]], start: int, factor: float) -> None:
    """Scale the weights of every fragment from ``start`` on (BREAKs carry no weight)."""
    for part in parts[start:]:
        if part[1] != BREAK[1]:
            part[1] *= factor


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``(text, weight)`` fragments; :data:`BREAK` marks a BREAK.

    ``(x)`` is x1.1, ``[x]`` is /1.1, ``(x:1.3)`` sets 1.3, nesting multiplies, escapes and
    unbalanced brackets behave as in A1111 (see the module docstring). Neighbours of equal
    weight are merged and empty fragments dropped; an empty prompt gives ``[("", 1.0)]``.
    Square brackets are de-emphasis whatever they hold (``[a:b]``, ``[artist: x]``): prompt
    editing and alternation are resolved before this, by :func:`prompt_schedule`, which hands
    each step's text here. Raises ``ValueError`` for ``AND`` (composition, which we do not
    render) and for a weight that is not a number (``(x:1.2.3)``).
    """
    parts: list[list[Any]] = []
    opened: list[tuple[str, int]] = []  # open brackets, innermost last: (kind, index into parts)

    def close(kind: str) -> int | None:
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == kind:
                return opened.pop(i)[1]
        return None

    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        token = m.group(0)
        if kind == "escaped":
            parts.append([token[1], 1.0])
        elif kind == "backslash":
            continue
        elif kind == "open_round":
            opened.append(("(", len(parts)))
        elif kind == "open_square":
            opened.append(("[", len(parts)))
        elif kind == "weight":
            if not any(entry[0] == "(" for entry in opened):
                parts.append([token, 1.0])
                continue
            try:
                factor = float(m.group("weight"))
            except ValueError:
                raise ValueError(
                    f"attention weight {m.group('weight')!r} is not a number in {text!r}"
                ) from None
            start = close("(")
            assert start is not None
            _multiply(parts, start, factor)
        elif kind == "close_round":
            start = close("(")
            if start is None:
                parts.append([token, 1.0])
            else:
                _multiply(parts, start, ROUND)
        elif kind == "close_square":
            start = close("[")
            if start is None:
                parts.append([token, 1.0])
            else:
                _multiply(parts, start, 1 / ROUND)
        else:  # text or a literal colon
            if _AND.search(token):
                raise ValueError(_and_message(text))
            pieces = _BREAK_SPLIT.split(token)
            for i, piece in enumerate(pieces):
                if i:
                    parts.append(list(BREAK))
                parts.append([piece, 1.0])

    # brackets never closed apply to the rest of the prompt, rounds first (as A1111)
    for kind, factor in (("(", ROUND), ("[", 1 / ROUND)):
        for entry in [e for e in opened if e[0] == kind]:
            _multiply(parts, entry[1], factor)

    merged: list[tuple[str, float]] = []
    for fragment, weight in parts:
        if weight == BREAK[1]:
            merged.append(BREAK)
        elif not fragment:
            continue
        elif merged and merged[-1][1] == weight and merged[-1] != BREAK:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, float(weight)))
    return merged or [("", 1.0)]


# -- prompt editing and alternation ---------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``, ``when`` as written."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when: str


@dataclass(frozen=True)
class _Alternation:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` at each step."""

    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Edit | _Alternation
#: Plain text of A1111's editing grammar: anything but ``\ [ ] ( ) : |``, or an escape.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
#: The end of ``[...:when]``: a signed int, decimal or exponent number, spaces around it.
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
#: Deeper bracket nesting than this is read as text (no prompt nests so deep on purpose).
MAX_EDIT_DEPTH = 100
#: Validation tries every combination of a prompt's branches up to this many.
CHECK_LIMIT = 512


class _EditParser:
    """A1111's prompt-editing grammar by recursive descent.

    Inside brackets everything must nest properly: ``(p)``, ``(p:q)``, ``[p]`` (kept as
    text), ``[to:when]``, ``[from:to:when]`` and ``[a|b|...]``, where p, q ... are again such
    sequences of text and brackets. At the top level a bracket or colon that does not fit is
    text. A ``|`` outside ``[a|b]`` or a lone backslash makes A1111's parser give up, and the
    whole prompt is then text (:meth:`parse` returns None).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.depth = 0

    def parse(self) -> tuple[_Node, ...] | None:
        text, i, nodes = self.text, 0, []
        while True:
            part, i = self.sequence(i)
            nodes.extend(part)
            if i == len(text):
                return tuple(nodes)
            if text[i] not in "[]():":
                return None
            nodes.append(text[i])  # a bracket or colon that closes nothing: text
            i += 1

    def sequence(self, i: int) -> tuple[list[_Node], int]:
        text, nodes = self.text, []
        while i < len(text):
            plain = _PLAIN.match(text, i)
            if plain:
                nodes.append(plain.group())
                i = plain.end()
                continue
            if text[i] not in "([" or self.depth >= MAX_EDIT_DEPTH:
                break
            self.depth += 1
            bracket = self.round(i) if text[i] == "(" else self.square(i)
            self.depth -= 1
            if bracket is None:
                break
            nodes.extend(bracket[0])
            i = bracket[1]
        return nodes, i

    def at(self, i: int, char: str) -> bool:
        return i < len(self.text) and self.text[i] == char

    def round(self, i: int) -> tuple[list[_Node], int] | None:
        first, j = self.sequence(i + 1)
        if self.at(j, ")"):
            return ["(", *first, ")"], j + 1
        if self.at(j, ":"):
            second, k = self.sequence(j + 1)
            if self.at(k, ")"):
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def square(self, i: int) -> tuple[list[_Node], int] | None:
        first, j = self.sequence(i + 1)
        if self.at(j, "]"):
            return ["[", *first, "]"], j + 1
        if self.at(j, "|"):
            options = [tuple(first)]
            while self.at(j, "|"):
                option, j = self.sequence(j + 1)
                options.append(tuple(option))
            return ([_Alternation(tuple(options))], j + 1) if self.at(j, "]") else None
        if not self.at(j, ":"):
            return None
        when = _WHEN.match(self.text, j + 1)
        if when:
            return [_Edit(None, tuple(first), when.group(1))], when.end()
        second, k = self.sequence(j + 1)
        when = _WHEN.match(self.text, k + 1) if self.at(k, ":") else None
        if when:
            return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
        return None


@lru_cache(maxsize=4096)
def _parse_edits(text: str) -> tuple[_Node, ...] | None:
    return _EditParser(text).parse()


def has_prompt_editing(text: str) -> bool:
    """Whether ``text`` holds prompt editing ``[a:b:when]`` or alternation ``[a|b]``."""
    nodes = _parse_edits(text)
    return nodes is not None and _has_edits(nodes)


def _has_edits(nodes: tuple[_Node, ...]) -> bool:
    return any(not isinstance(node, str) for node in nodes)


def _switch_step(when: str, steps: int, first_pass: int | None) -> int:
    """The last step of ``[a:b:when]``'s first branch on a timeline of ``steps`` (A1111 1.6+).

    A number written with a '.' is a fraction of the steps (``0.5``; ``1.5`` is past the end),
    one without is a step number. On a second (hires) pass after ``first_pass`` steps, the
    fractions count from 1.0 and the step numbers from the first pass's end.
    """
    value = float(when)
    if "." in when:
        value = (value - (1.0 if first_pass is not None else 0.0)) * steps
    else:
        value -= first_pass or 0
    return int(min(max(value, -1.0), steps))  # beyond either end, the end (no overflow)


def _text_at(nodes: tuple[_Node, ...], step: int, steps: int, first_pass: int | None) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            first = step <= _switch_step(node.when, steps, first_pass)
            out.append(_text_at(node.before or () if first else node.after, step, steps,
                                first_pass))
        else:
            option = node.options[(step - 1) % len(node.options)]
            out.append(_text_at(option, step, steps, first_pass))
    return "".join(out)


def _switches(nodes: tuple[_Node, ...], steps: int, first_pass: int | None,
              found: set[int]) -> None:
    """Collect the steps after which some part of the prompt changes (in every branch)."""
    for node in nodes:
        if isinstance(node, _Edit):
            step = _switch_step(node.when, steps, first_pass)
            if step >= 1:
                found.add(step)
            _switches(node.before or (), steps, first_pass, found)
            _switches(node.after, steps, first_pass, found)
        elif isinstance(node, _Alternation):
            found.update(range(1, steps + 1))
            for option in node.options:
                _switches(option, steps, first_pass, found)


@lru_cache(maxsize=1024)
def _schedule(text: str, steps: int, first_pass: int | None) -> tuple[tuple[int, str], ...]:
    nodes = _parse_edits(text)
    if nodes is None:
        return ((steps, text),)
    ends = {steps}
    _switches(nodes, steps, first_pass, ends)
    return tuple((end, _text_at(nodes, end, steps, first_pass)) for end in sorted(ends))


def prompt_schedule(text: str, steps: int, *, hires_steps: int | None = None
                    ) -> list[tuple[int, str]]:
    """A1111's prompt-editing schedule: ``(until_step, text)`` pairs, ``until_step`` rising.

    ``[from:to:when]`` is ``from`` until step ``when``, then ``to``; ``[to:when]`` adds ``to``
    after ``when``, ``[from::when]`` removes ``from``; ``when`` with a '.' is a fraction of
    ``steps`` (``0.25``), without one a step number. ``[a|b|c]`` takes the next option every
    step. They nest, and hold weights, BREAKs and embeddings. Square brackets holding anything
    else (``[a:b]``, ``[artist: x]``) stay text, for :func:`parse_attention` to de-emphasise.
    ``hires_steps``: the timeline of a second pass of that many steps after ``steps``.

    As in A1111's sampler, the 0-based step ``i`` uses the first pair with ``i <= until_step``
    (see :func:`step_texts`). Pure Python.
    """
    if hires_steps is None:
        return list(_schedule(text, steps, None))
    return list(_schedule(text, hires_steps, steps))


def step_texts(text: str, steps: int) -> list[str]:
    """The text each of ``steps`` denoising steps conditions on (index = the 0-based step)."""
    schedule = _schedule(text, max(steps, 1), None)
    texts, entry = [], 0
    for step in range(max(steps, 1)):
        while step > schedule[entry][0]:
            entry += 1
        texts.append(schedule[entry][1])
    return texts


def _every_text(nodes: tuple[_Node, ...], limit: int) -> list[str]:
    """The texts the branches combine into, for validation: all of them while there are at
    most ``limit``, past that enough for every branch of every edit to be in one."""
    texts = [""]
    for node in nodes:
        if isinstance(node, str):
            choices = [node]
        elif isinstance(node, _Edit):
            choices = _every_text(node.before or (), limit) + _every_text(node.after, limit)
        else:
            choices = [t for option in node.options for t in _every_text(option, limit)]
        if len(texts) * len(choices) <= limit:
            combined: Iterable[str] = (a + b for a in texts for b in choices)
        else:  # too many to try them all: every text so far once, every choice once
            combined = itertools.chain(
                (a + choices[i % len(choices)] for i, a in enumerate(texts)),
                (texts[0] + b for b in choices))
        texts = list(dict.fromkeys(combined))
    return texts


@lru_cache(maxsize=4096)
def prompt_problem(text: str) -> str | None:
    """Why the renderer could not honour the prompt ``text``, or None. Pure Python.

    Job validation calls this on every prompt and negative, so that what the encoder would
    refuse (``AND``, a weight that is not a number, in any branch of an edit) is a located
    job-file error before anything loads. Extra-network tags are left to their plugins.
    """
    visible = strip_extra_networks(text)
    if _AND.search(visible):
        return _and_message(visible)
    nodes = _parse_edits(visible)
    for candidate in [visible] if nodes is None else _every_text(nodes, CHECK_LIMIT):
        try:
            parse_attention(candidate)
        except ValueError as exc:
            return str(exc) if candidate == visible else f"{exc}, a step of {visible!r}"
    return None


def _and_message(text: str) -> str:
    return (f"'AND' is A1111's prompt-composition keyword, which render does not support: "
            f"{text!r}; write 'and' for the word")


def chunk_tokens(
    fragments: list[tuple[list[int], float] | None],
    *,
    chunk_length: int = 75,
    comma_id: int | None = None,
    backtrack: int = CHUNK_BACKTRACK,
) -> list[tuple[list[int], list[float]]]:
    """Cut token ids into A1111's 75-token chunks; ``None`` in ``fragments`` is a BREAK.

    A full chunk whose last comma lies within ``backtrack`` tokens of its end is cut after
    that comma and the rest moves on. A BREAK ends the current chunk, even an empty one;
    a trailing BREAK adds nothing. Always returns at least one (possibly empty) chunk.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment is None:
            close()
            continue
        tokens, weight = fragment
        for token in tokens:
            if len(ids) == chunk_length:
                if token != comma_id and last_comma >= 0 and len(ids) - last_comma <= backtrack:
                    cut = last_comma + 1
                    tail_ids, tail_weights = ids[cut:], weights[cut:]
                    ids, weights = ids[:cut], weights[:cut]
                    close()
                    ids, weights = tail_ids, tail_weights
                else:
                    close()
            if token == comma_id:
                last_comma = len(ids)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


class _Encoder:
    """One tokenizer + text encoder of a pipeline, encoding A1111 chunks."""

    def __init__(self, pipe: Any, tokenizer: Any, text_encoder: Any, *, sdxl: bool,
                 clip_skip: int, pooled: bool) -> None:
        self.pipe = pipe
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.sdxl = sdxl
        self.clip_skip = clip_skip
        self.pooled = pooled
        layers = text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            raise ValueError(f"clip_skip {clip_skip} exceeds the text encoder's {layers} layers")
        length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self.length = length
        vocab = tokenizer.get_vocab()
        self.comma_id = vocab.get(",</w>")
        self.use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        # transformers 5 flattened CLIPTextModel (no .text_model); 4.x nests it. diffusers
        # 0.42 still reaches for .text_model, so its own clip_skip fails on transformers 5.
        inner = getattr(text_encoder, "text_model", text_encoder)
        self.final_norm = inner.final_layer_norm
        # diffusers loads an n-vector textual inversion "<x>" as tokens <x>, <x>_1 ... <x>_n-1
        # and expands the prompt ("maybe_convert_prompt"); do the same on token ids
        added = dict(tokenizer.added_tokens_encoder)
        self.multi_vector: dict[int, list[int]] = {}
        for token, token_id in added.items():
            extra, k = [], 1
            while f"{token}_{k}" in added:
                extra.append(added[f"{token}_{k}"])
                k += 1
            if extra:
                self.multi_vector[token_id] = extra

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos, multi-vector embeddings expanded."""
        if not text:
            return []
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
        out: list[int] = []
        for token_id in ids["input_ids"]:
            out.append(token_id)
            out.extend(self.multi_vector.get(token_id, ()))
        return out

    def chunks(self, fragments: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
        items: list[tuple[list[int], float] | None] = [
            None if frag == BREAK else (self.token_ids(frag[0]), frag[1]) for frag in fragments
        ]
        return chunk_tokens(items, chunk_length=self.length - 2, comma_id=self.comma_id)

    def encode_chunk(self, ids: list[int], weights: list[float], device: Any) -> tuple[Any, Any]:
        """Embeddings (1, length, dim) of one chunk with A1111 weighting, and pooled or None."""
        import torch

        tok = self.tokenizer
        pad = self.length - 2 - len(ids)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        full = [tok.bos_token_id, *ids, tok.eos_token_id] + [pad_id] * pad
        input_ids = torch.tensor([full], dtype=torch.long, device=device)
        mask = None
        if self.use_mask and not self.sdxl:
            mask = torch.tensor([[1] * (len(ids) + 2) + [0] * pad], device=device)
        hidden = self.sdxl or self.clip_skip > 1
        out = self.text_encoder(input_ids, attention_mask=mask, output_hidden_states=hidden)
        if self.sdxl:
            z = out.hidden_states[-max(2, self.clip_skip)]
        elif self.clip_skip == 1:
            z = out.last_hidden_state
        else:
            z = self.final_norm(out.hidden_states[-self.clip_skip])
        pooled = out.text_embeds if self.pooled else None
        full_weights = [1.0, *weights, 1.0] + [1.0] * pad
        if any(w != 1.0 for w in full_weights):
            z = _emphasis(z, full_weights)
        return z, pooled


def _emphasis(z: Any, weights: list[float]) -> Any:
    """A1111's "Original" emphasis: scale each token's vector, then restore the chunk mean.

    When either mean is ~0 next to the values themselves (a randomly initialised encoder
    whose final LayerNorm has no bias; never a trained CLIP) the ratio would be noise, so
    the plain scaling is kept instead.
    """
    import torch

    zf = z.float()
    original_mean = zf.mean()
    scale = torch.tensor(weights, dtype=torch.float32, device=z.device).reshape(1, -1, 1)
    weighted = zf * scale
    new_mean = weighted.mean()
    floor = 1e-3 * float(zf.abs().mean())
    if min(abs(float(original_mean)), abs(float(new_mean))) > floor:
        weighted = weighted * (original_mean / new_mean)
    return weighted.to(z.dtype)


def _is_sdxl(pipe: Any) -> bool:
    """SDXL-style: a second, projecting CLIP encoder (base and refiner), nothing beyond it."""
    return hasattr(pipe, "text_encoder_2")


def _encoders(pipe: Any, clip_skip: int) -> list[_Encoder]:
    sdxl = _is_sdxl(pipe)
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))]
    if sdxl:
        pairs.append((getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2))
    pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
    # SD1/SD2 (CLIPTextModel) and SDXL (+ CLIPTextModelWithProjection) only: SD3 and Flux
    # also have a text_encoder_2, but a T5 one, which A1111's chunking does not apply to.
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    wanted = [CLIPTextModel] * (len(pairs) - 1) + [
        CLIPTextModelWithProjection if sdxl else CLIPTextModel
    ]
    found = [type(e).__name__ for _, e in pairs]
    fits = all(isinstance(e, cls) for (_, e), cls in zip(pairs, wanted, strict=True))
    if not pairs or not fits or hasattr(pipe, "text_encoder_3"):
        raise ValueError(
            f"{type(pipe).__name__}: A1111 prompt encoding supports SD1.x, SD2.x and SDXL text "
            f"encoders, not {found or 'none'}"
        )
    last = len(pairs) - 1
    return [
        _Encoder(pipe, t, e, sdxl=sdxl, clip_skip=clip_skip, pooled=sdxl and i == last)
        for i, (t, e) in enumerate(pairs)
    ]


def _zero_empty(pipe: Any) -> bool:
    """SDXL's ``force_zeros_for_empty_prompt``: an empty negative is all zeros."""
    config = getattr(pipe, "config", None)
    return _is_sdxl(pipe) and bool(getattr(config, "force_zeros_for_empty_prompt", False))


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def conditioning_chunks(pipe: Any, prompt: str, negative: str, *, clip_skip: int = 1,
                        steps: int | None = None) -> int:
    """How many 75-token chunks one task's conditioning has when encoded on its own.

    :func:`encode_schedules` pads a batch to its longest prompt; a short prompt padded with
    empty chunks gives another image, so tasks with different counts must not share a
    pipeline call (the engine groups by this). With prompt editing the count is the most
    chunks of any text the ``steps`` denoising steps use (``steps`` None: the prompts must
    not be edited). Tokenizes only; encodes nothing.
    """
    encoders = _encoders(pipe, clip_skip)
    texts = _step_text_sets(prompt, negative, steps)
    if _zero_empty(pipe) and texts[1] == [""]:
        texts = (texts[0], [])
    return max(len(enc.chunks(parse_attention(text))) for text in (*texts[0], *texts[1])
               for enc in encoders)


def _step_text_sets(prompt: str, negative: str, steps: int | None) -> tuple[list[str], list[str]]:
    if steps is None:
        for text in (prompt, negative):
            _refuse_editing(text, "conditioning_chunks without steps")
        return [prompt], [negative]
    return _distinct(step_texts(prompt, steps)), _distinct(step_texts(negative, steps))


def _refuse_editing(text: str, what: str) -> None:
    if has_prompt_editing(text):
        raise ValueError(
            f"prompt editing / alternation ('[a:b:when]', '[a|b]') is not supported by {what}, "
            f"which has no step count: {text!r}; use encode_schedules"
        )


def _check_call(prompts: list[str], negatives: list[str], clip_skip: int) -> None:
    if len(prompts) != len(negatives):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    if not prompts:
        raise ValueError("no prompts to encode")
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
    for text in (*prompts, *negatives):
        tags = extra_network_tags(text, "lora", "lyco", "hypernet")
        if tags:
            raise ValueError(
                f"prompt still holds the tag {tags[0].group(0)!r}: extra-network tags must be "
                f"taken out (by the lora plugin) before the prompt is encoded"
            )


def encode_prompts(
    pipe: Any, prompts: list[str], negatives: list[str], *, clip_skip: int = 1
) -> dict[str, Any]:
    """Encode A1111-syntax prompts into the embeddings keyword arguments of ``pipe(...)``.

    Returns ``prompt_embeds`` and ``negative_prompt_embeds`` (batch = ``len(prompts)``), plus
    ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds`` for SDXL. Long prompts are
    cut into 75-token chunks and concatenated, never truncated; all results are padded to the
    same chunk count. ``clip_skip`` is A1111's: 1 is the last layer (diffusers' default), 2
    the penultimate (diffusers' ``clip_skip=1``). A prompt whose weights are all 1.0 gives
    exactly what the pipeline computes from ``prompt=`` for up to 75 tokens. One text per
    prompt: prompt editing needs the step count (:func:`encode_schedules`).
    """
    _check_call(prompts, negatives, clip_skip)
    for text in (*prompts, *negatives):
        _refuse_editing(text, "encode_prompts")
    zero = _zero_empty(pipe)
    embeds, pooled = _encode_texts(
        pipe, [(p, False) for p in prompts] + [(n, zero and n == "") for n in negatives],
        clip_skip)
    return _call_kwargs(embeds, pooled, list(range(len(prompts))),
                        list(range(len(prompts), len(embeds))))


def _call_kwargs(embeds: list[Any], pooled: list[Any], rows: list[int],
                 negative_rows: list[int]) -> dict[str, Any]:
    """The pipeline's embeddings arguments: prompt ``rows`` and ``negative_rows`` of a batch."""
    import torch

    out: dict[str, Any] = {
        "prompt_embeds": torch.cat([embeds[i] for i in rows]),
        "negative_prompt_embeds": torch.cat([embeds[i] for i in negative_rows]),
    }
    if pooled[0] is not None:
        out["pooled_prompt_embeds"] = torch.cat([pooled[i] for i in rows])
        out["negative_pooled_prompt_embeds"] = torch.cat([pooled[i] for i in negative_rows])
    return out


def _encode_texts(pipe: Any, texts: list[tuple[str, bool]], clip_skip: int
                  ) -> tuple[list[Any], list[Any]]:
    """Embeddings ``(1, tokens, dim)`` and pooled ``(1, dim)`` (SDXL; else None) per text.

    ``texts`` are ``(text, zero)``; a zero one (SDXL's empty negative) is all zeros, and the
    first text must not be one. Every text is padded with empty-prompt chunks to the most
    chunks of any of them.
    """
    import torch

    encoders = _encoders(pipe, clip_skip)
    sdxl = _is_sdxl(pipe)
    device = getattr(pipe, "_execution_device", None) or encoders[0].text_encoder.device

    with torch.no_grad():
        empty: list[Any] = []  # empty-prompt chunk per encoder, for padding

        def padding_chunk() -> Any:
            if not empty:
                for enc in encoders:
                    empty.append(enc.encode_chunk([], [], device)[0])
            return torch.cat(empty, dim=-1)

        def encode(fragments: list[tuple[str, float]]) -> tuple[list[Any], Any]:
            per_encoder = []
            pooled = None
            for enc in encoders:
                zs = []
                for i, (ids, weights) in enumerate(enc.chunks(fragments)):
                    z, p = enc.encode_chunk(ids, weights, device)
                    zs.append(z)
                    if i == 0 and p is not None:
                        pooled = p
                per_encoder.append(zs)
            count = max(len(zs) for zs in per_encoder)
            chunks = []
            for i in range(count):
                parts = []
                for enc_index, zs in enumerate(per_encoder):
                    if i < len(zs):
                        parts.append(zs[i])
                    else:  # encoders disagree on chunk count (e.g. an embedding in one only)
                        padding_chunk()
                        parts.append(empty[enc_index])
                chunks.append(torch.cat(parts, dim=-1))
            return chunks, pooled

        results: list[tuple[list[Any], Any, bool]] = [
            ([], None, True) if zero else (*encode(parse_attention(text)), False)
            for text, zero in texts
        ]
        longest = max(len(chunks) for chunks, _, zero in results if not zero)
        reference = results[0][0][0]  # the first text's first chunk: never a zeroed one
        embeds = []
        for chunks, _, zero in results:
            if zero:
                shape = (1, longest * reference.shape[1], reference.shape[2])
                embeds.append(reference.new_zeros(shape))
            else:
                padding = [padding_chunk() for _ in range(longest - len(chunks))]
                embeds.append(torch.cat([*chunks, *padding], dim=1))

    pooled_reference = results[0][1]
    pooled_all = [
        pooled_reference.new_zeros(pooled_reference.shape) if sdxl and zero else pooled
        for _, pooled, zero in results
    ]
    return embeds, pooled_all


@dataclass
class ScheduledConditioning:
    """What :func:`encode_schedules` gives a pipeline call.

    ``kwargs``: the embeddings arguments for the first step. ``callback``: for diffusers'
    ``callback_on_step_end`` with ``tensor_inputs`` as ``callback_on_step_end_tensor_inputs``;
    None when no task's prompt or negative changes during the steps (then the call is exactly
    a plain one). ``texts``: per task, the prompt and the negative text of every step.
    """

    kwargs: dict[str, Any]
    callback: Callable[..., dict[str, Any]] | None
    tensor_inputs: list[str]
    texts: list[tuple[list[str], list[str]]]


def encode_schedules(pipe: Any, prompts: list[str], negatives: list[str], *, steps: int,
                     clip_skip: int = 1) -> ScheduledConditioning:
    """Encode prompts with A1111 prompt editing and alternation for a ``steps``-step call.

    ``steps`` is the number of denoising steps the pipeline's loop will run (img2img runs
    fewer than asked: the schedule counts the ones that run). Each distinct text of the
    batch's schedules is encoded once, as :func:`encode_prompts` would (A1111 weights,
    chunks, every text padded to the most chunks); the callback then switches
    ``prompt_embeds`` (and SDXL's pooled ``add_text_embeds``) between steps, each task of the
    batch on its own schedule.
    """
    _check_call(prompts, negatives, clip_skip)
    zero = _zero_empty(pipe)
    texts = [(step_texts(p, steps), step_texts(n, steps)) for p, n in zip(prompts, negatives,
                                                                          strict=True)]
    # A negative that is empty at every step is SDXL's zeros; one empty at some steps only is
    # encoded (A1111 zeroes a negative only when all its texts are empty).
    zeroed = [zero and set(n) == {""} for _, n in texts]
    items: dict[tuple[str, bool], int] = {}  # (text, zeroed) -> index of its embedding
    for prompt_steps, _ in texts:
        for text in prompt_steps:
            items.setdefault((text, False), len(items))
    for (_, negative_steps), empty in zip(texts, zeroed, strict=True):
        for text in negative_steps:
            items.setdefault((text, empty), len(items))
    embeds, pooled = _encode_texts(pipe, list(items), clip_skip)
    per_step = [([items[(p[step], False)] for p, _ in texts],
                 [items[(n[step], empty)] for (_, n), empty in zip(texts, zeroed, strict=True)])
                for step in range(len(texts[0][0]))]
    first = _call_kwargs(embeds, pooled, *per_step[0])
    if all(r == per_step[0] for r in per_step):
        return ScheduledConditioning(first, None, [], texts)
    switch = _StepSwitch(embeds, pooled, per_step)
    return ScheduledConditioning(first, switch, switch.tensor_inputs, texts)


class _StepSwitch:
    """``callback_on_step_end``: after step ``i``, give step ``i + 1``'s embeddings.

    The pipeline holds ``prompt_embeds`` (and SDXL's ``add_text_embeds``) as one tensor,
    ``[negatives, prompts]`` under classifier-free guidance, the prompts alone without it.
    """

    def __init__(self, embeds: list[Any], pooled: list[Any],
                 per_step: list[tuple[list[int], list[int]]]) -> None:
        self.embeds = embeds
        self.pooled = pooled
        self.per_step = per_step
        self.tensor_inputs = ["prompt_embeds"]
        if pooled[0] is not None:
            self.tensor_inputs.append("add_text_embeds")

    def __call__(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        import torch

        steps = len(self.per_step)
        if i == 0 and getattr(pipe, "_num_timesteps", steps) != steps:
            raise RuntimeError(f"{type(pipe).__name__} runs {pipe._num_timesteps} steps, but "
                               f"the prompt schedule was made for {steps}")
        if i + 1 >= steps or self.per_step[i + 1] == self.per_step[i]:
            return {}
        batch = _call_kwargs(self.embeds, self.pooled, *self.per_step[i + 1])
        guided = bool(getattr(pipe, "do_classifier_free_guidance", True))
        out = {}
        for name, positive, negative in (
            ("prompt_embeds", "prompt_embeds", "negative_prompt_embeds"),
            ("add_text_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        ):
            if name in self.tensor_inputs:
                value = (torch.cat([batch[negative], batch[positive]]) if guided
                         else batch[positive])
                out[name] = value.to(tensors[name])
        return out
