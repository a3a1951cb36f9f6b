"""Another Zarr v3 implementation reads a store: tensorstore (Google's, written in C++) against zarr-python."""

from __future__ import annotations

import numpy as np
import zarr


def tensorstore_read(store_url: str, path: str) -> np.ndarray:
    """Array ``path`` of the store at ``store_url`` (a local folder), read by tensorstore's zarr3 driver."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store_url.rstrip('/')}/{path}/"}}
    return ts.open(spec, read=True, open=True).result().read().result()


def assert_every_array_reads_alike(store_url: str) -> list[str]:
    """Every array of the store, opened by tensorstore, equals zarr-python's read (dtype, shape, values).
    Returns the arrays' paths."""
    group = zarr.open_group(store_url, mode="r")
    paths = [name for name, member in group.members(max_depth=None) if isinstance(member, zarr.Array)]
    assert paths, f"{store_url} has no arrays"
    for path in paths:
        expected = np.asarray(group[path][...])
        try:
            got = tensorstore_read(store_url, path)
        except Exception as exc:  # an array another implementation cannot open breaks the contract
            raise AssertionError(f"tensorstore cannot read {path} ({group[path].dtype}): {exc}") from exc
        assert got.dtype == expected.dtype and got.shape == expected.shape, (path, got.dtype, expected.dtype)
        np.testing.assert_array_equal(got, expected, err_msg=path)
    return paths
