"""The one runner of Ray units: done units are skipped, each unit runs once, progress counts, actors finish."""

from __future__ import annotations

import os
import sys

import pytest
import ray.cloudpickle


from stages.runner import UnitJob

# the tasks and actors below live in this test module, which Ray workers cannot import: ship them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _square(unit: int, seen_dir: str) -> int:
    open(os.path.join(seen_dir, f"unit-{unit}"), "w").close()
    return unit * unit


class _Counter:
    """An actor that records which units it ran and whether ``finish`` was called."""

    def __init__(self, seen_dir: str, offset: int):
        self.seen_dir, self.offset = seen_dir, offset

    def run_unit(self, unit: int, extra: str) -> tuple[int, str]:
        open(os.path.join(self.seen_dir, f"unit-{unit}"), "w").close()
        return unit + self.offset, extra

    def finish(self) -> None:
        open(os.path.join(self.seen_dir, f"finished-{os.getpid()}"), "w").close()


def test_tasks_run_each_pending_unit_once_and_report_progress(ray_local, tmp_path):
    calls = []
    job = UnitJob("square", 6, done={1, 4, 99}, on_progress=lambda *a: calls.append(a))
    assert job.todo == [0, 2, 3, 5]
    results = sorted(job.run_tasks(_square, lambda u: (u, str(tmp_path))))
    assert results == [0, 4, 9, 25]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-0", "unit-2", "unit-3", "unit-5"]
    assert calls == [("square", n, 6) for n in range(2, 7)]  # the 2 done units count from the start


def test_actor_pool_runs_pending_units_and_calls_finish_on_every_actor(ray_local, tmp_path):
    job = UnitJob("count", 5, done={2})
    results = sorted(job.run_actors(_Counter, (str(tmp_path), 100), lambda u: (u, f"u{u}"), workers=2, num_cpus=0.5))
    assert results == [(100, "u0"), (101, "u1"), (103, "u3"), (104, "u4")]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("unit-")] == ["unit-0", "unit-1", "unit-3", "unit-4"]
    assert sum(n.startswith("finished-") for n in names) == 2


class _Hinted:
    """An actor that reports each call's unit, the unit it was told comes next, and its own call count;
    a unit's args carry how long it takes."""

    def __init__(self):
        self.calls = 0

    def run_unit(self, unit: int, seconds: float, upcoming: tuple | None = None) -> tuple:
        import time

        self.calls += 1
        time.sleep(seconds)
        return unit, None if upcoming is None else upcoming[0], os.getpid(), self.calls


def _hinted(num_units: int, workers: int, seconds=lambda u: 0.0, done=()) -> dict[int, list[tuple]]:
    """Run the lookahead pool; per actor (pid), its calls in order as (call, unit, unit it was told of)."""
    job = UnitJob("hinted", num_units, done=set(done))
    results = list(job.run_actors(_Hinted, (), lambda u: (u, seconds(u)), workers=workers, num_cpus=0.25,
                                  lookahead=True))
    assert sorted(r[0] for r in results) == job.todo  # every pending unit once
    by_actor: dict[int, list[tuple]] = {}
    for unit, upcoming, pid, call in results:
        by_actor.setdefault(pid, []).append((call, unit, upcoming))
    for calls in by_actor.values():
        calls.sort()
        assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    return by_actor


def test_lookahead_tells_each_actor_the_unit_it_runs_next(ray_local):
    by_actor = _hinted(11, 3, done={3, 7})
    assert len(by_actor) == 3
    ran_by = {unit: pid for pid, calls in by_actor.items() for _, unit, _ in calls}
    told_to = {told: pid for pid, calls in by_actor.items() for _, _, told in calls if told is not None}
    for pid, calls in by_actor.items():
        for k, (_, unit, told) in enumerate(calls):
            nxt = calls[k + 1][1] if k + 1 < len(calls) else None
            if told is not None and nxt != told:  # the unit it was told of went to an idle actor...
                assert ran_by[told] != pid, (pid, calls)
            if nxt is not None and nxt != told:  # ...and what it ran instead was taken from a busy one
                assert told_to[nxt] != pid, (pid, calls)


def test_lookahead_gives_every_actor_work_before_any_hint(ray_local):
    by_actor = _hinted(3, 3)
    assert len(by_actor) == 3 and all(len(calls) == 1 for calls in by_actor.values())


def test_an_idle_actor_takes_the_unit_a_busy_actor_was_told_of(ray_local):
    """Unit 0 is slow: its actor was told of unit 2, which the other actor runs once it has nothing left."""
    by_actor = _hinted(5, 2, seconds=lambda u: 5.0 if u == 0 else 0.0)
    ran_by = {unit: pid for pid, calls in by_actor.items() for _, unit, _ in calls}
    slow = ran_by[0]
    assert [unit for _, unit, _ in by_actor[slow]] == [0] and by_actor[slow][0][2] == 2
    assert ran_by[2] != slow


def test_nothing_to_do_starts_no_actor_and_reports_complete(ray_local, tmp_path):
    calls = []
    job = UnitJob("none", 3, done={0, 1, 2}, on_progress=lambda *a: calls.append(a))
    assert list(job.run_actors(_Counter, (str(tmp_path), 0))) == []
    assert calls == [("none", 3, 3)] and not list(tmp_path.iterdir())


def test_a_failing_unit_raises_in_the_driver(ray_local, tmp_path):
    job = UnitJob("square", 2)
    with pytest.raises(Exception, match="No such file"):
        list(job.run_tasks(_square, lambda u: (u, str(tmp_path / "missing")), max_retries=0))
