"""Deterministic fault injection: crash at a named point when ``AMOE_FAULT`` names it (off otherwise).

Crash-safety claims are tested by killing a command at exactly the moments that matter (between a
unit's data and its commit marker, inside teacher creation, during PHI-S, during a checkpoint rename,
...) rather than at a random time. ``AMOE_FAULT=<point>`` makes the process that reaches ``<point>``
SIGKILL its whole process group, which is what a machine losing power does to a job: the command,
its Ray cluster and its workers die at once, nothing is flushed. ``AMOE_FAULT=<point>@<n>`` crashes on
the n-th time the point is reached in that process (default the first). Unset, a point costs one
dictionary lookup.

Ray starts its workers in process groups of their own, so the process group to kill is the command's:
the first process that imports this module with ``AMOE_FAULT`` set (the command) records its group in
``AMOE_FAULT_PGID``, which the Ray cluster it starts, and so every worker, inherits. Killing only the
worker would not be a crash: Ray restarts a lost actor and retries its calls (``stages.runner``).
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "fault_point"]

POINTS = (
    "commit.before",  # a unit's data is written, its commit marker is not
    "commit.after",  # the marker is written, the writer has not moved on
    "teacher.create",  # a teacher group exists with its attributes, its arrays do not
    "teacher.heads",  # a teacher's arrays exist, its frozen heads are not written
    "phis",  # one PHI-S file is written, the other is not
    "checkpoint.rename",  # a checkpoint directory is in place, LATEST does not name it yet
    "manifest",  # the manifest's arrays are written, its kind attribute is not
)
_seen: dict[str, int] = {}
if os.environ.get("AMOE_FAULT") and not os.environ.get("AMOE_FAULT_PGID"):
    os.environ["AMOE_FAULT_PGID"] = str(os.getpgrp())


def fault_point(name: str) -> None:
    """SIGKILL this process group here if ``AMOE_FAULT`` names ``name`` (and this is the n-th time)."""
    wanted = os.environ.get("AMOE_FAULT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        command = int(os.environ.get("AMOE_FAULT_PGID") or os.getpgrp())
        if command != os.getpgrp():
            os.killpg(command, signal.SIGKILL)
        os.killpg(os.getpgrp(), signal.SIGKILL)
