"""Where batches render: in this process (``local``, the default) or on Ray workers (``ray``).

An executor takes the planner's batches and yields each batch's outcomes (``Result`` or
``Failure``, see ``render.executors.work``); the runner records, writes and counts them, so the
lock, the ledger and every file name stay with the one process that holds the output roots.
Pixels, ids and names never depend on the executor; only the provenance says where an image
rendered.
"""

from __future__ import annotations

from typing import Any

EXECUTORS = ("local", "ray")


def make_executor(plugins: Any, args: Any) -> Any:
    """The executor ``--executor`` names, not started (a Ray cluster starts in ``check``)."""
    if args.executor == "ray":
        from render.executors.ray_workers import RayExecutor

        return RayExecutor(plugins, args)
    from render.executors.local import LocalExecutor

    return LocalExecutor(plugins, args)
