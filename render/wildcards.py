r"""Prompt templates in the sd-dynamic-prompts syntax: variants, wildcards, counting, expansion.

Why our own parser rather than the ``dynamicprompts`` library:

* the explosion guard must know how many tasks a combinatorial template makes *before*
  expanding it; :func:`count` is exact and cheap even at 10**12 (it never enumerates), and
  saturates at ``COUNT_LIMIT`` (2**64) so ``{1-999999$$__big__}`` costs no more;
  :func:`longest` bounds the text an expansion can grow to, before one is built;
* a wildcard that resolves to nothing must be an error naming it (dynamicprompts only logs a
  warning and returns up to ``max_prompts`` copies of the raw ``__name__`` text);
* random picks must be deterministic from a seed (``random.Random`` only, nothing that depends
  on hash randomisation or on the order of a directory listing);
* A1111 syntax (``(w:1.2)``, ``[a:b:0.5]``, ``[a|b]``, ``<lora:x:0.6>``, ``\(``) must pass
  through untouched, and a ``50%`` in a prompt must not be a parse error.

Syntax (``{``, ``}``, ``|`` and ``$$`` are special only as described; everything else is text):

==========================  ==========================================================
``{a|b|c}``                 one of the options; ``{a|}`` has an empty option; nestable
``{0.5::a|2::b|c}``         weights (default 1); random mode only, combinatorial lists all
``{2$$a|b|c}``              2 distinct options in either order, joined with ``", "``
``{1-2$$a|b}``              1 to 2 options; ``{-2$$..}`` = 1-2, ``{2-$$..}`` = 2-all
``{2$$ and $$a|b|c}``       custom joiner (any text without ``$``, ``{``, ``}``)
``{2$$__name__}``           2 distinct values of one wildcard (the only option is it)
``__name__``                a value of ``name.txt`` (or a yaml/json key) in wildcard dirs
``__sub/dir/name__``        a file in a subfolder, or a nested yaml/json key (``\`` is ``/`` too)
``__dir/*__``, ``__*/x__``  glob (``*`` also crosses ``/``, ``?`` is one character,
                            ``[c]``/``[!c]`` classes): the union of the matching values
``__name__`` not found      ``**/name``: the name under any folder (their union)
``__name-{a|b}__``          variants in a name: each name looked up, their values in turn
``${x=v}`` ``${x}``          variables (``${x=!v}`` chosen once, ``${x:default}``)
``__name(x=v)__``           a wildcard with variables set for its values
``%{w ... x$$prompt}``      wrap: the prompt where the wrapper's first ``...`` is
``# note``                  a comment, to the end of its line (and the spaces before it)
``\{ \} \| \_ \#``          literal ``{ } | _ #``; ``\\`` and every other ``\x`` stay as written
==========================  ==========================================================

Decisions (where dynamicprompts differs, or is silent):

* Combinatorial order: the leftmost choice varies slowest; options and values in written
  order; a multi-pick lists k = low..high, then index orderings in lexicographic order.
* ``{k$$...}`` picks k distinct options *in order*, as SYNTAX.md documents ("vanilla,
  chocolate"): ``{2$$a|b|c}`` gives P(3,2) = 6 expansions; a random pick keeps the order it
  drew, so every :func:`sample` is one of the :func:`combinations`. A text option written
  twice is one (the weights added): ``{2$$a|a|b}`` never gives "a, a"; two wildcard options
  may give the same value (see :func:`_pool`). Bounds are clamped to the number of
  options; empty picks are dropped before joining (no dangling separators).
* Default joiner ``", "`` as documented by dynamicprompts (its code joins with ``","``).
* Whitespace: as dynamicprompts, the whitespace at the start of each option (before its
  weight) is dropped and nothing else; wildcard values are stripped at both ends.
* Wildcard values are de-duplicated by text (first occurrence wins, as dynamicprompts) but
  kept in file order (dynamicprompts sorts them). Weights in combinatorial mode are ignored
  (dynamicprompts repeats a value ``int(weight)`` times).
* ``.txt``: one value per line; blank lines and lines starting with ``#`` are skipped; a
  ``#`` later in a line starts a comment, as in a template; ``2::x`` is plain text
  (dynamicprompts too: no weights in txt).
  ``.yaml``/``.yml``/``.json``: as dynamicprompts, the file name is *not* part of the path:
  top-level keys are names relative to the file's folder, nested mappings give
  ``key/sub``, only a list holds values (``flurp: 12345`` is ignored, as SYNTAX.md says), and
  a top-level list is named after the file. List items may be ``"2::text"`` or
  ``{text: ..., weight: 2}``.
* Several dirs: the first dir that defines a name wins; within one dir a name defined twice
  is an error when used. A name found nowhere is looked for under every folder
  (``**/name``, as dynamicprompts); only then is it an error, suggesting a close name.
* A ``}`` outside a variant is text (dynamicprompts too).
* Variables (SYNTAX.md): ``${x=value}`` sets ``x`` for the rest of the template and every
  wildcard value it reaches, re-expanded at each ``${x}``; ``${x=!value}`` is chosen once
  (combinatorial mode lists each choice, dynamicprompts only the first); ``${x:default}``;
  ``__name(x=value, y=value)__`` sets them for one wildcard. A variable used but never set,
  without a default, is an error. Counting stays exact: an immediate variable multiplies by
  its value's expansions, a non-immediate one by its value's at each use.
* Sampler prefixes (``{~a|b}``, ``{@a|b}``, ``{!a|b}``, ``__~x__`` ...): see
  :class:`Variant`; they apply to a single pick. In combinatorial mode a ``~`` or ``@``
  choice counts once (dynamicprompts repeats a random draw up to ``max_prompts`` times).
* The wrap command ``%{wrapper$$prompt}`` puts the prompt at the wrapper's first ``...``; a
  wrapper without ``...`` is an error (dynamicprompts appends the prompt to it silently).
* A syntax error inside a wildcard value is reported at ``file:line:column``.
* ``picks`` holds the expanded text of each top-level choice (variant or wildcard) of the
  template, in template order, so every expansion of a template has the same number.
"""

from __future__ import annotations

import bisect
import difflib
import fnmatch
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from render import jobfile
from render.errors import JobError

__all__ = [
    "COUNT_LIMIT",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NESTING",
    "Expansion",
    "Library",
    "Literal",
    "Node",
    "Option",
    "Seq",
    "Value",
    "Variant",
    "Wildcard",
    "WildcardError",
    "combinations",
    "count",
    "longest",
    "parse",
    "sample",
]

MAX_DEPTH = 32          # wildcards inside wildcard values, deeper than this is an error
MAX_NESTING = 32        # variants inside variants within one template or value
#: Counts saturate here: no run renders 2**64 tasks, and exact arithmetic on the 2**100000
#: subsets of a 100,000-line file would keep the explosion guard busy for minutes.
COUNT_LIMIT = 2**64
#: The largest wildcard file read, in bytes (big tag collections are a few MiB).
MAX_FILE_BYTES = 8 * 2**20
#: The most YAML values a wildcard file may expand to, aliases counted as often as used.
MAX_FILE_NODES = 1_000_000
DEFAULT_JOINER = ", "
SUFFIXES = (".txt", ".yaml", ".yml", ".json")


class WildcardError(ValueError):
    """A template or wildcard problem the user can fix; the caller adds the job file:line.

    ``name`` is the wildcard (``__season__``) or the offending text, ``where`` the wildcard
    file and line the problem sits in, if it is inside a wildcard value.
    """

    def __init__(self, name: str, message: str, where: str | None = None, *,
                 column: int | None = None, bare: str | None = None) -> None:
        self.name = name
        self.message = message
        self.where = where
        self.column = column            # a syntax error's column (1-based), if it is one
        self.bare = bare or message     # the message without "at column N"
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def located(self, where: str) -> WildcardError:
        """The same error, placed in a wildcard file (only the innermost place is kept)."""
        if self.where is not None:
            return self
        return WildcardError(self.name, self.message, where, column=self.column,
                             bare=self.bare)


# --------------------------------------------------------------------------------------------
# AST


@dataclass(frozen=True, slots=True)
class Literal:
    """Plain text, escapes already resolved."""

    text: str


@dataclass(frozen=True)
class Wildcard:
    """``__name__``; ``name`` may be a glob. ``sampler``: ``~``, ``@`` or ``!`` as written
    (``__~name__``), see :class:`Variant`."""

    name: str
    sampler: str = ""


@dataclass(frozen=True)
class NamedBy:
    """``__colors-{cold|warm}__``: a wildcard whose name is itself a template; each of the
    name's expansions is looked up, and their values are the union, in name order."""

    name: Seq


@dataclass(frozen=True)
class Assign:
    """``${name=value}`` (``immediate``: ``${name=!value}``): sets a variable for the rest of
    the template and the wildcard values it reaches; expands to nothing."""

    name: str
    value: Seq
    immediate: bool = False


@dataclass(frozen=True)
class Ref:
    """``${name}`` or ``${name:default}``: the variable's value (non-immediate: expanded
    afresh at each use; immediate: the one text chosen at the assignment)."""

    name: str
    default: Seq | None = None


@dataclass(frozen=True)
class WithParams:
    """``__name(var=value, ...)__``: the wildcard with those variables set for its values."""

    target: Wildcard | NamedBy
    params: tuple[tuple[str, Seq], ...]


@dataclass(frozen=True)
class Wrap:
    """``%{wrapper$$prompt}``: each expansion of ``prompt`` put where the wrapper's first
    ``...`` is, in each expansion of the wrapper."""

    wrapper: Seq
    body: Seq


WRAP_MARKER = "..."


@dataclass(frozen=True)
class _Bound:
    """A variable's binding: a template (and the variables it was set under), or, for an
    immediate one while expanding, its chosen text; ``once`` counts a use as 1 choice.
    The reserved name ``_DRAWS`` binds the samplers' state instead (``draws``)."""

    seq: Seq | None
    env: tuple[tuple[str, _Bound], ...] = ()
    text: str | None = None
    once: bool = False
    draws: _Draws | None = field(default=None, compare=False)


@dataclass(eq=False)
class _Draws:
    """How sampler prefixes choose during one expansion call: ``~`` with ``rng``; ``@`` and
    ``!`` in random mode take option ``draw`` (the prompt's number); ``@`` in combinatorial
    mode the next one at each use (``turns``, per node)."""

    rng: random.Random
    draw: int = 0
    turns: dict[int, int] = field(default_factory=dict)


_DRAWS = "\x00draws"


def _draws(env: Env) -> _Draws:
    for name, bound in env:
        if name == _DRAWS and bound.draws is not None:
            return bound.draws
    return _Draws(random.Random(0))


def _with_draws(draws: _Draws) -> Env:
    return ((_DRAWS, _Bound(None, draws=draws)),)


Env = tuple[tuple[str, _Bound], ...]


def _lookup(env: Env, ref: Ref) -> _Bound:
    for name, bound in reversed(env):
        if name == ref.name:
            return bound
    if ref.default is not None:
        return _Bound(ref.default, env)
    raise WildcardError(f"${{{ref.name}}}", f"variable ${{{ref.name}}} is not set (set it "
                                            f"first with ${{{ref.name}=...}}, or give a "
                                            f"default: ${{{ref.name}:...}})")


def _bind(env: Env, params: Iterable[tuple[str, Seq]]) -> Env:
    return (*env, *((name, _Bound(value, env)) for name, value in params))


#: The most names a ``NamedBy`` may expand to (each is a lookup, counted before expanding).
MAX_NAMES = 10_000


@dataclass(frozen=True)
class Option:
    """One option of a variant with its (random-mode) weight."""

    body: Seq
    weight: float = 1.0


@dataclass(frozen=True)
class Variant:
    """``{lo-hi$$sep$$a|b}``; ``hi`` None means "all options".

    ``sampler`` (SYNTAX.md's prefixes, ``{~a|b}``): ``~`` draws at random also in
    combinatorial mode (one expansion, not one per option); ``@`` cycles: combinatorial mode
    takes the next option at each use, random mode option *n* for the job's *n*-th prompt;
    ``!`` enumerates: combinatorial as usual, random mode option *n* for prompt *n*.
    """

    options: tuple[Option, ...]
    lo: int = 1
    hi: int | None = 1
    sep: str = DEFAULT_JOINER
    sampler: str = ""

    @property
    def pooled(self) -> Wildcard | None:
        """The wildcard when the only option is exactly one (``{2$$__x__}`` picks its values)."""
        if len(self.options) == 1 and len(self.options[0].body.parts) == 1:
            part = self.options[0].body.parts[0]
            if isinstance(part, Wildcard):
                return part
        return None


@dataclass(frozen=True, slots=True)
class Seq:
    """Parts expanded one after another; a template and every option is one."""

    parts: tuple[Node, ...] = ()


Node = Literal | Wildcard | NamedBy | Variant | Seq | Assign | Ref | WithParams | Wrap


@dataclass(frozen=True)
class Expansion:
    """One expanded template; ``picks`` is the text of each top-level choice, in order."""

    text: str
    picks: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Parser

_PLAIN = re.compile(r"[^\\{}|$_#%]+")
_ESCAPABLE = "{}|_#"
_NAME_EDGE = r"[^\s_{}|()\\$]"
_WILDCARD = re.compile(rf"__({_NAME_EDGE}(?:(?:(?!__)[^\n\r{{}}|()$])*{_NAME_EDGE})?)__")
_SEPARATORS = re.compile(r"[\\/]+")   # `__dir\name__` (Windows packs) is `__dir/name__`
_PARAMETERISED = re.compile(rf"__{_NAME_EDGE}(?:(?!__)[^\n\r{{}}|()\\$])*\([^)\n]*\)__")
_BOUND = re.compile(r"\s*(?:(\d+)(?:(-)(\d+)?)?|-(\d+))\$\$")
_JOINER = re.compile(r"([^${}]*)\$\$")
_WEIGHT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)::")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VARIABLE = re.compile(rf"\$\{{\s*({_NAME.pattern})\s*([=:}}])")
_MODE_HINT = " (the job's `wildcards:` random/combinatorial mode decides how choices are made)"


class _Parser:
    """Recursive descent over one template; positions are reported 1-based as columns."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def error(self, message: str, at: int, hint: str = "") -> WildcardError:
        return WildcardError(self.s, f"{message} at column {at + 1}{hint}", column=at + 1,
                             bare=f"{message}{hint}")

    def seq(self, in_variant: bool, *, until_dollars: bool = False) -> Seq:
        s, n = self.s, len(self.s)
        parts: list[Node] = []
        buf: list[str] = []

        def flush() -> None:
            if buf:
                parts.append(Literal("".join(buf)))
                buf.clear()

        while self.i < n:
            m = _PLAIN.match(s, self.i)
            if m:
                buf.append(m.group())
                self.i = m.end()
                continue
            c = s[self.i]
            if c == "\\":
                nxt = s[self.i + 1: self.i + 2]
                if nxt and nxt in _ESCAPABLE:
                    buf.append(nxt)
                    self.i += 2
                elif nxt == "\\":       # A1111's escaped backslash: keep both, consume both
                    buf.append("\\\\")
                    self.i += 2
                else:
                    buf.append(c)
                    self.i += 1
            elif c == "{":
                flush()
                parts.append(self.variant())
            elif c == "}":
                if in_variant:
                    break
                buf.append(c)       # a stray '}' is text, as in dynamicprompts
                self.i += 1
            elif c == "|":
                if in_variant:
                    break
                buf.append(c)       # A1111 alternation [a|b] outside braces
                self.i += 1
            elif c == "#":          # a comment, to the end of its line (SYNTAX.md)
                end = s.find("\n", self.i)
                self.i = n if end < 0 else end
                if buf:             # the spaces before it go with it
                    buf[-1] = buf[-1].rstrip(" \t")
            elif c == "%" and s.startswith("%{", self.i):
                flush()
                parts.append(self.wrap())
            elif c == "$":
                if until_dollars and s.startswith("$$", self.i):
                    break
                if s.startswith("${", self.i):
                    flush()
                    parts.append(self.variable())
                    continue
                buf.append(c)
                self.i += 1
            else:                   # "_"
                named = self.named_by()
                if named is not None:
                    flush()
                    parts.append(named)
                    continue
                m = _WILDCARD.match(s, self.i)
                if m:
                    name = m.group(1)
                    sampler = name[0] if name[0] in "~@!" else ""
                    flush()
                    parts.append(Wildcard(_SEPARATORS.sub("/", name[len(sampler):]), sampler))
                    self.i = m.end()
                    continue
                p = _PARAMETERISED.match(s, self.i)
                if p:
                    flush()
                    parts.append(self.parameterised(p))
                    continue
                buf.append(c)
                self.i += 1
        flush()
        return Seq(tuple(parts))

    def wrap(self) -> Wrap:
        """``%{wrapper$$prompt}``; the wrapper must say where the prompt goes (``...``)."""
        s, start = self.s, self.i
        self.i += 2
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"wrap commands nested more than {MAX_NESTING} deep", start)
        wrapper = self.seq(in_variant=True, until_dollars=True)
        if not s.startswith("$$", self.i):
            raise self.error("the wrap command %{...} needs `$$` between the wrapper and "
                             "the prompt: %{wrapper ... text$$prompt}", start)
        if not any(isinstance(p, Literal) and WRAP_MARKER in p.text for p in wrapper.parts):
            raise self.error(f"the wrapper of %{{...$$...}} needs `{WRAP_MARKER}` where the "
                             "prompt goes", start)
        self.i += 2
        body = self.seq(in_variant=True)
        if self.i >= len(s) or s[self.i] != "}":
            raise self.error("unclosed '%{'", start)
        self.i += 1
        self.depth -= 1
        return Wrap(wrapper, body)

    def variable(self) -> Assign | Ref:
        """``${name=value}``, ``${name=!value}``, ``${name}`` or ``${name:default}``."""
        s, start = self.s, self.i
        m = _VARIABLE.match(s, start)
        if not m:
            raise self.error("expected a variable name after '${'", start + 2)
        name, op = m.group(1), m.group(2)
        self.i = m.end()
        if op == "}":
            return Ref(name)
        immediate = op == "=" and s.startswith("!", self.i)
        self.i += immediate
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"variables nested more than {MAX_NESTING} deep", start)
        value = self.seq(in_variant=True)
        self.depth -= 1
        if self.i >= len(s) or s[self.i] != "}":
            raise self.error(f"unclosed '${{{name}{op}'", start,
                             " (a value with options needs braces: ${x={a|b}})")
        self.i += 1
        return Assign(name, value, immediate) if op == "=" else Ref(name, value)

    def parameterised(self, m: re.Match[str]) -> WithParams:
        """``__name(var=value, var2=value2)__``: values are templates without ``,`` ``)``."""
        text = m.group()
        name, _, params = text[2:-3].partition("(")
        pairs = []
        for item in params.split(","):
            key, eq, value = item.partition("=")
            if not eq or not _NAME.fullmatch(key.strip()):
                raise self.error(f"expected var=value in {text}, got {item.strip()!r}", self.i)
            pairs.append((key.strip(), parse(value.strip())))
        self.i = m.end()
        target = _Parser(f"__{name}__").seq(in_variant=False).parts
        if len(target) != 1 or not isinstance(target[0], (Wildcard, NamedBy)):
            raise self.error(f"__{name}__ is not a wildcard name", self.i)
        return WithParams(target[0], tuple(pairs))

    def named_by(self) -> NamedBy | None:
        """``__name-{a|b}__`` (a variant in a wildcard's name), or None for anything else."""
        s, start = self.s, self.i
        if not s.startswith("__", start):
            return None
        depth, j = 0, start + 2
        while j < len(s) and s[j] not in "\n\r":
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth < 0:
                    return None
            elif depth == 0 and (s[j] in " |" or s.startswith("__", j)):
                break
            j += 1
        inner = s[start + 2:j]
        if depth or not s.startswith("__", j) or "{" not in inner or inner.endswith(")"):
            return None   # not one, or parameterised: __name(var={a|b})__
        try:
            name = _Parser(inner).seq(in_variant=False)
        except WildcardError as exc:
            raise self.error(f"in the wildcard name __{inner}__: {exc.bare}",
                             start + 2 + (exc.column or 1) - 1) from None
        self.i = j + 2
        return NamedBy(name)

    def variant(self) -> Variant:
        s = self.s
        start = self.i
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"variants nested more than {MAX_NESTING} deep", start)
        self.i += 1
        lo, hi, sep = 1, 1, DEFAULT_JOINER
        m = _BOUND.match(s, self.i)
        if m:
            exact, dash, upper, only_upper = m.groups()
            if only_upper is not None:
                lo, hi = 1, int(only_upper)
            elif dash:
                lo, hi = int(exact), int(upper) if upper is not None else None
            else:
                lo = hi = int(exact)
            if hi is not None and lo > hi:
                raise self.error(f"empty range {lo}-{hi}$$ in variant", start)
            self.i = m.end()
            j = _JOINER.match(s, self.i)
            if j:
                sep = j.group(1)
                self.i = j.end()
        self.i = _skip_space(s, self.i)
        sampler = ""
        if self.i < len(s) and s[self.i] in "~@!":
            sampler = s[self.i]
            if (lo, hi) != (1, 1):
                raise self.error(f"sampler prefix {sampler!r} applies to a single pick, not "
                                 f"to {lo}-{'' if hi is None else hi}$$", self.i, _MODE_HINT)
            self.i += 1
        options: list[Option] = []
        while True:
            self.i = _skip_space(s, self.i)
            weight = 1.0
            w = _WEIGHT.match(s, self.i)
            if w:
                weight = float(w.group(1))
                self.i = w.end()
            options.append(Option(self.seq(in_variant=True), weight))
            if self.i >= len(s):
                raise self.error("unclosed '{'", start)
            self.i += 1
            if s[self.i - 1] == "}":
                self.depth -= 1
                return Variant(tuple(options), lo, hi, sep, sampler)


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


@lru_cache(maxsize=1024)
def parse(template: str) -> Seq:
    """Parse a template; raises :class:`WildcardError` (with a column) on a syntax error."""
    return _Parser(template).seq(in_variant=False)


# --------------------------------------------------------------------------------------------
# Wildcard library


@dataclass(frozen=True, slots=True)
class Value:
    """One value of a wildcard, with where it was written (``line`` 0: unknown, JSON)."""

    text: str
    file: Path
    line: int
    node: Seq = field(compare=False, repr=False)
    weight: float = 1.0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else str(self.file)


@dataclass
class _Source:
    """Where a name is defined: a txt file, or a key path inside a yaml/json file."""

    file: Path
    keys: tuple[str, ...] | None = None     # None: a txt file
    data: object = None                     # the yaml node or json value of that key

    def label(self, root: Path) -> str:
        rel = self.file.relative_to(root).as_posix()
        return f"{rel} ({'/'.join(self.keys)})" if self.keys else rel


_ITEM_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)::(.*)\Z", re.S)


class Library:
    """The wildcard files found in ``dirs``; indexed on first use, values loaded and cached.

    A name is looked up in the dirs in order, the first dir that defines it wins. Files do
    not change during a run, so counts and values are memoised for the Library's life.
    """

    def __init__(self, dirs: Sequence[Path | str]) -> None:
        self.dirs = [Path(d) for d in dirs]
        self._index: dict[str, tuple[Path, list[_Source]]] | None = None
        self._problems: list[str] = []
        self._values: dict[str, tuple[Value, ...]] = {}
        self._cum: dict[str, list[float]] = {}
        self._counts: dict[str, int] = {}
        self._templates: dict[Seq, int] = {}
        self._longest: dict[str, int] = {}
        self._template_lengths: dict[Seq, int] = {}
        self._pools: dict[str, tuple[list[Seq], list[float]]] = {}

    # -- index ----------------------------------------------------------------------------

    def _build(self) -> dict[str, tuple[Path, list[_Source]]]:
        if self._index is not None:
            return self._index
        index: dict[str, tuple[Path, list[_Source]]] = {}
        for root in self.dirs:
            local: dict[str, list[_Source]] = {}
            for path in _walk(root):
                rel = path.relative_to(root)
                suffix = path.suffix.lower()
                if suffix == ".txt":
                    local.setdefault(rel.with_suffix("").as_posix(), []).append(_Source(path))
                    continue
                folder = rel.parent.as_posix()
                prefix = "" if folder == "." else folder + "/"
                try:
                    found = _structured_names(path)
                except WildcardError as e:
                    self._problems.append(str(e))
                    continue
                for keys, data in found:
                    name = prefix + ("/".join(keys) if keys else rel.stem)
                    local.setdefault(name, []).append(_Source(path, keys, data))
            for name, sources in local.items():
                index.setdefault(name, (root, sources))
        self._index = index
        return index

    def names(self) -> list[str]:
        """Every wildcard name (without ``__``), sorted: for listings and did-you-mean."""
        return sorted(self._build())

    def values(self, name: str) -> list[Value]:
        """The values of ``name`` (a glob gives the union); raises if none or not found."""
        return list(self._get(name))

    # -- lookup ---------------------------------------------------------------------------

    def _looked_in(self) -> str:
        if not self.dirs:
            return "no wildcard directories are configured"
        shown = [f"{d}" if d.is_dir() else f"{d} (missing)" for d in self.dirs]
        return "looked in: " + ", ".join(shown)

    def _get(self, name: str) -> tuple[Value, ...]:
        cached = self._values.get(name)
        if cached is not None:
            return cached
        label = f"__{name}__"
        if ".." in name.split("/"):
            raise WildcardError(label, f"wildcard {label} may not contain '..'")
        index = self._build()
        if any(c in name for c in "*?["):
            # fnmatch: `*` also crosses `/`, `?` is one character, `[c]`/`[!c]` classes
            pattern = re.compile(fnmatch.translate(name.strip("/")))
            matched = sorted(n for n in index if pattern.fullmatch(n))
            if not matched:   # `**/pattern`, as for a plain name
                pattern = re.compile(fnmatch.translate("*/" + name.strip("/")))
                matched = sorted(n for n in index if pattern.fullmatch(n))
            if not matched:
                raise WildcardError(
                    label, f"wildcard {label} matches no wildcard ({self._looked_in()})")
        else:
            matched = [name.strip("/")]
            if matched[0] not in index:
                # dynamicprompts' `**/name` fallback: the name under any folder
                matched = sorted(n for n in index if n.endswith("/" + matched[0]))
                if not matched:
                    raise WildcardError(label, self._not_found(label, name.strip("/"), index))
        seen: dict[str, Value] = {}
        for one in matched:
            root, sources = index[one]
            if len(sources) > 1:
                where = " and ".join(s.label(root) for s in sources)
                raise WildcardError(label, f"wildcard __{one}__ is defined twice in {root}: "
                                           f"{where}")
            for value in _load(sources[0], f"__{one}__"):
                seen.setdefault(value.text, value)
        if not seen:
            if len(matched) == 1:
                root, sources = index[matched[0]]
                what = sources[0].label(root)
                raise WildcardError(label, f"wildcard {label} is empty: {root}/{what} has "
                                           "no values")
            raise WildcardError(label, f"wildcard {label} is empty: none of the "
                                       f"{len(matched)} wildcards it matches has values")
        result = tuple(seen.values())
        self._values[name] = result
        return result

    def _not_found(self, label: str, name: str, index: dict[str, object]) -> str:
        message = f"wildcard {label} not found ({self._looked_in()})"
        names = sorted(index)
        hints = [n for n in names if n.lower() == name.lower()]
        hints = hints or [n for n in names if n.endswith("/" + name)][:3]
        hints = hints or difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if hints:
            wrapped = [f"__{h}__" for h in hints]
            told = wrapped[0] if len(wrapped) == 1 else \
                ", ".join(wrapped[:-1]) + " or " + wrapped[-1]
            message += f"; did you mean {told}?"
        if self._problems:
            message += "; unreadable: " + "; ".join(self._problems)
        return message

    def _pool(self, name: str) -> tuple[list[Seq], list[float]]:
        pool = self._pools.get(name)
        if pool is None:
            values = self._get(name)
            pool = self._pools[name] = ([v.node for v in values], [v.weight for v in values])
        return pool

    def _cum_weights(self, name: str) -> list[float]:
        cum = self._cum.get(name)
        if cum is None:
            cum = list(itertools.accumulate(v.weight for v in self._get(name)))
            self._cum[name] = cum
        return cum

    def _count(self, name: str, stack: tuple[str, ...], env: Env = ()) -> int:
        """The expansions of ``name``'s values; memoised where no variable is set (a value's
        ``${x}`` depends on what the template set)."""
        known = self._counts.get(name) if not env else None
        if known is not None:
            return known
        chain = " -> ".join(f"__{n}__" for n in (*stack, name))
        if name in stack:
            raise WildcardError(f"__{name}__", f"wildcard cycle: {chain}")
        if len(stack) >= MAX_DEPTH:
            raise WildcardError(f"__{name}__",
                                f"wildcards nested more than {MAX_DEPTH} levels deep: {chain}")
        inner = (*stack, name)
        total = 0
        for value in self._get(name):
            try:
                total = _capped(total + _count(value.node, self, inner, env))
            except WildcardError as e:
                raise e.located(value.where) from None
        if not env:
            self._counts[name] = total
        return total

    def _longest_value(self, name: str, env: Env = ()) -> int:
        """The longest expansion of any value of ``name`` (after :meth:`_count` checked it)."""
        known = self._longest.get(name) if not env else None
        if known is None:
            known = max(_longest(v.node, self, env) for v in self._get(name))
            if not env:
                self._longest[name] = known
        return known


def _walk(root: Path) -> list[Path]:
    """Wildcard files under root in a stable order; hidden entries skipped, link loops too."""
    found: list[Path] = []
    seen: set[str] = set()
    if not root.is_dir():
        return found
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and Path(filename).suffix.lower() in SUFFIXES:
                found.append(Path(folder) / filename)
    return found


def _read(path: Path) -> str:
    try:
        return jobfile.read_text(path, what="wildcard file", limit=MAX_FILE_BYTES)
    except JobError as e:
        raise WildcardError(str(path), str(e)) from None


def _pairs(data: object) -> Iterable[tuple[object, object]] | None:
    """The (key, value) pairs of a json dict or yaml mapping node; None for anything else."""
    if isinstance(data, dict):
        return data.items()
    if isinstance(data, yaml.MappingNode):
        return ((k.value, v) for k, v in data.value)
    return None


def _structured_names(path: Path) -> list[tuple[tuple[str, ...], object]]:
    """(key path, data) for each name a yaml/json file defines; () is the file's stem.

    YAML is composed, not loaded, so values keep their line and the text as written.
    """
    text = _read(path)
    data: object
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WildcardError(str(path), f"{path}:{e.lineno}: invalid JSON: {e.msg}") \
                from None
        except RecursionError:
            raise WildcardError(str(path), f"{path}: invalid JSON: nested too deeply") \
                from None
    else:
        try:   # bounded like a job file: no alias bomb, no nesting hundreds deep
            data = jobfile.compose(text, str(path), max_nodes=MAX_FILE_NODES)
        except JobError as e:
            raise WildcardError(str(path), str(e)) from None
    top = _pairs(data)
    if top is None:
        return [((), data)] if data is not None else []
    out: list[tuple[tuple[str, ...], object]] = []

    def visit(pairs: Iterable[tuple[object, object]], prefix: tuple[str, ...]) -> None:
        if len(prefix) >= jobfile.MAX_NESTING:
            raise WildcardError(str(path), f"{path}: mappings nested more than "
                                           f"{jobfile.MAX_NESTING} deep")
        for key, value in pairs:
            keys = (*prefix, str(key))
            inner = _pairs(value)
            if inner is not None:
                visit(inner, keys)
            elif isinstance(value, (list, yaml.SequenceNode)):
                out.append((keys, value))
            # anything else (`flurp: 12345`, a lone string) stores no array: ignored, as
            # SYNTAX.md says (and dynamicprompts does)

    visit(top, ())
    return out


def _load(source: _Source, label: str) -> list[Value]:
    """Read one definition's values; a broken line is an error naming its file and line."""
    raw: list[tuple[str, int, float]] = []
    if source.keys is None:
        for number, line in enumerate(_read(source.file).splitlines(), 1):
            text = line.strip()
            if text and not text.startswith("#"):
                raw.append((text, number, 1.0))
    else:
        raw = _structured_values(source, label)
    values = []
    for text, number, weight in raw:
        try:   # plain text (most values of a big list) needs no parser
            node = Seq((Literal(text),)) if _PLAIN.fullmatch(text) else parse(text)
        except WildcardError as e:   # file:line:column, as a compiler says it
            if number and e.column:
                raise WildcardError(label, e.bare, f"{source.file}:{number}:{e.column}") \
                    from None
            where = f"{source.file}:{number}" if number else str(source.file)
            raise WildcardError(label, e.message, where) from None
        values.append(Value(text, source.file, number, node, weight))
    return values


def _structured_values(source: _Source, label: str) -> list[tuple[str, int, float]]:
    """Flatten one yaml node / json value: a scalar, or a list of text or {text, weight}."""
    data = source.data
    items = data.value if isinstance(data, yaml.SequenceNode) else \
        data if isinstance(data, list) else [data]
    out: list[tuple[str, int, float]] = []
    for item in items:
        line = item.start_mark.line + 1 if isinstance(item, yaml.Node) else 0
        where = f"{source.file}:{line}" if line else str(source.file)
        text, weight = _item(item, label, where)
        if weight < 0 or not math.isfinite(weight):
            raise WildcardError(label, f"weight {weight} must be a finite number >= 0", where)
        text = (text or "").strip()
        if text:
            out.append((text, line, weight))
    return out


def _item(item: object, label: str, where: str) -> tuple[str | None, float]:
    """The text and weight of one list item; None for a null (skipped, as dynamicprompts)."""
    if isinstance(item, yaml.MappingNode):
        item = {k.value: v.value for k, v in item.value
                if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)}
    if isinstance(item, dict):
        text = item.get("text") or item.get("content")
        if not isinstance(text, str):
            raise WildcardError(label, "a mapping in a wildcard list needs a `text` (or "
                                       "`content`) string", where)
        try:
            return text, float(item.get("weight", 1))
        except (TypeError, ValueError):
            raise WildcardError(label, f"weight {item.get('weight')!r} is not a number",
                                where) from None
    if isinstance(item, yaml.ScalarNode):
        if item.tag == "tag:yaml.org,2002:null":
            return None, 1.0
        text = item.value           # as written: `- 1.50` stays "1.50", `- yes` stays "yes"
    elif isinstance(item, str):
        text = item
    elif item is None or isinstance(item, bool):
        return None, 1.0
    elif isinstance(item, (int, float)):
        return str(item), 1.0
    else:
        raise WildcardError(label, "a wildcard list item must be text or {text, weight}, "
                                   "not a nested list", where)
    m = _ITEM_WEIGHT.match(text)
    return (m.group(2), float(m.group(1))) if m else (text, 1.0)


# --------------------------------------------------------------------------------------------
# Counting


def _bounds(variant: Variant, n: int) -> tuple[int, int]:
    hi = n if variant.hi is None else min(variant.hi, n)
    return min(variant.lo, n), hi


def _capped(n: int) -> int:
    return n if n < COUNT_LIMIT else COUNT_LIMIT


def _capped_product(factors: Iterable[int]) -> int:
    total = 1
    for factor in factors:
        total = _capped(total * factor)
    return total


def _orderings_total(counts: list[int], lo: int, hi: int) -> int:
    """Sum over k in lo..hi of k! times the k-th elementary symmetric polynomial of
    ``counts``, capped at ``COUNT_LIMIT``.

    That is the number of ways to pick k distinct options in order and expand each. Every
    count is at least 1, so the sum is at least C(n, k) for each k in the range: a range
    reaching a binomial of ``COUNT_LIMIT`` saturates at once. Any other range lies near 0 or
    near n (C(n, k) < 2**64 needs k or n - k below ~64, or n below ~68), and a short
    recurrence from that end is exact: e_0..e_hi of prod(1 + c x) from below, the top
    coefficients of prod(c + x) from above.
    """
    n = len(counts)
    if _comb_reaches(n, min(max(n // 2, lo), hi), COUNT_LIMIT):
        return COUNT_LIMIT
    if all(c == 1 for c in counts):
        return _capped(sum(math.perm(n, k) for k in range(lo, hi + 1)))
    if hi <= n - lo:
        low = [1] + [0] * hi             # low[k] = e_k
        for c in counts:
            for k in range(hi, 0, -1):
                low[k] = _capped(low[k] + low[k - 1] * c)
        return _capped(sum(_capped(low[k] * _capped_factorial(k)) for k in range(lo, hi + 1)))
    top = [1] + [0] * (n - lo)           # top[j] = e_(n-j): x**j in prod(c + x)
    for c in counts:
        for j in range(n - lo, 0, -1):
            top[j] = _capped(top[j] * c + top[j - 1])
        top[0] = _capped(top[0] * c)
    return _capped(sum(_capped(top[n - k] * _capped_factorial(k)) for k in range(lo, hi + 1)))


def _capped_factorial(k: int) -> int:
    """k!, or ``COUNT_LIMIT`` once it gets there (k of a few thousand is near n here)."""
    return math.factorial(k) if k < 21 else COUNT_LIMIT


def _comb_reaches(n: int, k: int, limit: int) -> bool:
    """Whether C(n, k) >= limit, in at most ~log2(limit) exact steps for large n."""
    value = 1
    for i in range(min(k, n - k)):
        value = value * (n - i) // (i + 1)   # C(n, i + 1), exact
        if value >= limit:
            return True
    return value >= limit


def _pool(variant: Variant, library: Library) -> tuple[list[Seq], list[float], str | None]:
    """The nodes a variant chooses among, their weights, and the pooled wildcard's name.

    A pick of several chooses options without replacement (SYNTAX.md): a text option
    written twice is one option, with the weights added (``{2$$a|a|b}`` never gives "a, a").
    Two options that are wildcards or variants stay two, and may expand to the same value:
    SYNTAX.md says ``{2$$__x__|__x__}`` is possible "but the first version will guarantee no
    duplicates". A single pick keeps every option: ``{a|a|b}`` weights a.
    """
    wildcard = variant.pooled
    if (variant.lo, variant.hi) == (1, 1):
        return [o.body for o in variant.options], [o.weight for o in variant.options], None
    if wildcard is not None:
        return (*library._pool(wildcard.name), wildcard.name)
    merged: dict[Seq | int, tuple[Seq, float]] = {}
    for i, option in enumerate(variant.options):
        key = option.body if all(isinstance(p, Literal) for p in option.body.parts) else i
        body, weight = merged.get(key, (option.body, 0.0))
        merged[key] = (body, weight + option.weight)
    return [b for b, _ in merged.values()], [w for _, w in merged.values()], None


def _option(node: Wildcard | Variant, library: Library, turn: int) -> Seq:
    """Option (or value) number ``turn`` of a cycling sampler, round and round."""
    if isinstance(node, Wildcard):
        values = library._get(node.name)
        return values[turn % len(values)].node
    return node.options[turn % len(node.options)].body


def _names(node: NamedBy, library: Library, env: Env = ()) -> list[str]:
    """The names a ``NamedBy`` looks up, in order (bounded: each one is a lookup)."""
    if _count(node.name, library, (), env) > MAX_NAMES:
        raise WildcardError("__...__", f"a wildcard name with variants expands to more than "
                                       f"{MAX_NAMES:,} names")
    return list(dict.fromkeys(_gen(node.name, library, env)))


def _count(node: Node, library: Library, stack: tuple[str, ...], env: Env = ()) -> int:
    if isinstance(node, Literal):
        return 1
    if isinstance(node, Seq):
        return _count_parts(node.parts, library, stack, env)
    if isinstance(node, Wildcard):
        total = library._count(node.name, stack, env)   # checked either way
        return 1 if node.sampler in ("~", "@") else total
    if isinstance(node, NamedBy):
        return _capped(sum(library._count(name, stack, env)
                           for name in _names(node, library, env)))
    if isinstance(node, Ref):
        bound = _lookup(env, node)
        if bound.once or bound.seq is None:
            return 1
        return _count(bound.seq, library, stack, bound.env)
    if isinstance(node, WithParams):
        return _count(node.target, library, stack, _bind(env, node.params))
    if isinstance(node, Assign):   # alone: sets nothing that is used
        return _count(node.value, library, stack, env) if node.immediate else 1
    if isinstance(node, Wrap):
        return _capped(_count(node.wrapper, library, stack, env)
                       * _count(node.body, library, stack, env))
    nodes, _, pooled = _pool(node, library)
    if pooled is not None:
        library._count(pooled, stack, env)       # cycle and depth checks, memoised
        counts = [_count(n, library, (*stack, pooled), env) for n in nodes]
    else:
        counts = [_count(n, library, stack, env) for n in nodes]
    lo, hi = _bounds(node, len(nodes))
    if node.sampler in ("~", "@"):   # one choice per use, however many options
        return 1
    return _orderings_total(counts, lo, hi)


def _declared(env: Env, assign: Assign) -> Env:
    """``env`` with ``assign``'s variable, as counting and length bounds see it (its value's
    template; an immediate one's uses count once)."""
    return (*env, (assign.name, _Bound(assign.value, env, once=assign.immediate)))


def _count_parts(parts: Sequence[Node], library: Library, stack: tuple[str, ...],
                 env: Env) -> int:
    """Parts one after another; an assignment sets its variable for the parts after it (an
    immediate one multiplies by its value's expansions, each use then counts once)."""
    total = 1
    for part in parts:
        if isinstance(part, Assign):
            if part.immediate:
                total = _capped(total * _count(part.value, library, stack, env))
            env = _declared(env, part)
        else:
            total = _capped(total * _count(part, library, stack, env))
    return total


def count(template: str | Seq, library: Library) -> int:
    """The exact number of combinatorial expansions (``COUNT_LIMIT`` for that many or more);
    never enumerates them.

    Also checks every wildcard the template can reach (not found, empty, cycles), so the
    same errors come out whatever a seed would have picked.
    """
    node = parse(template) if isinstance(template, str) else template
    known = library._templates.get(node)
    if known is None:
        try:
            known = library._templates[node] = _count(node, library, ())
        except RecursionError:
            raise WildcardError(str(template), "template and its wildcards nest too deeply "
                                               "to expand") from None
    return known


def _longest(node: Node, library: Library, env: Env = ()) -> int:
    if isinstance(node, Literal):
        return len(node.text)
    if isinstance(node, Seq):
        total = 0
        for part in node.parts:
            if isinstance(part, Assign):
                env = _declared(env, part)
            else:
                total = _capped(total + _longest(part, library, env))
        return total
    if isinstance(node, Wildcard):
        return library._longest_value(node.name, env)
    if isinstance(node, NamedBy):
        return max(library._longest_value(name, env) for name in _names(node, library, env))
    if isinstance(node, Ref):
        bound = _lookup(env, node)
        if bound.seq is None:
            return len(bound.text or "")
        return _longest(bound.seq, library, bound.env)
    if isinstance(node, WithParams):
        return _longest(node.target, library, _bind(env, node.params))
    if isinstance(node, Assign):
        return 0
    if isinstance(node, Wrap):
        return _capped(_longest(node.wrapper, library, env) + _longest(node.body, library, env)
                       - len(WRAP_MARKER))
    nodes, _, _ = _pool(node, library)
    _, hi = _bounds(node, len(nodes))
    lengths = [_longest(n, library, env) for n in nodes]
    picked = heapq.nlargest(hi, lengths) if hi < len(lengths) else lengths
    return _capped(sum(picked) + len(node.sep) * max(hi - 1, 0))


def longest(template: str | Seq, library: Library) -> int:
    """An upper bound on the length of any expansion, in characters; never expands.

    Exact but for the joiners of picks that expand to nothing. Checks the template like
    :func:`count` first. A prompt's length is bounded before a wildcard of wildcards can
    grow one to gigabytes.
    """
    node = parse(template) if isinstance(template, str) else template
    count(node, library)
    known = library._template_lengths.get(node)
    if known is None:
        try:
            known = library._template_lengths[node] = _longest(node, library)
        except RecursionError:
            raise WildcardError(str(template), "template and its wildcards nest too deeply "
                                               "to expand") from None
    return known


# --------------------------------------------------------------------------------------------
# Expansion


def _product(factories: Sequence[Callable[[], Iterator[str]]]) -> Iterator[tuple[str, ...]]:
    """Lazy cartesian product, leftmost slowest; right factors are restarted, not stored."""
    n = len(factories)
    if n == 0:
        yield ()
        return
    iters = [f() for f in factories]
    current = [next(it) for it in iters]
    yield tuple(current)
    while True:
        i = n - 1
        while i >= 0:
            try:
                current[i] = next(iters[i])
                break
            except StopIteration:
                i -= 1
        if i < 0:
            return
        for j in range(i + 1, n):
            iters[j] = factories[j]()
            current[j] = next(iters[j])
        yield tuple(current)


def _join(texts: Sequence[str], sep: str) -> str:
    return sep.join(t for t in texts if t)


def _factory(node: Node, library: Library, env: Env) -> Callable[[], Iterator[str]]:
    return lambda: _gen(node, library, env)


def _parts(parts: Sequence[Node], library: Library, env: Env) -> Iterator[tuple[str, ...]]:
    """The texts of ``parts``, one per part, leftmost slowest. An assignment is an empty
    text that sets its variable for the parts after it: an immediate one once per value."""
    at = next((i for i, p in enumerate(parts) if isinstance(p, Assign)), None)
    if at is None:
        fresh = [i for i, p in enumerate(parts) if _per_use(p)]
        if not fresh:
            yield from _product([_factory(p, library, env) for p in parts])
            return
        # a `~` or `@` choice is made again for every expansion, wherever it stands
        others = [p for i, p in enumerate(parts) if i not in fresh]
        for combo in _product([_factory(p, library, env) for p in others]):
            rest = iter(combo)
            yield tuple(next(_gen(p, library, env)) if i in fresh else next(rest)
                        for i, p in enumerate(parts))
        return
    assign, rest = parts[at], parts[at + 1:]
    assert isinstance(assign, Assign)
    for head in _product([_factory(p, library, env) for p in parts[:at]]):
        if assign.immediate:
            for text in _gen(assign.value, library, env):
                bound = (*env, (assign.name, _Bound(None, text=text, once=True)))
                for tail in _parts(rest, library, bound):
                    yield (*head, "", *tail)
        else:
            bound = (*env, (assign.name, _Bound(assign.value, env)))
            for tail in _parts(rest, library, bound):
                yield (*head, "", *tail)


def _per_use(node: Node) -> bool:
    """A choice made afresh at each use (``~`` and ``@`` samplers), not enumerated."""
    return isinstance(node, (Wildcard, Variant)) and node.sampler in ("~", "@")


def _gen(node: Node, library: Library, env: Env = ()) -> Iterator[str]:
    if isinstance(node, Literal):
        yield node.text
    elif isinstance(node, Seq):
        if len(node.parts) == 1 and not isinstance(node.parts[0], Assign):
            yield from _gen(node.parts[0], library, env)
        else:
            for texts in _parts(node.parts, library, env):
                yield "".join(texts)
    elif isinstance(node, (Wildcard, Variant)) and node.sampler in ("~", "@"):
        draws = _draws(env)
        if node.sampler == "~":
            yield _sample(node, library, draws.rng, env)
        else:
            turn = draws.turns.get(id(node), 0)
            draws.turns[id(node)] = turn + 1
            yield _sample(_option(node, library, turn), library, draws.rng, env)
    elif isinstance(node, (Wildcard, NamedBy)):
        names = [node.name] if isinstance(node, Wildcard) else _names(node, library, env)
        for name in names:
            for value in library._get(name):
                yield from _gen(value.node, library, env)
    elif isinstance(node, Ref):
        bound = _lookup(env, node)
        if bound.seq is None:
            yield bound.text or ""
        else:
            yield from _gen(bound.seq, library, bound.env)
    elif isinstance(node, WithParams):
        yield from _gen(node.target, library, _bind(env, node.params))
    elif isinstance(node, Assign):
        yield ""
    elif isinstance(node, Wrap):
        for wrapper in _gen(node.wrapper, library, env):
            for body in _gen(node.body, library, env):
                yield wrapper.replace(WRAP_MARKER, body, 1)
    else:
        nodes, _, _ = _pool(node, library)
        lo, hi = _bounds(node, len(nodes))
        for k in range(lo, hi + 1):
            for chosen in itertools.permutations(nodes, k):
                for texts in _product([_factory(c, library, env) for c in chosen]):
                    yield _join(texts, node.sep)


def _choices(seq: Seq) -> list[int]:
    return [i for i, p in enumerate(seq.parts)
            if isinstance(p, (Variant, Wildcard, NamedBy, WithParams, Wrap))]


def combinations(template: str | Seq, library: Library) -> Iterator[Expansion]:
    """Every expansion, lazily, leftmost choice slowest; yields exactly ``count()`` items.

    Errors are raised here, at the call, not at the first ``next()``.
    """
    node = parse(template) if isinstance(template, str) else template
    count(node, library)
    chosen = _choices(node)

    def stream() -> Iterator[Expansion]:
        # `~` draws from a generator seeded by the template: the same list on every run
        seed = hashlib.sha256(str(template).encode(errors="surrogatepass")).hexdigest()
        draws = _Draws(random.Random(seed))
        for texts in _parts(node.parts, library, _with_draws(draws)):
            yield Expansion("".join(texts), tuple(texts[i] for i in chosen))

    return stream()


def _pick(rng: random.Random, cum: Sequence[float]) -> int:
    """Index drawn with probability proportional to weight; uniform if all weights are 0."""
    total = cum[-1]
    if total <= 0:
        return int(rng.random() * len(cum))
    return min(bisect.bisect_right(cum, rng.random() * total), len(cum) - 1)


def _choose(rng: random.Random, weights: list[float], k: int) -> list[int]:
    """k distinct indices in the order drawn: weighted draws without replacement."""
    left = list(range(len(weights)))
    taken = []
    for _ in range(min(k, len(weights))):
        j = _pick(rng, list(itertools.accumulate(weights[i] for i in left)))
        taken.append(left.pop(j))
    return taken


def _sample(node: Node, library: Library, rng: random.Random, env: Env = ()) -> str:
    if isinstance(node, Literal):
        return node.text
    if isinstance(node, Seq):
        return "".join(_sample_parts(node.parts, library, rng, env))
    if isinstance(node, (Wildcard, Variant)) and node.sampler in ("@", "!"):
        return _sample(_option(node, library, _draws(env).draw), library, rng, env)
    if isinstance(node, (Wildcard, NamedBy)):
        name = node.name if isinstance(node, Wildcard) else \
            _sample(node.name, library, rng, env)
        values = library._get(name)
        return _sample(values[_pick(rng, library._cum_weights(name))].node, library, rng, env)
    if isinstance(node, Ref):
        bound = _lookup(env, node)
        if bound.seq is None:
            return bound.text or ""
        return _sample(bound.seq, library, rng, bound.env)
    if isinstance(node, WithParams):
        return _sample(node.target, library, rng, _bind(env, node.params))
    if isinstance(node, Assign):
        return ""
    if isinstance(node, Wrap):
        wrapper = _sample(node.wrapper, library, rng, env)
        return wrapper.replace(WRAP_MARKER, _sample(node.body, library, rng, env), 1)
    nodes, weights, pooled = _pool(node, library)
    lo, hi = _bounds(node, len(nodes))
    k = lo if lo == hi else rng.randint(lo, hi)
    if k == 1 and len(nodes) > 1:
        cum = library._cum_weights(pooled) if pooled else list(itertools.accumulate(weights))
        chosen = [_pick(rng, cum)]
    else:
        chosen = _choose(rng, weights, k)
    return _join([_sample(nodes[i], library, rng, env) for i in chosen], node.sep)


def _sample_parts(parts: Sequence[Node], library: Library, rng: random.Random,
                  env: Env) -> list[str]:
    """One draw of each part, assignments applied in order (an immediate one drawn once)."""
    texts = []
    for part in parts:
        if isinstance(part, Assign):
            if part.immediate:
                text = _sample(part.value, library, rng, env)
                env = (*env, (part.name, _Bound(None, text=text, once=True)))
            else:
                env = (*env, (part.name, _Bound(part.value, env)))
            texts.append("")
        else:
            texts.append(_sample(part, library, rng, env))
    return texts


def sample(template: str | Seq, library: Library, rng: random.Random,
           draw: int = 0) -> Expansion:
    """One random expansion drawn with ``rng`` (weights apply); one of combinations() for a
    template without sampler prefixes. ``draw``: which of the job's prompts this is (the
    ``@``/``!`` samplers take option ``draw``).

    Deterministic for a given ``random.Random(seed)``, whatever PYTHONHASHSEED is.
    """
    node = parse(template) if isinstance(template, str) else template
    count(node, library)
    texts = _sample_parts(node.parts, library, rng, _with_draws(_Draws(rng, draw)))
    return Expansion("".join(texts), tuple(texts[i] for i in _choices(node)))
