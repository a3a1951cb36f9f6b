"""Session fixtures shared by every test folder. ``train_store``: a small real store for the trainer, eval and
store-format tests: photos at mixed resolutions plus labelled digits, cached
with a tiny DINOv3-architecture ViT (CLS + 4 registers) and a tiny SigLIP2 (attention-pool summary)."""

from __future__ import annotations

import os

# Before anything imports Ray (it reads this once, at import): every Ray node the tests start, and every
# command they run, addresses this machine as 127.0.0.1 rather than by its network interface.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path

import pytest

from cli_helpers import shared_ray
from train_helpers import DIGITS, TINY_SIGLIP, TINY_VIT, write_train_images


def cache_config(teacher: str, name: str, labels: Path):
    from stages.config import CacheConfig

    return CacheConfig(teacher=teacher, name=name, random_init=True, seed=0, min_tokens=4, max_tokens=48,
                       labels=str(labels), shard_images=16, shard_rows=256, chunk_rows=64, batch_size=16,
                       workers=1, num_cpus=2)


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> str:
    """Store URL with teachers "dino" (registers, layers 1 and 2 cached) and "siglip" (frozen attention pool in heads/,
    class embeddings of the ten digits in text/classes)."""
    from stages.cache import run_cache
    from stages.ray_cluster import ray_cluster

    root = tmp_path_factory.mktemp("train_store")
    labels = write_train_images(root / "images")
    url = str(root / "store")
    shared_ray()
    with ray_cluster(num_cpus=2):
        # with its two blocks cached as layers/1, layers/2 (routing analysis; the patches are unchanged by them)
        run_cache(str(root / "images"), url, cache_config(TINY_VIT, "dino", labels).model_copy(update={"layers": [1, 2]}))
        # with its text tower's class embeddings of the ten digits (zero-shot evaluation)
        run_cache(str(root / "images"), url, cache_config(TINY_SIGLIP, "siglip", labels).model_copy(
            update={"text_classes": str(write_digit_classes(root))}))
    return url



def write_digit_classes(root: Path) -> Path:
    """Class names of the digits' labels, one per line (line i names label i)."""
    path = root / "digit_classes.txt"
    path.write_text("".join(f"the digit {d}\n" for d in DIGITS))
    return path


@pytest.fixture(scope="session")
def stage2_store(train_store, tmp_path_factory) -> str:
    """The images of ``train_store`` cached again at a larger size (AMoE stage 2) with the same "dino" teacher:
    same fingerprint but for the image policy (min 16, max 96 tokens instead of 4 and 48)."""
    from stages.cache import run_cache
    from stages.ray_cluster import ray_cluster

    root = Path(train_store).parent
    url = str(tmp_path_factory.mktemp("stage2_store") / "store")
    cfg = cache_config(TINY_VIT, "dino", root / "labels.csv").model_copy(update={"min_tokens": 16, "max_tokens": 96})
    shared_ray()
    with ray_cluster(num_cpus=2):
        run_cache(str(root / "images"), url, cfg)
    return url
