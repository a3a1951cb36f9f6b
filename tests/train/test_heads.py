"""Teacher heads: the frozen SigLIP2 pool rebuilt from the store equals the teacher's own pool, per image."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_a_shared_head_compares_each_feature_in_its_own_space_float64():
    """One head per teacher for summary, patches and registers (AMoE §3.1): the loss equals a float64
    reference (from the head's own float32 outputs) in which the head's output lives in the patches' PHI-S space and is moved into the
    summary's PHI-S space (summary) or back to raw features (registers) before comparing."""
    from storage.phis import PhisTransform
    from train.config import HeadConfig, LossConfig, ModelConfig
    from train.losses import distillation_terms
    from train.model.distill import DistillModel
    from train.model.heads import TeacherDims
    from train.model.targets import FeatureSpace, TeacherTargets
    from train.packing import build_layout

    rng = np.random.default_rng(0)
    dim, regs = 8, 2

    def phis(shift):  # two different PHI-S transforms for summary and patches
        x = rng.normal(size=(500, dim)) * rng.uniform(0.2, 3, dim) + shift
        return PhisTransform.from_moments(x.mean(0), np.cov(x, rowvar=False, bias=True), len(x))

    p_sum, p_patch = phis(5.0), phis(-2.0)
    spaces = {"summary": FeatureSpace(p_sum, dim), "patches": FeatureSpace(p_patch, dim)}
    teacher = TeacherTargets(TeacherDims("t", dim, dim, regs, dim), spaces, None, "")
    torch.manual_seed(0)
    model = DistillModel(ModelConfig(patch_size=4, dim=16, depth=1, num_heads=2, registers=regs),
                         HeadConfig(share=True), [teacher])
    grids = [(2, 3), (1, 2)]
    layout = build_layout([grids], 16, regs)
    pixels = torch.rand(8, 48)
    raw_targets = {"summary": torch.from_numpy(rng.normal(size=(2, dim)) + 5).float(),
                   "patches": torch.from_numpy(rng.normal(size=(8, dim)) - 2).float(),
                   "registers": torch.from_numpy(rng.normal(size=(2, regs, dim))).float()}
    cfg = LossConfig(summary_smooth_l1=0.3)
    with torch.no_grad():
        preds, out = model(pixels, layout, "dense")
        targets = {"t": {"summary": spaces["summary"].normalize(raw_targets["summary"]),
                         "patches": spaces["patches"].normalize(raw_targets["patches"]),
                         "registers": raw_targets["registers"]}}
        terms = distillation_terms(preds, targets, layout.patch_image, 2, 2, cfg)
        head = model.heads["t"].patches
        h_cls, h_patch, h_reg = (head(v).double().numpy() for v in (out.cls, out.patches, out.registers))

    def to_raw(h):  # inverse of the patches' PHI-S
        return h @ p_patch.unwhiten.T + p_patch.mean

    def d(a, b, wc, ws):
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        diff = np.abs(a - b)
        return wc * (1 - cos) + ws * np.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean(-1)

    summary = d(p_sum.apply(to_raw(h_cls)), p_sum.apply(raw_targets["summary"].double().numpy()), cfg.summary_cos,
                cfg.summary_smooth_l1).sum() / 2
    per_token = d(h_patch, p_patch.apply(raw_targets["patches"].double().numpy()), cfg.patches_cos,
                  cfg.patches_smooth_l1)
    patches = (per_token[:6].mean() + per_token[6:].mean()) / 2
    registers = d(to_raw(h_reg), raw_targets["registers"].double().numpy(), cfg.registers_cos,
                  cfg.registers_smooth_l1).mean(-1).sum() / 2
    assert float(terms["t/summary"]) == pytest.approx(summary, rel=1e-5)
    assert float(terms["t/patches"]) == pytest.approx(patches, rel=1e-5)
    assert float(terms["t/registers"]) == pytest.approx(registers, rel=1e-5)
