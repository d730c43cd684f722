"""The work one engine does on one batch, wherever that engine lives.

The local executor runs it in the render process; a Ray worker runs it in its actor and sends
the outcomes back. Either way a batch becomes the same list: a ``Result`` for every task that
rendered and went through ``postprocess``, a ``Failure`` for every task that did not, so the
driver alone records, writes and counts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from render.errors import PluginError, UserError
from render.tasks import Batch, Result, Task

log = logging.getLogger("render")


@dataclass(frozen=True)
class Failure:
    """A task that could not be rendered, with the error in its own words (a string, not the
    exception: it crosses from a Ray worker, and a plugin's exception may not pickle).

    ``shared``: its first pass failed, so the tasks that share that first pass fail with it;
    False when only its own postprocess failed.
    """

    task: Task
    message: str
    shared: bool = True


Outcome = Result | Failure


def failure_message(exc: BaseException) -> str:
    """What the ledger and the summary say: a user's or a plugin's message as written, our
    own errors with their type. The traceback goes to the debug log where it happened."""
    log.debug("render failed:\n%s", "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)))
    message = (str(exc) if isinstance(exc, (PluginError, UserError))
               else f"{type(exc).__name__}: {exc}")
    return message.strip()


class BatchWork:
    """Renders batches on one engine into outcomes; one bad task fails alone.

    ``shared`` maps a rendered task's id to the tasks that reuse its first pass (they differ
    only in post sections: upscale, hires fix ...); each gets its own copy of the images and
    its own postprocess.
    """

    def __init__(self, engine: Any, plugins: Any, shared: Mapping[str, list[Task]]) -> None:
        self.engine = engine
        self.plugins = plugins
        self.shared = shared

    def run(self, batch: Batch) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for rendered in self._render(batch, outcomes):
            for result in self._post_passes(rendered):
                outcomes.append(self._postprocess(result))
        return outcomes

    def _render(self, batch: Batch, outcomes: list[Outcome]) -> list[Result]:
        """Render a batch; on failure retry its tasks one by one so one bad task fails alone."""
        try:
            return self.engine.render(batch)
        except Exception as exc:  # isolate: the night goes on
            if len(batch.tasks) == 1:
                outcomes.append(Failure(batch.first, failure_message(exc)))
                return []
        results = []
        for task in batch.tasks:
            try:
                results.extend(self.engine.render(Batch(batch.key, (task,))))
            except Exception as exc:
                outcomes.append(Failure(task, failure_message(exc)))
        return results

    def _post_passes(self, rendered: Result) -> list[Result]:
        """The first pass's result for its own task, then a copy for every task that shares
        it (same first pass, other post settings), each to be postprocessed on its own.
        The copies are made before any postprocess runs: each starts from the first pass."""
        copies = [dataclasses.replace(
            rendered, task=task, images=[_copy_image(im) for im in rendered.images],
            extras=dict(rendered.extras), timings=dict(rendered.timings, load=0.0),
            notes=list(rendered.notes), provenance={})
            for task in self.shared.get(rendered.task.id, ())]
        return [rendered, *copies]

    def _postprocess(self, result: Result) -> Outcome:
        start = time.perf_counter()
        try:
            done = self.plugins.chain("postprocess", "result", result, task=result.task,
                                      renderer=self.engine.renderer)
        except Exception as exc:
            return Failure(result.task, failure_message(exc), shared=False)
        done.timings["post"] = time.perf_counter() - start
        return done


def _copy_image(image: Any) -> Any:
    """A PIL image copied (a plugin may change an image in place); other values as they are."""
    copy = getattr(image, "copy", None)
    return copy() if callable(copy) else image
