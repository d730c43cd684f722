"""Load a job file as plain dicts and lists that remember where each key and item came from.

Every later error can then say ``file:line:col: key.path: message``. Only YAML's safe
subset is accepted; duplicate keys are an error rather than silently "last one wins".

Nothing in a file is trusted to be small: the file's size, its nesting and what its aliases
expand to are bounded before a single value is built (a 500-byte "billion laughs" file
would otherwise expand to gigabytes), and every way YAML can fail is one located line.
The wildcard library composes its YAML files through :func:`compose` for the same reasons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from render.errors import JobError, Location

#: The largest job file read, in bytes. Job files are a few KiB; generated ones with long
#: seed or prompt lists fit many times over.
MAX_FILE_BYTES = 4 * 2**20
#: The most YAML values (scalars, lists, mappings; each alias counted as often as it is
#: used) a job file may expand to.
MAX_NODES = 100_000
#: Lists and mappings nested deeper than this are refused (aliases included).
MAX_NESTING = 64
#: The longest integer literal: far beyond the largest seed (2**64 - 1, 20 digits), short
#: enough that Python can convert and print it.
MAX_INT_CHARS = 100


class MarkedMap(dict):
    """A mapping that knows the line/column of itself and of each of its keys."""

    where: Location
    marks: dict[Any, Location]       # the value's position (the key's, for a nested container)
    key_marks: dict[Any, Location]   # the key's position


class MarkedList(list):
    """A sequence that knows the line/column of itself and of each item."""

    where: Location
    marks: list[Location]


if yaml.__with_libyaml__:
    from yaml.cyaml import CParser

    class _Reader(Composer, CParser, SafeConstructor, Resolver):
        """libyaml's scanner and parser (a 4 MiB string scans in 0.1 s, not 9 s) under
        PyYAML's own composer, which :class:`_Loader` bounds."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
else:  # pragma: no cover - PyYAML built without libyaml
    _Reader = yaml.SafeLoader  # type: ignore[misc, assignment]


class _Loader(_Reader):
    """Safe loading building Marked containers; nothing beyond yaml.safe_load's constructs.

    Composition is bounded in depth here, in size by :func:`_check_size` before anything
    is constructed.
    """

    filename = "<job>"
    max_nodes = MAX_NODES
    depth = 0
    nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > MAX_NESTING or self.nodes > self.max_nodes:
                mark = self.peek_event().start_mark
                where = Location(self.filename, mark.line + 1, mark.column + 1)
                if self.depth > MAX_NESTING:
                    raise JobError(where, "", f"lists and mappings nested more than "
                                              f"{MAX_NESTING} deep")
                raise JobError(where, "", f"more than {self.max_nodes:,} values in one file; "
                                          "split it")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _loc(loader: _Loader, node: yaml.Node) -> Location:
    return Location(loader.filename, node.start_mark.line + 1, node.start_mark.column + 1)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> MarkedMap:
    loader.flatten_mapping(node)
    result = MarkedMap()
    result.where = _loc(loader, node)
    result.marks = {}
    result.key_marks = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise JobError(_loc(loader, key_node), "", "keys must be plain scalars")
        if key in result:
            first = result.marks[key]
            raise JobError(_loc(loader, key_node), str(key),
                           f"duplicate key (first defined at line {first.line})")
        try:
            result[key] = loader.construct_object(value_node, deep=True)
        except JobError as exc:
            raise _under(exc, str(key)) from None
        result.marks[key] = _loc(loader, value_node if _is_scalar(value_node) else key_node)
        result.key_marks[key] = _loc(loader, key_node)
    return result


def _is_scalar(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode)


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    result = MarkedList()
    for i, child in enumerate(node.value):
        try:
            result.append(loader.construct_object(child, deep=True))
        except JobError as exc:
            raise _under(exc, f"[{i}]") from None
    result.where = _loc(loader, node)
    result.marks = [_loc(loader, child) for child in node.value]
    return result


def _under(exc: JobError, part: str) -> JobError:
    """``exc`` with its key path below ``part`` (``seed`` -> ``jobs[0].seed``)."""
    if not exc.key:
        key = part
    elif exc.key.startswith("["):
        key = part + exc.key
    else:
        key = f"{part}.{exc.key}"
    return JobError(exc.where, key, exc.message)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """YAML's int, refusing literals too long to convert or print (``0x`` + a megabyte)."""
    if len(node.value) > MAX_INT_CHARS:
        raise JobError(_loc(loader, node), "",
                       f"number too long ({len(node.value):,} characters; at most "
                       f"{MAX_INT_CHARS})")
    return loader.construct_yaml_int(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_text(text: str, filename: str) -> Any:
    """Parse YAML text; a syntax error or an oversized document becomes a located ``JobError``."""
    return _parse(text, filename, MAX_NODES, construct=True)


def compose(text: str, filename: str, *, max_nodes: int = MAX_NODES) -> yaml.Node | None:
    """The YAML node graph of ``text`` (None for an empty document), bounded like a job file.

    For readers that want nodes (their line and text as written) rather than values.
    """
    return _parse(text, filename, max_nodes, construct=False)


def _parse(text: str, filename: str, max_nodes: int, *, construct: bool) -> Any:
    """Compose, bound, then (``construct``) build; every YAML failure is one ``JobError``."""
    loader = None
    try:
        loader = _Loader(text)          # PyYAML's reader checks every character here
        loader.filename = filename
        loader.max_nodes = max_nodes
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(loader, node, max_nodes)
        return loader.construct_document(node) if construct else node
    except yaml.reader.ReaderError as exc:
        # libyaml counts bytes, PyYAML characters: find the character itself
        at = text.find(chr(exc.character)) if isinstance(exc.character, int) else 0
        raise JobError(_text_location(text, filename, max(at, 0)), "",
                       f"invalid YAML: {exc.reason} (character #x{exc.character:02x})"
                       ) from None
    except yaml.MarkedYAMLError as exc:
        raise JobError(*_yaml_problem(exc, text, filename)) from None
    except yaml.YAMLError as exc:
        raise JobError(Location(filename), "", "invalid YAML: " + " ".join(str(exc).split())) \
            from None
    except RecursionError:              # defence in depth: MAX_NESTING stops it first
        raise JobError(Location(filename), "", "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError, text: str,
                  filename: str) -> tuple[Location, str, str]:
    """A YAML error as (where, key, message), on one line."""
    mark = exc.problem_mark or exc.context_mark
    where = Location(filename, mark.line + 1, mark.column + 1) if mark else Location(filename)
    problem = " ".join((exc.problem or exc.context or "invalid YAML").split())
    if mark and _char_at(text, mark.line, mark.column) == "\t":
        problem = "a tab character; YAML indents with spaces"
    elif exc.problem and exc.context and exc.context_mark:
        problem += f" ({exc.context.strip()} at line {exc.context_mark.line + 1})"
    return where, "", f"invalid YAML: {problem}"


def _char_at(text: str, line: int, column: int) -> str:
    """The character at 0-based ``line`` and ``column`` of ``text`` ('' past its end)."""
    start = 0
    for _ in range(line):
        start = text.find("\n", start) + 1
        if not start:
            return ""
    return text[start + column:start + column + 1]


def _text_location(text: str, filename: str, position: int) -> Location:
    """The 1-based line and column of character ``position`` of ``text``."""
    line = text.count("\n", 0, position) + 1
    return Location(filename, line, position - (text.rfind("\n", 0, position) + 1) + 1)


def _check_size(loader: _Loader, root: yaml.Node, max_nodes: int) -> None:
    """Refuse a document whose aliases expand it past ``max_nodes`` values or past
    ``MAX_NESTING`` levels, before anything is constructed.

    An alias is the node it refers to, so a node graph a few hundred bytes long can stand
    for 10**9 values. Each distinct node is measured once (its expanded size and height),
    so this costs the size of the file, not of the expansion. The error names the key path
    of the first value that grows too large (the innermost one).
    """
    measured: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()
    path: list[str] = []

    def fail(node: yaml.Node, message: str) -> JobError:
        return JobError(_loc(loader, node), _dotted(path), message)

    def measure(node: yaml.Node, depth: int, parent: yaml.Node) -> tuple[int, int]:
        """(expanded size, height) of ``node``; an alias is blamed where it is used."""
        known = measured.get(id(node))
        if known is None:
            if id(node) in open_nodes:
                raise fail(parent, "invalid YAML: an alias refers to a value that contains it")
            open_nodes.add(id(node))
            known = measure_children(node, depth)
            open_nodes.discard(id(node))
            measured[id(node)] = known
        if depth + known[1] > MAX_NESTING:
            raise fail(parent, f"lists and mappings nested more than {MAX_NESTING} deep "
                               "(aliases included)")
        return known

    def measure_children(node: yaml.Node, depth: int) -> tuple[int, int]:
        size, height = 1, 0
        if isinstance(node, yaml.SequenceNode):
            children = [(f"[{i}]", child) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            children = []
            for key, value in node.value:
                label = key.value if isinstance(key, yaml.ScalarNode) else "?"
                children += [(label, key), (label, value)]
        else:
            return size, height
        for label, child in children:
            path.append(label)
            child_size, child_height = measure(child, depth + 1, node)
            path.pop()
            size += child_size
            height = max(height, child_height + 1)
            if size > max_nodes:
                raise fail(node, f"expands to more than {max_nodes:,} values (YAML aliases "
                                 "count as often as they are used); write the values out or "
                                 "split the file")
        return size, height

    measure(root, 0, root)


def _dotted(parts: list[str]) -> str:
    """``["jobs", "[0]", "grid"]`` -> ``jobs[0].grid``."""
    return "".join(p if p.startswith("[") or not i else f".{p}" for i, p in enumerate(parts))


def read_text(path: str | Path, *, what: str = "job file",
              limit: int = MAX_FILE_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes; anything else is a one-line ``JobError``."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise JobError(Location(name), "", f"{what} not found") from None
    except OSError as exc:
        raise JobError(Location(name), "", f"cannot read {what}: {exc.strerror or exc}") \
            from None
    if len(data) > limit:
        raise JobError(Location(name), "", f"{what} larger than {limit // 2**20} MiB; "
                                           "split it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise JobError(Location(name, line, col), "", f"not UTF-8 text (byte "
                       f"0x{data[exc.start]:02x}); save the {what} as UTF-8") from None


def load(path: str | Path) -> Any:
    """Read and parse a job file; an unreadable or oversized file is a ``JobError`` too."""
    return load_text(read_text(path), str(path))


def where(container: Any, key: Any = None, default: Location | None = None, *,
          of_key: bool = False) -> Location | None:
    """The location of ``container[key]`` (or of the container itself when key is None).

    ``of_key`` gives the key's own position (for "unknown key"), not its value's.
    """
    if key is None:
        return getattr(container, "where", default)
    if isinstance(container, MarkedMap):
        marks = container.key_marks if of_key else container.marks
        return marks.get(key, container.where)
    if isinstance(container, MarkedList) and isinstance(key, int) and key < len(container.marks):
        return container.marks[key]
    return getattr(container, "where", default)


def plain(value: Any) -> Any:
    """Marked containers back to builtin dicts and lists (for hashing and JSON)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
