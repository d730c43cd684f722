"""Load a job file as plain dicts and lists that remember where each key and item came from.

Every later error can then say ``file:line:col: key.path: message``. Only YAML's safe
subset is accepted; duplicate keys are an error rather than silently "last one wins".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from render.errors import JobError, Location


class MarkedMap(dict):
    """A mapping that knows the line/column of itself and of each of its keys."""

    where: Location
    marks: dict[Any, Location]       # the value's position (the key's, for a nested container)
    key_marks: dict[Any, Location]   # the key's position


class MarkedList(list):
    """A sequence that knows the line/column of itself and of each item."""

    where: Location
    marks: list[Location]


class _Loader(yaml.SafeLoader):
    """SafeLoader building Marked containers; nothing beyond yaml.safe_load's constructs."""

    filename = "<job>"


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
        result[key] = loader.construct_object(value_node, deep=True)
        result.marks[key] = _loc(loader, value_node if _is_scalar(value_node) else key_node)
        result.key_marks[key] = _loc(loader, key_node)
    return result


def _is_scalar(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode)


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> MarkedList:
    result = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    result.where = _loc(loader, node)
    result.marks = [_loc(loader, child) for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_text(text: str, filename: str) -> Any:
    """Parse YAML text; a syntax error becomes a located ``JobError``."""
    loader = _Loader(text)
    loader.filename = filename
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(filename, mark.line + 1, mark.column + 1) if mark else Location(filename)
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise JobError(where, "", f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise JobError(Location(filename), "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def load(path: str | Path) -> Any:
    """Read and parse a job file; an unreadable file is a ``JobError`` too."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(Location(name), "", "job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(Location(name), "", f"cannot read job file: {exc}") from None
    return load_text(text, name)


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
