"""Paths and URLs: what zarr and the writers are handed."""

from __future__ import annotations

import zarr

from storage.fsutil import is_local, join, local_or_url


def test_a_file_url_becomes_its_path_and_other_urls_stay(tmp_path):
    assert local_or_url(f"file://{tmp_path}/run/") == f"{tmp_path}/run"
    assert local_or_url("s3://bucket/run/") == "s3://bucket/run" and local_or_url("runs/a") == "runs/a"
    assert is_local(f"file://{tmp_path}") and is_local("runs/a") and not is_local("s3://bucket/run")
    assert join("s3://bucket/run/", "clusters", "/level1") == "s3://bucket/run/clusters/level1"
    # the path form is one zarr opens where the file:// URL was meant
    group = zarr.open_group(local_or_url(f"file://{tmp_path}/g"), mode="w")
    group.create_array("a", shape=(2,), dtype="int8")
    assert (tmp_path / "g" / "a" / "zarr.json").exists()
