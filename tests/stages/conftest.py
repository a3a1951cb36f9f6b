"""Fixtures for the stage tests: a small real image folder and one Ray cluster per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_helpers import write_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("images")
    bad = write_image_folder(root)
    return root, bad


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray cluster for every in-process cache test (starting one costs seconds)."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
