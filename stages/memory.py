"""What a unit's worker reports of its memory, and the driver's per-worker summary of it.

A worker holds one unit in flight (its decoded images and the teacher's outputs) and, on CUDA, one
being written and the next one's decoded images (decoded during this unit's forward; not in the
unit bytes reported). Its resident memory should therefore level off after the first units and stay there
however many units it runs: the summary keeps, per worker, its RSS after every unit and the peak,
next to the bytes of the largest unit it held; growth is counted from the end of a short warm-up
(allocator pools and caches fill during the first units), so a leak shows as growth. Linux
(``/proc``; ``ru_maxrss`` in KiB).
"""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass, field

__all__ = ["WARMUP_UNITS", "WorkerMemory", "memory_sample"]

WARMUP_UNITS = 4


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak, the best the standard library offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_bytes()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_sample(unit_bytes: int) -> dict:
    """Fields a unit's result carries: which worker, its RSS now and at peak, the unit's bytes in flight."""
    return {"worker": f"{platform.node()}:{os.getpid()}", "rss": _rss_bytes(), "peak_rss": _peak_bytes(),
            "unit_bytes": int(unit_bytes)}


@dataclass
class WorkerMemory:
    """One worker's memory over the units it ran, in the order it ran them."""

    rss: list[int] = field(default_factory=list)  # after each unit (8 B a unit: bounded by the job's units)
    peak_rss: int = 0
    max_unit_bytes: int = 0

    def add(self, sample: dict) -> None:
        self.rss.append(int(sample["rss"]))
        self.peak_rss = max(self.peak_rss, sample["peak_rss"])
        self.max_unit_bytes = max(self.max_unit_bytes, sample["unit_bytes"])

    @property
    def units(self) -> int:
        return len(self.rss)

    @property
    def first_rss(self) -> int:
        return self.rss[0] if self.rss else 0

    @property
    def last_rss(self) -> int:
        return self.rss[-1] if self.rss else 0

    @property
    def settled_rss(self) -> int:
        """RSS after the warm-up units (or the last unit of a shorter job)."""
        return self.rss[min(WARMUP_UNITS, len(self.rss)) - 1] if self.rss else 0

    @property
    def growth(self) -> int:
        """RSS after the last unit minus after the warm-up: about zero when memory is bounded by the unit."""
        return self.last_rss - self.settled_rss

    def describe(self) -> str:
        mb = 1e6
        return (f"{self.units} units: RSS {self.first_rss / mb:.0f} MB after the first, {self.settled_rss / mb:.0f} "
                f"MB after {min(WARMUP_UNITS, self.units)}, {self.last_rss / mb:.0f} MB after the last ("
                f"{self.growth / mb:+.0f} MB), peak {self.peak_rss / mb:.0f} MB; largest unit "
                f"{self.max_unit_bytes / mb:.1f} MB")
