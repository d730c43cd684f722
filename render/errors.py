"""Errors a user can fix, each located in a file.

A user mistake is reported as ``file:line:col: key.path: message`` with no traceback;
anything else escaping the CLI is our bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Exit codes: all rendered; some tasks failed; invalid input (nothing written); the output
#: root is locked by another run; stopped by a signal.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass(frozen=True)
class Location:
    """Where a value sits in a job file (line and column are 1-based)."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


class UserError(Exception):
    """A mistake in the user's input; printed as one line, never with a traceback."""


class JobError(UserError):
    """One error located in a job file."""

    def __init__(self, where: Location | None, key: str, message: str) -> None:
        self.where = where
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [str(self.where)] if self.where else []
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


class JobErrors(UserError):
    """Every error found in one pass over the input, reported together."""

    def __init__(self, errors: list[JobError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class FieldError(ValueError):
    """Raised by a validator or a preflight hook; says which key of the job is wrong.

    ``subkey`` points below the field (``0.scale``). ``key`` names another top-level key
    than the one being checked, e.g. a LoRA plugin blaming a tag in ``prompt``.
    """

    def __init__(self, message: str, subkey: str = "", *, key: str = "") -> None:
        self.message = message
        self.subkey = subkey
        self.key = key
        super().__init__(message)


class FieldErrors(FieldError):
    """Several problems found at once, each a ``FieldError`` (a stack with three missing
    LoRAs is three lines). Behaves as its first error where only one can be reported."""

    def __init__(self, errors: list[FieldError]) -> None:
        first = errors[0]
        super().__init__(first.message, first.subkey, key=first.key)
        self.errors = list(errors)


def raise_all(errors: list[FieldError]) -> None:
    """Raise nothing, the one error, or all of them as ``FieldErrors``."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise FieldErrors(errors)


class PluginError(RuntimeError):
    """A plugin raised where a value was expected: our user's bug report names the plugin.

    Not a ``UserError``: the job file may be fine. The task (or job) that needed the plugin
    fails with this one line; everything else still renders.
    """

    def __init__(self, plugin: str, hook: str, error: str) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error}")
