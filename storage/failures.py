"""The failure side table: which images could not be used and why (``index [F] int64`` and the reasons).

The reasons are UTF-8 bytes with offsets (``reason`` [B] uint8, ``reason_offsets`` [F+1] int64: zarr v3
core types, ``storage.strings``); tables written before format version 3 hold ``reason`` [F] as strings.

Both the feature store (``images/failures``) and a curation run folder (``pool/failures``) keep one;
bad images are recorded here, never silently dropped. A reason is short and deterministic; its kind
is the part before the first ``:`` ("corrupt: ..." -> "corrupt"), which is what summaries count.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import zarr

from . import layout as L
from .arrays import create_array
from .strings import encode_strings, read_strings

__all__ = ["count_reasons", "read_failure_table", "write_failure_table"]


def write_failure_table(group: zarr.Group, index: Iterable[int], reasons: Iterable[str], *, flat: bool = True
                        ) -> None:
    """(Re)write ``group``'s ``index`` and reasons, one row per failed image, sorted as given; ``flat=False``
    writes the reasons as zarr strings (a store of format version 1 or 2 being repaired; a curation folder)."""
    index = np.asarray(list(index), dtype=np.int64)
    reasons = [str(r) for r in reasons]
    if len(index) != len(reasons):
        raise ValueError(f"{len(index)} failure indices but {len(reasons)} reasons")
    count = len(index)
    idx = create_array(group, L.FAILURE_INDEX, shape=(count,), dtype="int64", chunks=(max(count, 1),))
    if count:
        idx[:] = index
    if not flat:
        why = create_array(group, L.FAILURE_REASON, shape=(count,), dtype=str, chunks=(max(count, 1),))
        if count:
            why[:] = np.asarray(reasons, dtype=str)
        return
    data, sizes = encode_strings(reasons)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    create_array(group, L.FAILURE_REASON_OFFSETS, shape=(count + 1,), dtype="int64", chunks=(count + 1,))[:] = offsets
    why = create_array(group, L.FAILURE_REASON, shape=(len(data),), dtype="uint8", chunks=(max(len(data), 1),))
    if len(data):
        why[:] = data


def read_failure_table(group: zarr.Group | None) -> tuple[np.ndarray, list[str]]:
    """(indices, reasons) of a failure table; empty when the group is absent or empty."""
    if group is None or L.FAILURE_INDEX not in group or group[L.FAILURE_INDEX].shape[0] == 0:
        return np.zeros(0, np.int64), []
    return group[L.FAILURE_INDEX][:], read_strings(group, L.FAILURE_REASON, L.FAILURE_REASON_OFFSETS)


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """How many failures of each kind, sorted by kind."""
    return dict(sorted(Counter(str(r).split(":", 1)[0] for r in reasons).items()))
