"""A teacher worker's memory is bounded by the unit it holds, not by how many units it runs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from config import load_config
from stages.cache import run_cache
from stages.config import CacheConfig

from cache_helpers import TINY_CNN

UNITS = 40


def _digits(root, count: int) -> None:
    """Real digits, all 128 px (8x8 tokens): every unit has the same shapes, so no allocation is a first."""
    from sklearn.datasets import load_digits

    root.mkdir()
    for i, img in enumerate(load_digits().images[:count]):
        arr = np.clip(img * (255 / 16), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").resize((128, 128), Image.BICUBIC).save(root / f"d{i:04d}.png")


def test_worker_rss_levels_off_over_many_units(tmp_path, ray_local):
    _digits(tmp_path / "images", 4 * UNITS)
    cfg = load_config(CacheConfig, None, {"teacher": TINY_CNN, "random_init": True, "min_tokens": 64,
                                          "max_tokens": 64, "shard_images": 4, "workers": 1, "phis": False})
    report = run_cache(str(tmp_path / "images"), str(tmp_path / "store"), cfg)
    [(worker, memory)] = report.workers.items()
    assert memory.units == UNITS and report.images_computed == 4 * UNITS
    # what one unit holds: its decoded images and the teacher's float32 outputs (1280-d, 64 tokens each)
    assert memory.max_unit_bytes >= 4 * 64 * 1280 * 4
    # a worker that kept its units would grow by ~UNITS x that after its warm-up; a bounded one by allocator noise
    assert memory.growth < 8 * memory.max_unit_bytes, memory.describe()
    assert memory.peak_rss >= memory.last_rss > 0
