"""Per-unit commit markers: a unit counts as written only once its marker exists.

A worker writes all shards of its unit, then its marker (atomically). A rerun after a crash skips
units with a marker and rewrites the others from scratch, which overwrites any half-written shards.
"""

from __future__ import annotations

import json
import time

from .faults import fault_point
from .fsutil import atomic_write, filesystem, join

__all__ = ["CommitLog"]


class CommitLog:
    def __init__(self, store_url: str, prefix: str):
        self.fs, root = filesystem(store_url)
        self.dir = join(root, prefix)

    def _path(self, unit: int) -> str:
        return join(self.dir, f"unit-{unit:08d}.json")

    def commit(self, unit: int, info: dict | None = None) -> None:
        """Mark ``unit`` written; call only after every write of the unit has returned."""
        payload = {"unit": unit, "time": time.time(), **(info or {})}
        fault_point("commit.before")
        atomic_write(self.fs, self._path(unit), json.dumps(payload).encode())
        fault_point("commit.after")

    def committed(self) -> set[int]:
        if not self.fs.exists(self.dir):
            return set()
        done = set()
        for name in self.fs.ls(self.dir, detail=False):
            base = name.rsplit("/", 1)[-1]
            if base.startswith("unit-") and base.endswith(".json"):
                done.add(int(base[5:-5]))
        return done

    def uncommit(self, unit: int) -> None:
        """Forget that ``unit`` was written (damage found): the next run writes it again."""
        if self.fs.exists(self._path(unit)):
            self.fs.rm(self._path(unit))

    def info(self, unit: int) -> dict:
        return json.loads(self.fs.cat_file(self._path(unit)))

    def clear(self) -> None:
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)
