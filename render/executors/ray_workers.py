"""``--executor ray``: one Engine per Ray actor (one GPU each), fed by this process.

Why actors, not Ray Data's ``map_batches`` over an actor pool: the planner's batches already
are the unit of work, ordered so each model loads once, and a worker should keep the model it
holds (model affinity); Ray Data owns its own block order, hides which actor gets a block, and
hands back a dataset where this run needs each batch's outcomes as they land so the runner can
write and record them. Plain actors plus ``ray.wait`` give exactly that in a page of code.

Why the driver retries a lost worker's batches itself instead of ``max_task_retries``: Ray
retries an actor call on the same actor once it has restarted (and reloaded its model), and it
cannot tell a lost node from a task that kills every process it runs in. Here an actor is
restarted by Ray (``max_restarts``) while its batches go to another live worker; a batch lost
twice is split into single tasks, and a task that takes down two workers fails alone with
that error, as a failing task does locally. Python errors never kill a worker: they come back
as ``Failure`` outcomes (``render.executors.work``), and OOM is handled inside the engine.

The driver stays the only process that touches the output roots: workers return PIL images
through Ray's object store and the runner encodes, writes and records them, so the lock, the
ledger and every file name are exactly as with the local executor. Two batches wait at each
worker so it never idles while the driver receives the last one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from render.errors import UserError
from render.executors.work import BatchWork, Failure, Outcome
from render.plan import split
from render.tasks import Batch, Result, Task

RAY_MISSING = ("--executor ray needs Ray: .venv/bin/pip install -q -r requirements-ray.txt "
               "(the lock's Ray), or pip install 'render[ray]'")

#: Batches queued at each worker: one rendering, one waiting, so the GPU never waits for us.
SLOTS = 2
#: Times Ray restarts a worker that died (kill -9, node loss, CUDA crash) before it is out.
MAX_RESTARTS = 3
#: With --batch-size 0 (sized from free memory), batches of at most this many tasks go out,
#: so a large grid spreads over the workers; each worker splits further to what fits.
AUTO_PIECE = 16
#: How often the driver wakes (seconds) to notice a stop request while waiting.
POLL = 0.5


class RenderWorker:
    """One Ray actor: the plugins and one Engine, made once and kept for every batch."""

    def __init__(self, index: int, plugins_dirs: list[str], device: str | None,
                 dtype: str | None, batch_size: int) -> None:
        import ray

        from render.engine import Engine
        from render.plugins import load_plugins

        self.plugins = load_plugins(plugins_dirs)
        self.engine = Engine(self.plugins.pm, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.where = {"name": "ray", "worker": index, "node": ray.util.get_node_ip_address(),
                      "pid": os.getpid()}

    def ping(self) -> int:
        """Answered once the actor is up (again, after Ray restarted it)."""
        return os.getpid()

    def render(self, batch: Batch, shared: Mapping[str, list[Task]],
               ) -> tuple[list[Outcome], dict[str, Any]]:
        """The batch's outcomes, and this worker's figures (where, busy seconds, device)."""
        start = time.perf_counter()
        work = BatchWork(self.engine, self.plugins, shared)
        pieces = split([batch], self.engine.batch_size_for) if self.batch_size <= 0 else [batch]
        outcomes = [outcome for piece in pieces for outcome in work.run(piece)]
        for outcome in outcomes:
            if isinstance(outcome, Result):
                outcome.executor = dict(self.where)
        return outcomes, {**self.where, "busy": time.perf_counter() - start,
                          "described": self.engine.describe()}


@dataclass
class _Worker:
    """The driver's view of one actor: what it holds, what it was sent, how it did."""

    index: int
    actor: Any
    model: Any = None                  # the model key of the last batch sent (affinity)
    inflight: deque[Any] = field(default_factory=deque)   # object refs, in sending order
    deaths: int = 0
    alive: bool = True                 # False: out of restarts, nothing more is sent to it
    up: bool = True                    # False: died, Ray restarting it, not yet answering
    suspect: Any = None                # the call it was running when it died
    probe_at: float = 0.0              # when to ask a restarting worker again
    last_error: str = ""
    images: int = 0
    busy: float = 0.0
    node: str = ""
    device: str = ""
    described: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Item:
    """A batch waiting to be sent, with the workers it was lost on."""

    batch: Batch
    lost_on: tuple[int, ...] = ()


class _Queue:
    """Batches by model, models in the planner's order (the costliest switch outermost)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.models: OrderedDict[Any, deque[_Item]] = OrderedDict()
        for batch in batches:
            self.models.setdefault(batch.key[0], deque()).append(_Item(batch))

    def __bool__(self) -> bool:
        return any(self.models.values())

    def put_back(self, item: _Item) -> None:
        """First in line again (a lost worker's batch)."""
        self.models.setdefault(item.batch.key[0], deque()).appendleft(item)
        self.models.move_to_end(item.batch.key[0], last=False)

    def take(self, worker: _Worker, held: set[Any], others_alive: bool) -> _Item | None:
        """The next batch for ``worker``: of the model it holds if any is left; else of a
        model no other worker holds, in the planner's order; else of the model with the
        most left (helping). A batch lost on this worker goes to another one if it can."""
        def first(items: deque[_Item]) -> _Item | None:
            for item in items:
                if not (others_alive and worker.index in item.lost_on):
                    items.remove(item)
                    return item
            return None

        own = self.models.get(worker.model)
        if own and (item := first(own)):
            return item
        for model, items in self.models.items():
            if model not in held and items and (item := first(items)):
                return item
        for items in sorted(self.models.values(), key=len, reverse=True):
            if items and (item := first(items)):
                return item
        return None

    def drain(self) -> list[_Item]:
        items = [item for items in self.models.values() for item in items]
        self.models.clear()
        return items


class RayExecutor:
    """Renders on Ray actors; see the module docstring for the design."""

    name = "ray"

    def __init__(self, plugins: Any, args: Any) -> None:
        self.plugins = plugins
        self.args = args
        self.workers: list[_Worker] = []
        self.count = 0
        self.use_gpu = False
        self.started_ray = False
        self.writers = 1

    # -- the cluster -------------------------------------------------------------------------
    def check(self) -> None:
        """Ray importable, the cluster up and able to hold the workers: a user mistake here is
        one line (exit 2) before the output roots are touched."""
        device = self.args.device
        if importlib.util.find_spec("ray") is None:
            raise UserError(RAY_MISSING)
        if device and ":" in device:
            raise UserError(f"--device {device} with --executor ray: Ray gives each worker its "
                            "own GPU; use --device cuda, or leave --device out")
        if device == "mps":
            raise UserError("--device mps with --executor ray: Ray schedules CUDA GPUs (or "
                            "CPUs); use the local executor on a Mac")
        import ray

        if not ray.is_initialized():
            self._start_ray(ray)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        self.use_gpu = device == "cuda" or (device is None and gpus > 0)
        if self.use_gpu and gpus == 0:
            raise UserError("--device cuda: the Ray cluster has no GPU")
        self.count = self.args.workers or (gpus if self.use_gpu else 1)
        have, what = (gpus, "GPU") if self.use_gpu else (cpus, "CPU")
        if self.count > have:
            raise UserError(f"--workers {self.count}: the Ray cluster has {have} {what}"
                            f"{'s' if have != 1 else ''} (one per worker)")
        # One writer per two workers (at most four): PNG encoding keeps up with the GPUs.
        self.writers = max(1, min(4, math.ceil(self.count / 2)))

    def _start_ray(self, ray: Any) -> None:
        # RAY_ADDRESS is Ray's own convention (``ray job submit`` sets it for its entrypoint)
        address = self.args.address or os.environ.get("RAY_ADDRESS") or None
        quiet = {"include_dashboard": False, "log_to_driver": bool(self.args.verbose),
                 "logging_level": "DEBUG" if self.args.verbose else "WARNING"}
        if address and address != "auto":
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                cpus = os.cpu_count() or 1
                if self.args.workers and self.args.device == "cpu":
                    cpus = max(cpus, self.args.workers)
                ray.init(num_cpus=cpus, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at --address {address}" if address else \
                "start a local Ray"
            raise UserError(f"--executor ray: cannot {where}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
        self.started_ray = True

    def _start_workers(self) -> None:
        import ray

        cpus = ray.cluster_resources().get("CPU", 1)
        options: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": 0}
        if self.use_gpu:
            options |= {"num_gpus": 1, "num_cpus": 1}
        else:   # the CPU shared out: each worker's torch uses its share of threads
            options |= {"num_cpus": max(1, int(cpus // self.count))}
        remote = ray.remote(RenderWorker).options(**options)
        dirs = [str(Path(d).resolve()) for d in self.args.plugins_dir]
        device = "cuda" if self.use_gpu else "cpu"
        self.workers = [_Worker(i, remote.remote(i, dirs, device, self.args.dtype,
                                                  self.args.batch_size))
                        for i in range(self.count)]

    def close(self) -> None:
        """Stop our workers; shut Ray down when this run started it."""
        if not self.workers and not self.started_ray:
            return   # nothing of ours is running (Ray missing, or no work)
        import ray

        for worker in self.workers:
            with contextlib.suppress(Exception):   # already gone
                ray.kill(worker.actor, no_restart=True)
        self.workers = []
        if self.started_ray:
            ray.shutdown()

    # -- dispatch ----------------------------------------------------------------------------
    def render(self, batches: list[Batch], shared: Mapping[str, list[Task]],
               stop: threading.Event) -> Iterator[list[Outcome]]:
        """Outcomes as batches finish on any worker; after ``stop`` no new batch is sent and
        the ones already sent are received (then written by the runner)."""
        import ray

        if self.args.batch_size <= 0:
            batches = [piece for batch in batches
                       for piece in split([batch], lambda _task: AUTO_PIECE)]
        queue = _Queue(batches)
        self._start_workers()
        sent: dict[Any, tuple[_Worker, _Item]] = {}
        probes: dict[Any, _Worker] = {}
        while True:
            if not stop.is_set():
                self._send(queue, shared, sent)
            self._probe(probes)
            if not sent:
                if stop.is_set() or not queue:
                    return
                if not any(w.alive for w in self.workers):
                    last = next((w.last_error for w in self.workers if w.last_error), "")
                    yield [Failure(task, f"no Ray worker is left (last error: {last})")
                           for item in queue.drain() for task in item.batch.tasks]
                    return
            ready, _ = ray.wait([*sent, *probes], num_returns=1, timeout=POLL)
            for ref in ready:
                if ref in probes:
                    self._probed(ref, probes.pop(ref))
                    continue
                worker, item = sent.pop(ref)
                outcomes = self._receive(ref, worker, item, queue)
                if outcomes:
                    yield outcomes

    def _send(self, queue: _Queue, shared: Mapping[str, list[Task]],
              sent: dict[Any, tuple[_Worker, _Item]]) -> None:
        alive = [w for w in self.workers if w.alive]
        for depth in range(SLOTS):   # by rounds: every worker gets one before any gets two
            for worker in alive:
                if not worker.up or len(worker.inflight) > depth or not queue:
                    continue
                held = {w.model for w in alive if w is not worker}
                item = queue.take(worker, held, others_alive=len(alive) > 1)
                if item is None:
                    continue
                batch = item.batch
                ref = worker.actor.render.remote(
                    batch, {t.id: shared[t.id] for t in batch.tasks if t.id in shared})
                worker.inflight.append(ref)
                worker.model = batch.key[0]
                sent[ref] = (worker, item)

    def _probe(self, probes: dict[Any, _Worker]) -> None:
        """Ask each worker that went down whether Ray has restarted it (a cheap call)."""
        waiting = {worker.index for worker in probes.values()}
        for worker in self.workers:
            if (worker.alive and not worker.up and worker.index not in waiting
                    and time.monotonic() >= worker.probe_at):
                probes[worker.actor.ping.remote()] = worker

    def _probed(self, ref: Any, worker: _Worker) -> None:
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        try:
            ray.get(ref)
        except ActorDiedError as exc:   # out of restarts: Ray gave it up
            worker.alive, worker.last_error = False, _first_line(exc)
        except RayActorError:           # still restarting: ask again in a moment
            worker.probe_at = time.monotonic() + POLL
        else:
            worker.up, worker.suspect = True, None

    def _receive(self, ref: Any, worker: _Worker, item: _Item,
                 queue: _Queue) -> list[Outcome]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        head = worker.inflight[0] if worker.inflight else None
        worker.inflight.remove(ref)
        try:
            outcomes, info = ray.get(ref)
        except RayActorError as exc:   # the worker process died (kill -9, node lost, crash)
            if worker.up:
                self._went_down(worker, head, exc)
            return self._lost(worker, item, queue, exc, culprit=ref == worker.suspect)
        except RayTaskError as exc:    # our bug in the worker, not the task's: fail the batch
            message = f"Ray worker {worker.index}: {_first_line(exc, last=True)}"
            return [Failure(task, message) for task in item.batch.tasks]
        worker.images += sum(isinstance(o, Result) for o in outcomes)
        worker.busy += info["busy"]
        worker.node, worker.device = info["node"], info["described"].get("device", "")
        worker.described[(info["worker"], info["pid"])] = info["described"]
        return outcomes

    def _went_down(self, worker: _Worker, running: Any, exc: BaseException) -> None:
        """The first sign that ``worker`` died: nothing more is sent to it until it answers a
        probe (Ray restarts it with no model); ``running`` was the batch it was rendering."""
        from ray.exceptions import ActorDiedError

        worker.up, worker.suspect, worker.model = False, running, None
        worker.deaths += 1
        worker.last_error = _first_line(exc)
        worker.alive = worker.deaths <= MAX_RESTARTS and not isinstance(exc, ActorDiedError)

    def _lost(self, worker: _Worker, item: _Item, queue: _Queue, exc: BaseException, *,
              culprit: bool) -> list[Outcome]:
        """A batch whose worker died: sent again elsewhere; lost twice, its tasks one by one;
        a single task lost on two workers fails alone. Only the batch the worker was running
        counts (``culprit``); those waiting behind it go back as they were."""
        if not culprit:
            queue.put_back(item)
            return []
        lost_on = (*item.lost_on, worker.index)
        # Twice, and on two workers where there are two (at most three tries in all).
        enough = len(lost_on) >= 2 and (len(set(lost_on)) >= 2 or len(self.workers) == 1
                                        or len(lost_on) >= 3)
        if not enough:
            queue.put_back(_Item(item.batch, lost_on))
            return []
        if len(item.batch.tasks) > 1:
            for task in reversed(item.batch.tasks):
                queue.put_back(_Item(Batch(item.batch.key, (task,))))
            return []
        return [Failure(item.batch.first, "the Ray worker rendering this task died, on "
                        f"workers {', '.join(map(str, lost_on))}: {_first_line(exc)}")]

    # -- provenance and report ---------------------------------------------------------------
    def describe(self, result: Result) -> dict[str, Any]:
        """Device, dtype and versions of the worker that rendered ``result``."""
        where = result.executor
        worker = self.workers[where["worker"]]
        return worker.described.get((where["worker"], where["pid"]), {})

    def worker_lines(self) -> list[str]:
        """Per-worker throughput for the summary: images, busy time, images per busy second."""
        lines = []
        for w in self.workers:
            rate = w.images / w.busy if w.busy > 0 else 0.0
            line = (f"  ray worker {w.index} ({w.node or 'no batch done'}"
                    f"{', ' + w.device if w.device else ''}): {w.images} image"
                    f"{'s' if w.images != 1 else ''}, {w.busy:.1f} s busy, {rate:.2f} img/s")
            if w.deaths:
                line += f", died {w.deaths}x" + ("" if w.alive else " (out)")
            lines.append(line)
        return lines


def _first_line(exc: BaseException, *, last: bool = False) -> str:
    """One line of a Ray error (its first, or ``last``: the worker's own exception)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]).strip() if lines else type(exc).__name__


def _check_reachable(address: str) -> None:
    """A cluster address that answers: Ray itself retries an unreachable one for minutes,
    which a cron job would sit through silently."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there "
                        f"({exc.strerror or exc})") from None
