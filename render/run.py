"""The stages wired together: load -> expand -> preflight/plan -> render -> post -> write -> report.

Each stage only consumes what the previous one produced. Torch is imported (through
``render.engine``) only once the run has passed validation and preflight and is not a dry run.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from render import expand
from render.errors import EXIT_FAILED, EXIT_OK, JobError, JobErrors, PluginError, UserError
from render.expand import JobFile, JobPlan
from render.plan import Preflight, plugin_key
from render.plugins import Plugins, load_plugins
from render.tasks import Task

log = logging.getLogger("render")


# -- load and expand ----------------------------------------------------------------------------

def load_all(paths: list[str], plugins: Plugins) -> list[JobFile]:
    """Load every job file (a file named twice, once); report the errors of all together."""
    files, errors = [], []
    unique: dict[Path, str] = {}
    for path in paths:
        unique.setdefault(Path(path).resolve(), path)
    for path in unique.values():
        try:
            files.append(expand.load_job_file(path, plugins))
        except JobErrors as exc:
            errors.extend(exc.errors)
        except JobError as exc:
            errors.append(exc)
    if errors:
        raise JobErrors(errors)
    return files


def _selected(name: str, only: list[str]) -> bool:
    """Whether ``--only`` (globs; none given: every job) selects job ``name``."""
    return not only or any(fnmatch.fnmatchcase(name, p) for p in only)


def selected_plans(files: list[JobFile], only: list[str]) -> list[JobPlan]:
    """The jobs ``--only`` selects; two selected jobs of one name (in two files) are an error:
    their outputs, ledger rows and table rows would be one job's."""
    plans = [plan for jf in files for plan in jf.jobs if _selected(plan.job.name, only)]
    if only and not plans and not any(_selected(n, only) for jf in files for n in jf.broken):
        names = ", ".join(plan.job.name for jf in files for plan in jf.jobs)
        raise UserError(f"--only {' '.join(only)} matches no job (jobs: {names})")
    first: dict[str, JobPlan] = {}
    clashes = []
    for plan in plans:
        other = first.setdefault(plan.job.name, plan)
        if other is not plan:
            where, key = plan.locate("name")
            clashes.append(JobError(where, key, f"job {plan.job.name!r} is also defined at "
                                    f"{other.locate('name')[0]}; job names must be unique "
                                    "across the files of a run (rename one, or pick one with "
                                    "--only)"))
    if clashes:
        raise JobErrors(clashes)
    return plans


def broken_at_load(files: list[JobFile], only: list[str]) -> dict[str, list[JobError]]:
    """Selected jobs a failed plugin keeps from rendering (their files loaded fine)."""
    return {name: errors for jf in files for name, errors in jf.broken.items()
            if _selected(name, only)}


def report_broken(broken: dict[str, list[JobError]]) -> None:
    """One line per distinct plugin failure; these jobs count as failed, the rest renders."""
    seen: set[str] = set()
    for error in (e for errors in broken.values() for e in errors):
        if str(error) not in seen:
            seen.add(str(error))
            print(f"error: {error}", file=sys.stderr)
    if broken:
        print(f"left out because a plugin failed: {', '.join(sorted(broken))} "
              "(every other job renders)", file=sys.stderr)


def guard(plans: list[JobPlan], max_tasks: int) -> int:
    """Refuse an accidental explosion before a single task is built.

    Counts are arithmetic (seed ranges, wildcard subsets saturate at 2**64), so even an
    astronomical job is refused at once; such a count is shown as "more than 2**64 - 1".
    """
    total = sum(plan.task_count for plan in plans)
    if total > max_tasks:
        worst = max(plans, key=lambda p: p.task_count)
        advice = (f"raise it with --max-tasks {total} if you mean it" if total < _HUGE
                  else "no run can render that many: make the job smaller")
        raise UserError(
            f"{worst.job.file}: the selected jobs expand to {_how_many(total)} tasks "
            f"(job {worst.job.name!r}: {_how_many(worst.task_count)}), more than --max-tasks "
            f"{max_tasks:,}; {advice}"
        )
    return total


_HUGE = 2**64


def _how_many(count: int) -> str:
    """``count`` with thousands separators; past 2**64 (where Python may refuse to print a
    number at all) "more than 18,446,744,073,709,551,615"."""
    return f"{count:,}" if count < _HUGE else f"more than {_HUGE - 1:,}"


def iter_resolved(plans: list[JobPlan], plugins: Plugins, limit: int | None,
                  checkers: dict[int, Preflight], *, deep: bool = False,
                  ) -> Iterator[tuple[Task, JobPlan]]:
    """Stream (preflighted task, plan) pairs, plugin expansion applied, up to ``limit`` tasks.

    ``checkers`` (one ``Preflight`` per job file, by ``id``) collect the errors: a caller
    raises them once the stream ends, so every problem of every file is reported together.
    ``deep``: plugins may open weight files with torch to check them (a run, not --dry-run).
    """
    produced = 0
    for plan in plans:
        checker = checkers.setdefault(id(plan.file), Preflight(plan.file, deep=deep))
        for task in expand.iter_tasks(plan):
            try:
                finals = expand.plugin_expand(task, plugins)
            except PluginError as exc:
                checker.plugin_failed(plan, exc, plugin_key(task, exc.plugin))
                continue
            for final in finals:
                if limit is not None and produced >= limit:
                    return
                produced += 1
                resolved = checker.resolve(final, plan)
                if resolved is not None:
                    yield resolved, plan


def raise_errors(checkers: dict[int, Preflight]) -> None:
    """Every preflight error of every file, each file's in line order."""
    errors = [error for checker in checkers.values() for error in sorted(
        checker.errors, key=lambda e: (e.where.line, e.where.col) if e.where else (0, 0))]
    if errors:
        raise JobErrors(errors)


def broken_at_preflight(checkers: dict[int, Preflight]) -> dict[str, list[JobError]]:
    """Jobs with tasks a plugin failed on at expansion or preflight (those tasks left out)."""
    broken: dict[str, list[JobError]] = {}
    for checker in checkers.values():
        for name, errors in checker.broken.items():
            broken.setdefault(name, []).extend(errors)
    return broken


# -- the commands --------------------------------------------------------------------------------


def list_plugins(args: Any) -> int:
    plugins = load_plugins(args.plugins_dir)
    fields = plugins.fields()
    for name, source, hooks in plugins.describe():
        keys = sorted(k if w == "task" else f"output.{k}" for (w, k), spec in fields.items()
                      if spec.plugin == name)
        print(f"{name:14} {source}")
        if keys:
            print(f"{'':14} keys: {', '.join(keys)}")
        if plugins.kinds_of(name):
            print(f"{'':14} model kinds: {', '.join(plugins.kinds_of(name))}")
        print(f"{'':14} hooks: {', '.join(hooks)}")
    for failure in plugins.failures:
        print(f"{failure.name:14} FAILED ({failure.source}): {failure.error}")
    return EXIT_FAILED if plugins.failures else EXIT_OK


def run(args: Any) -> int:
    plugins = load_plugins(args.plugins_dir)
    for failure in plugins.failures:
        print(f"warning: plugin {failure.name} ({failure.source}) failed to load: "
              f"{failure.error}", file=sys.stderr)
    files = load_all(args.jobs, plugins)
    plans = selected_plans(files, args.only)
    broken = broken_at_load(files, args.only)
    guard(plans, args.max_tasks)
    checkers: dict[int, Preflight] = {}
    if args.dry_run:
        return dry_run(plans, plugins, checkers, args, broken)
    tasks = resolve_tasks(plans, plugins, args.limit, checkers, deep=True)
    from render.executors import make_executor

    executor = make_executor(plugins, args)
    try:
        executor.check()   # the device, Ray: before any ledger, gallery or model is touched
        broken |= broken_at_preflight(checkers)
        report_broken(broken)
        from render.runner import Runner

        code = Runner(plans, plugins, args, executor).run(tasks)
    finally:
        executor.close()
    return code if code != EXIT_OK or not broken else EXIT_FAILED


def resolve_tasks(plans: list[JobPlan], plugins: Plugins, limit: int | None = None,
                  checkers: dict[int, Preflight] | None = None, *,
                  deep: bool = False) -> list[Task]:
    """Expand and preflight every task of ``plans``: the tasks as the renderer gets them.

    Raises ``JobErrors`` with every problem of every job file before anything renders.
    Tasks a plugin failed on are left out and recorded in ``checkers`` (``broken``).
    """
    checkers = {} if checkers is None else checkers
    tasks = [task for task, _ in iter_resolved(plans, plugins, limit, checkers, deep=deep)]
    raise_errors(checkers)
    return tasks


def dry_run(plans: list[JobPlan], plugins: Plugins, checkers: dict[int, Preflight],
            args: Any, broken: dict[str, list[JobError]]) -> int:
    """List tasks (table or JSON lines), streaming; nothing is written anywhere.

    "done" is what the disk holds: a ledger row whose file is missing, truncated or changed
    is not done (checked read-only, as a run would). An output folder a run could not use is
    one located error line each, after the table (exit 2).
    """
    from render import output
    from render.errors import EXIT_USAGE
    from render.ledger import LedgerCorrupt, read_done_keys
    from render.reconcile import check_root

    done_by_root: dict[Path, set[tuple[str, str]]] = {}
    done_keys: dict[int, set[tuple[str, str]]] = {}   # per plan: its output root's ledger
    root_errors: list[JobError] = []
    stats: dict[str, Counter[str]] = {}
    needs: dict[str, set[tuple[str, str]]] = {}
    out = sys.stdout
    for resolved, plan in iter_resolved(plans, plugins, args.limit, checkers):
        if id(plan) not in done_keys:
            root = output.output_root(plan.job.output.dir, plan.job.base_dir)
            if root not in done_by_root:
                done_by_root[root] = set()
                if problem := check_root(root):
                    root_errors.append(JobError(*plan.locate("output.dir"), problem))
                else:
                    try:
                        done_by_root[root] = read_done_keys(root)
                    except LedgerCorrupt as exc:
                        print(f"warning: the ledger {exc.path} is damaged ({exc.reason}): a run "
                              "sets it aside and rebuilds it from the images; nothing counted "
                              "as done here", file=sys.stderr)
            done_keys[id(plan)] = done_by_root[root]
        done = (resolved.id, resolved.job) in done_keys[id(plan)]
        counter = stats.setdefault(plan.job.name, Counter())
        counter["tasks"] += 1
        counter["done"] += done
        needs.setdefault(plan.job.name, set()).update(
            (ref.kind, ref.path) for ref in resolved.files.values() if ref.kind != "image")
        if args.json:
            record = resolved.to_json()
            record["done"] = done
            out.write(json.dumps(record, default=str) + "\n")
    if not args.json:   # the table first, also when something is missing: then the errors
        blocked = sum((checker.blocked for checker in checkers.values()), Counter())
        _print_table(plans, stats, needs, blocked)
    for error in root_errors:
        print(f"error: {error}", file=sys.stderr)
    raise_errors(checkers)
    if root_errors:
        return EXIT_USAGE
    broken = broken | broken_at_preflight(checkers)
    report_broken(broken)
    return EXIT_FAILED if broken else EXIT_OK


def _print_table(plans: list[JobPlan], stats: dict[str, Counter[str]],
                 needs: dict[str, set[tuple[str, str]]], blocked: Counter[str]) -> None:
    """One row per job: its tasks, how many are done, its axes, the files it needs (and, when
    some are missing, how many of its tasks the errors below keep from rendering)."""
    rows = [("job", "tasks", "done", "axes", "needs")]
    total = Counter()
    for plan in plans:
        counter = stats.get(plan.job.name, Counter()).copy()
        counter["tasks"] += blocked[plan.job.name]
        total.update(counter)
        axes = " x ".join(f"{a.key}({len(a.values)})" for a in plan.grid)
        if plan.zip:
            axes += (" " if axes else "") + "zip(" + ",".join(a.key for a in plan.zip) + ")"
        if len(plan.seeds) > 1:
            axes += (" x " if axes else "") + f"seeds({len(plan.seeds)})"
        if plan.prompt_count > 1:
            axes = f"prompts({plan.prompt_count})" + (" x " + axes if axes else "")
        files = sorted(f"{kind}:{Path(path).name}" for kind, path in needs.get(plan.job.name, ()))
        if blocked[plan.job.name]:
            n = blocked[plan.job.name]
            files.insert(0, f"MISSING for {n} task{'s' if n != 1 else ''} (errors below)")
        rows.append((plan.job.name, str(counter["tasks"]), str(counter["done"]), axes or "-",
                     ", ".join(files) or "-"))
    rows.append(("total", str(total["tasks"]), str(total["done"]), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        cells = (cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True))
        print("  ".join(cells) + "  " + row[4])


def show(image: str) -> int:
    from render.replay import show_image

    return show_image(image)


def replay(args: Any) -> int:
    from render.replay import replay_image

    return replay_image(args)
