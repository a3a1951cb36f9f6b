"""Fixtures for the stage tests: a small real image folder and one Ray cluster per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_helpers import write_image_folder
from cli_helpers import shared_ray


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("images")
    bad = write_image_folder(root)
    return root, bad


@pytest.fixture(scope="session")
def ray_local():
    """The tests' one embedded Ray cluster (starting one costs seconds), shared with the in-process CLI runs."""
    shared_ray()
