"""Find, load and register plugins: built-ins, installed entry points, ``--plugins-dir``.

Built-in features live in the repository's ``plugins/`` folder, which the package ships as
``render.builtin_plugins`` so that an installed wheel has them whatever the working
directory; they register through the same helper as a user's plugin (as datasette does with
its default plugins). A plugin that fails to import is recorded with its error instead of
stopping the run: only the job keys it would have claimed fail validation.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import pkgutil
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from render import hookspecs
from render.errors import FieldError, PluginError, UserError

#: The repository's ``plugins/`` folder, as the package ships it (pyproject.toml maps it).
BUILTIN_PACKAGE = "render.builtin_plugins"
ENTRY_POINT_GROUP = "render"

#: Core hook implementations (module, attribute), registered before any plugin.
CORE_HOOKS = (("render.output", "core_writers"), ("render.kinds", "core_kinds"))
CORE_NAMES = frozenset(attribute for _, attribute in CORE_HOOKS)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, kept to explain the job keys it would have owned."""

    name: str
    source: str
    error: str


@dataclass
class FieldSpec:
    """A job-file key claimed by a plugin (or the core) with its validator."""

    key: str
    validator: Callable[[Any, Any], Any]
    plugin: str
    where: str = "task"
    doc: str = ""
    stage: str = "render"   # "post": acts on the rendered images only (upscale, hires fix)
    animates: bool = False  # a task with this key renders an animation (AnimateDiff)


@dataclass(frozen=True)
class FormatSpec:
    """A value of ``output.format`` a plugin (or the core) registered."""

    name: str
    extension: str          # with its dot: ".gif"
    plugin: str
    animated: bool = False
    doc: str = ""


@dataclass
class Plugins:
    """The loaded plugin manager plus what was learned while loading it."""

    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)   # plugin name -> file or dist
    _fields: dict[tuple[str, str], FieldSpec] | None = None
    _kinds: dict[str, tuple[str, Any]] | None = None   # kind name -> (plugin, ModelKind)
    _formats: dict[str, FormatSpec] | None = None
    _order: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def fields(self) -> dict[tuple[str, str], FieldSpec]:
        """Every claimed key as ``{(where, key): FieldSpec}`` (collected once, at load)."""
        if self._fields is None:
            self._fields = _collect_fields(self)
        return self._fields

    def kinds(self) -> dict[str, Any]:
        """Every registered kind of model file, ``{name: ModelKind}`` (collected at load)."""
        if self._kinds is None:
            self._kinds = _collect_kinds(self)
        return {name: kind for name, (_, kind) in self._kinds.items()}

    def formats(self) -> dict[str, FormatSpec]:
        """Every registered output format, ``{name: FormatSpec}`` (collected at load)."""
        if self._formats is None:
            self._formats = _collect_formats(self)
        return dict(self._formats)

    def kinds_of(self, plugin_name: str) -> list[str]:
        """The kinds of model file ``plugin_name`` registered."""
        self.kinds()
        return sorted(k for k, (owner, _) in (self._kinds or {}).items() if owner == plugin_name)

    def unload(self, name: str, error: str) -> None:
        """Take a plugin out, with the reason, and forget every key and kind it registered."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._order.clear()
        self.failures.append(PluginFailure(name, self.sources.pop(name, "?"), error))
        if self._fields is not None:
            self._fields = {k: s for k, s in self._fields.items() if s.plugin != name}
        if self._kinds is not None:
            self._kinds = {k: v for k, v in self._kinds.items() if v[0] != name}
        if self._formats is not None:
            self._formats = {k: f for k, f in self._formats.items() if f.plugin != name}

    def ordered(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """``(plugin name, function)`` of a hook in pluggy's call order: ``tryfirst`` first,
        then the last registered first, ``trylast`` last (wrappers are not listed)."""
        return [(impl.plugin_name, impl.function) for impl in self._impls(hook_name)]

    def _impls(self, hook_name: str) -> list[Any]:
        """The hook's implementations (pluggy ``HookImpl``) in call order, no wrappers;
        remembered until a plugin is registered or unloaded (preflight asks per task)."""
        known = self._order.get(hook_name)
        if known is None:
            caller = getattr(self.pm.hook, hook_name)
            known = self._order[hook_name] = [impl for impl in reversed(caller.get_hookimpls())
                                              if not (impl.hookwrapper or impl.wrapper)]
        return known

    def chain(self, hook_name: str, value_name: str, value: Any, **kwargs: Any) -> Any:
        """Pass ``value`` through every implementation in call order; None keeps it.

        Each implementation gets only the arguments it names, as pluggy does: a hook that
        gained an argument (``postprocess``'s ``renderer``) keeps its older implementations.
        """
        for impl in self._impls(hook_name):
            given = {k: v for k, v in kwargs.items() if k in impl.argnames}
            changed = impl.function(**{value_name: value}, **given)
            if changed is not None:
                value = changed
        return value

    def post_keys(self) -> frozenset[str]:
        """Task keys registered with ``stage="post"``: they act after the first pass."""
        return frozenset(spec.key for (where, _), spec in self.fields().items()
                         if where == "task" and spec.stage == "post")

    def failure_for(self, key: str) -> PluginFailure | None:
        """The failed plugin that probably owned ``key`` (same name as the key)."""
        for failure in self.failures:
            if failure.name == key or failure.name.rstrip("s") == key.rstrip("s"):
                return failure
        return None

    def describe(self) -> list[tuple[str, str, list[str]]]:
        """``(name, source, hooks)`` for ``--list-plugins``."""
        rows = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin) or "?"
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
            rows.append((name, self.sources.get(name, ""), hooks))
        return sorted(rows)


def _import_file(path: Path) -> Any:
    """Import one plugin file, or a package folder, under a private module name (no
    sys.path changes; a package's relative imports work)."""
    if path.is_dir():
        module_name = f"render_plugin_{path.parent.name}_{path.name}"
        spec = importlib.util.spec_from_file_location(
            module_name, path / "__init__.py", submodule_search_locations=[str(path)])
    else:
        module_name = f"render_plugin_{path.parent.name}_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


def _register(plugins: Plugins, name: str, source: str, load: Callable[[], Any]) -> None:
    """Import one plugin with ``load`` and register it; a failure is recorded, not raised."""
    plugins._order.clear()
    try:
        plugins.pm.register(load(), name=name)
    except (Exception, SystemExit) as exc:  # a broken plugin must not stop the other jobs
        plugins.failures.append(PluginFailure(name, source, _error_line(exc)))
        return
    plugins.sources[name] = source


def load_builtins(plugins: Plugins) -> None:
    """Register every module and sub-package of :data:`BUILTIN_PACKAGE` (``_*`` skipped)."""
    try:
        package = importlib.import_module(BUILTIN_PACKAGE)
    except ImportError as exc:  # a checkout used without `pip install -e .`
        plugins.failures.append(PluginFailure(
            "builtin_plugins", BUILTIN_PACKAGE,
            f"{_error_line(exc)} (install the project: pip install -e .)"))
        return
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module_name = f"{BUILTIN_PACKAGE}.{info.name}"
        spec = importlib.util.find_spec(module_name)
        source = (spec.origin if spec and spec.origin else None) or module_name
        _register(plugins, info.name, source,
                  lambda m=module_name: importlib.import_module(m))


def load_dir(plugins: Plugins, directory: Path) -> None:
    """Register every ``*.py`` file and package folder of ``directory`` (``_*`` skipped)."""
    found = [*directory.glob("*.py"), *(d for d in directory.iterdir()
                                         if (d / "__init__.py").is_file())]
    for path in sorted(found, key=lambda p: p.name):
        if path.name.startswith(("_", ".")):
            continue
        name = path.stem
        if plugins.pm.has_plugin(name):
            name = f"{path.parent.name}/{path.stem}"
        _register(plugins, name, str(path), lambda p=path: _import_file(p))


def load_entry_points(plugins: Plugins) -> None:
    """Register plugins that installed packages advertise under the ``render`` group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if plugins.pm.has_plugin(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist else f"entry point {ep.value}"
        _register(plugins, ep.name, source, ep.load)


def load_plugins(plugins_dirs: Iterable[str | Path] = (), *, builtins: bool = True) -> Plugins:
    """Build the plugin manager: core hooks, built-ins, entry points, then ``plugins_dirs``."""
    pm = pluggy.PluginManager("render")
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    for module_name, attribute in CORE_HOOKS:
        impl = getattr(importlib.import_module(module_name), attribute)
        pm.register(impl, name=attribute)
        plugins.sources[attribute] = f"{module_name} (core)"
    if builtins:
        load_builtins(plugins)
    load_entry_points(plugins)
    for directory in plugins_dirs:
        if not Path(directory).is_dir():
            raise UserError(f"--plugins-dir {directory}: no such folder")
        load_dir(plugins, Path(directory))
    _reject_unknown_hooks(plugins)
    for plugin in plugins.pm.get_plugins():
        if plugins.pm.get_name(plugin) not in CORE_NAMES:
            _name_failures(plugins.pm, plugin)
    plugins.kinds()
    plugins.formats()
    plugins.fields()
    return plugins


def _name_failures(pm: pluggy.PluginManager, plugin: Any) -> None:
    """Make every hook function of ``plugin`` raise :class:`PluginError` naming it.

    pluggy lets an implementation's exception through as it is, so a traceback from deep in
    a feature would not say which plugin or hook failed; each call site would have to guess.
    ``FieldError`` and ``UserError`` pass unchanged: they are a plugin's answer, not its bug.
    """
    name = pm.get_name(plugin) or "?"
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                impl.function = _naming(impl.function, name, caller.name)


def _naming(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (FieldError, UserError, PluginError):
            raise
        except (Exception, SystemExit) as exc:
            raise PluginError(plugin, hook, _error_line(exc)) from exc
    return call


def _gather(plugins: Plugins, hook_name: str, what: str,
            make_register: Callable[[Callable[[Any, str, Any], None], str], Callable[..., None]],
            ) -> dict[Any, tuple[str, Any]]:
    """Call a ``register_*`` hook of every plugin, first registered first, so a built-in keeps
    what a later plugin also claims. A plugin whose hook raises, or that claims what another
    holds, is unloaded with that reason and keeps nothing. Returns key -> (plugin, value)."""
    claimed: dict[Any, tuple[str, Any]] = {}
    for plugin_name, function in plugins.ordered(hook_name)[::-1]:
        mine: dict[Any, tuple[str, Any]] = {}

        def add(key: Any, label: str, value: Any, _name: str = plugin_name,
                _mine: dict = mine) -> None:
            if key in claimed:
                raise PluginError(_name, hook_name, f"{what} {label!r} is already claimed by "
                                  f"plugin {claimed[key][0]!r}")
            _mine[key] = (_name, value)

        try:
            function(register=make_register(add, plugin_name))
        except PluginError as exc:
            plugins.unload(plugin_name, str(exc))
            continue
        claimed.update(mine)
    return claimed


def _collect_fields(plugins: Plugins) -> dict[tuple[str, str], FieldSpec]:
    def make_register(add: Callable[[Any, str, Any], None], name: str) -> Callable[..., None]:
        def register(key: str, validator: Callable[[Any, Any], Any], *,
                     where: str = "task", doc: str = "", stage: str = "render",
                     animates: bool = False) -> None:
            if stage not in ("render", "post"):
                raise PluginError(name, "register_task_fields",
                                  f"key {key!r}: stage must be 'render' or 'post', got {stage!r}")
            checked = _naming(validator, name, f"the validator of {key!r}")
            add((where, key), key, FieldSpec(key, checked, name, where, doc, stage,
                                             bool(animates)))
        return register

    return {key: spec for key, (_, spec) in
            _gather(plugins, "register_task_fields", "key", make_register).items()}


def _collect_kinds(plugins: Plugins) -> dict[str, tuple[str, Any]]:
    from render.kinds import ModelKind

    def make_register(add: Callable[[Any, str, Any], None], name: str) -> Callable[..., None]:
        def register(kind: ModelKind) -> None:
            if not isinstance(kind, ModelKind):
                raise TypeError(f"register() takes a ModelKind, got {type(kind).__name__}")
            add(kind.name, kind.name, kind)
        return register

    return _gather(plugins, "register_model_kinds", "model kind", make_register)


_FORMAT_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]*")
_EXTENSION = re.compile(r"\.[A-Za-z0-9_\-]+")


def _collect_formats(plugins: Plugins) -> dict[str, FormatSpec]:
    def make_register(add: Callable[[Any, str, Any], None], name: str) -> Callable[..., None]:
        def register(format_name: str, extension: str, *, animated: bool = False,
                     doc: str = "") -> None:
            if not isinstance(format_name, str) or not _FORMAT_NAME.fullmatch(format_name):
                raise PluginError(name, "register_output_formats",
                                  f"format {format_name!r}: expected a lower-case name "
                                  "(letters, digits, '-', '_')")
            if not isinstance(extension, str) or not _EXTENSION.fullmatch(extension):
                raise PluginError(name, "register_output_formats",
                                  f"format {format_name!r}: extension {extension!r} is not "
                                  "'.' + letters or digits")
            add(format_name, format_name,
                FormatSpec(format_name, extension, name, bool(animated), doc))
        return register

    formats = {key: spec for key, (_, spec) in
               _gather(plugins, "register_output_formats", "output format",
                       make_register).items()}
    from render import output  # output names take a plugin format's extension from here

    for spec in formats.values():
        output.EXTENSIONS.setdefault(spec.name, spec.extension)
    return formats


def hook_names() -> list[str]:
    """The names of every hook in ``render.hookspecs``."""
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "render_spec"))


def _reject_unknown_hooks(plugins: Plugins) -> None:
    """A hookimpl with no spec is a misspelling: unload that plugin and say which name."""
    known = hook_names()
    while True:
        try:
            plugins.pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = plugins.pm.get_name(exc.plugin) or "?"
            bad = sorted(
                c.name for c in plugins.pm.get_hookcallers(exc.plugin) or [] if c.spec is None
            )
            hints = []
            for hook in bad:
                close = difflib.get_close_matches(hook, known, n=1)
                hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            plugins.unload(name, f"unknown hook {', '.join(hints)}")
