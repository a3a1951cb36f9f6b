"""One runner for every Ray job over images: units of work on a pool, each run once, with progress.

A job is split into numbered *units* (``storage.shards``); a unit that is already done (its commit
marker exists, or its staged output) is skipped, so rerunning a killed job finishes it. The work of
a unit is either a stateless Ray task (ingest) or a method of a stateful actor that holds a model
(teacher caching, embedding), placed by the resources it asks for. Results come back in completion
order; ``on_progress(phase, done, total)`` counts skipped units as done.

Actors follow one protocol: ``run_unit(*args) -> result`` per unit and, optionally, ``finish()``,
called once on every actor after the last unit (an actor that writes in the background waits for
its writes there, so an error in them reaches the driver). With ``lookahead`` each call also names
the unit that actor runs next (``upcoming=`` its args, None for its last), so an actor can decode
that unit's images while its accelerator computes this one (the teacher and embedding jobs always
ask for it; their actors use it on CUDA only, where the CPU threads are free during the forward).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

__all__ = ["DecodeAhead", "UnitJob", "ray_node_id"]

Progress = Callable[[str, int, int], None]


class DecodeAhead:
    """The actor's side of the lookahead: one unit's input work (read and decode) started in a background
    thread while the actor computes the current unit, and used only by the unit it was started for (a
    unit the runner gave to another actor is dropped: its work finishes and is not used). Disabled, it
    starts nothing (CPU: the torch threads hold the cores during the forward)."""

    def __init__(self, enabled: bool):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead") if enabled else None
        self.ahead: tuple[int, Future] | None = None

    def take(self, unit: int, work: Callable[..., Any], *args: Any) -> tuple[Any, bool]:
        """``work(*args)`` for ``unit``, and whether it had been done ahead (its error is raised here, for
        this unit)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == unit:
            return ahead[1].result(), True
        return work(*args), False

    def start(self, unit: int, work: Callable[..., Any], *args: Any) -> None:
        if self.pool is not None:
            self.ahead = (unit, self.pool.submit(work, *args))

    def drop(self) -> None:
        self.ahead = None


def ray_node_id() -> str | None:
    """The Ray node this process runs on (recorded in commit markers: which node wrote a unit), or None."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclass
class UnitJob:
    """Units ``0 .. num_units-1`` of one phase; ``done`` are skipped."""

    phase: str
    num_units: int
    done: Iterable[int] = ()
    on_progress: Progress | None = None
    _done: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._done = {u for u in self.done if 0 <= u < self.num_units}
        self.on_progress = self.on_progress or _no_progress

    @property
    def todo(self) -> list[int]:
        """Units still to run, in order."""
        return [u for u in range(self.num_units) if u not in self._done]

    def _report(self, finished: int) -> None:
        self.on_progress(self.phase, finished, self.num_units)

    def _collect(self, results: Iterator[Any]) -> Iterator[Any]:
        finished = len(self._done)
        self._report(finished)
        for result in results:
            finished += 1
            self._report(finished)
            yield result

    def run_tasks(self, fn: Callable, args: Callable[[int], tuple] = lambda u: (u,), *, num_cpus: float = 1,
                  num_gpus: float = 0, max_retries: int = 2) -> Iterator[Any]:
        """``fn(*args(u))`` as one Ray task per unit still to do; yields results as tasks finish."""
        import ray

        # SPREAD: units go to every node of a cluster rather than filling one node first (decoding and
        # writing are I/O-heavy: a node's disk and network are worth as much as its cores)
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                            scheduling_strategy="SPREAD")(fn)
        pending = [remote.remote(*args(u)) for u in self.todo]

        def results() -> Iterator[Any]:
            nonlocal pending
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])

        return self._collect(results())

    def run_actors(self, actor_cls: type, init_args: tuple, args: Callable[[int], tuple] = lambda u: (u,), *,
                   workers: int = 1, num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = 3,
                   lookahead: bool = False) -> Iterator[Any]:
        """``actor.run_unit(*args(u))`` on a pool of ``workers`` actors (no more than units to do);
        ``lookahead``: ``run_unit(*args(u), upcoming=args(v))``, v being the unit the same actor runs next
        (each actor holds one unit in reserve, which an idle actor takes over).

        An actor lost with its node is restarted by Ray elsewhere (``max_restarts``) and the calls it had
        not answered are retried there (``max_task_retries``): Ray's own fault tolerance, no loop here.
        A unit it had answered but whose write it still held is not committed; callers check the commit
        markers after the job (``stages.cache``)."""
        import ray

        todo = self.todo
        if not todo:
            return self._collect(iter(()))
        remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                max_task_retries=max_restarts, scheduling_strategy="SPREAD")(actor_cls)
        actors = [remote_cls.remote(*init_args) for _ in range(min(workers, len(todo)))]

        def results() -> Iterator[Any]:
            try:
                if lookahead:
                    yield from _with_lookahead(actors, todo, args)
                else:
                    pool = ray.util.ActorPool(actors)
                    yield from pool.map_unordered(lambda a, u: a.run_unit.remote(*args(u)), todo)
                if hasattr(actor_cls, "finish"):
                    ray.get([a.finish.remote() for a in actors])
            finally:
                for a in actors:
                    ray.kill(a)

        return self._collect(results())


def _with_lookahead(actors: list, todo: list[int], args: Callable[[int], tuple]) -> Iterator[Any]:
    """Results of ``run_unit(*args(u), upcoming=...)`` over ``todo`` in completion order.

    Every actor gets a unit first; then each is told of one more unit, which it runs when it answers. An
    actor that answers with nothing reserved takes a unit reserved by a busy one (whose hint is then
    dropped by it), so no actor idles while a unit waits for another.
    """
    import ray

    queue = deque(todo)
    reserved: dict[int, int] = {}  # actor -> the unit it was told it runs next (not yet submitted)
    running: dict[Any, int] = {}  # call -> its actor

    def submit(a: int, unit: int) -> None:
        if queue:
            reserved[a] = queue.popleft()
        upcoming = reserved.get(a)
        running[actors[a].run_unit.remote(*args(unit), upcoming=None if upcoming is None else args(upcoming))] = a

    first = {a: queue.popleft() for a in range(len(actors)) if queue}
    for a, unit in first.items():
        submit(a, unit)
    while running:
        [ready], _ = ray.wait(list(running), num_returns=1)
        a = running.pop(ready)
        result = ray.get(ready)  # a unit's error reaches the driver here
        unit = reserved.pop(a, None)
        if unit is None and reserved:  # nothing of its own left: take a busy actor's reserved unit
            unit = reserved.pop(next(iter(reserved)))
        if unit is not None:
            submit(a, unit)
        yield result
