"""Teacher heads: the frozen SigLIP2 pool rebuilt from the store equals the teacher's own pool, per image."""

from __future__ import annotations

import numpy as np
import torch

from storage.store import FeatureStore
from train.model.targets import load_teacher_targets


def test_frozen_pool_from_store_pools_each_image_like_timm(train_store):
    targets = load_teacher_targets(FeatureStore.open(train_store), "siglip")
    pool = targets.pool
    assert pool is not None and not any(p.requires_grad for p in pool.parameters())
    g = torch.Generator().manual_seed(0)
    sizes = [3, 10, 1, 6]
    patches = torch.randn(sum(sizes), pool.pool.kv.in_features, generator=g)
    image = torch.tensor(np.repeat(np.arange(4), sizes))
    with torch.no_grad():
        batched = pool(patches, image, 4)
        offset = 0
        for i, n in enumerate(sizes):
            alone = pool.head(pool.fc_norm(pool.pool(patches[offset:offset + n][None])))  # timm's own forward
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
            offset += n


def test_pool_reproduces_cached_teacher_summary(train_store):
    """Fed the teacher's own cached patches, the rebuilt pool gives the cached summary (float16 store)."""
    from storage.reader import StoreReader

    targets = load_teacher_targets(FeatureStore.open(train_store), "siglip")
    reader = StoreReader(train_store, ["siglip"])
    row = int(reader.valid_indices()[0])
    item = reader.read(row)
    patches = torch.from_numpy(item.patches["siglip"].astype(np.float32))
    with torch.no_grad():
        summary = targets.pool(patches, torch.zeros(len(patches), dtype=torch.long), 1)[0]
    cached = torch.from_numpy(item.summary["siglip"].astype(np.float32))
    cos = torch.nn.functional.cosine_similarity(summary, cached, dim=0)
    # the store's patches were resampled to the student grid, so the pool sees other tokens than the teacher did
    assert cos > 0.9, float(cos)
