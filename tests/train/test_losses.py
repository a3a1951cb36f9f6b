"""Losses (AMoE Eq. 1–6), RoPE, PHI-S target spaces, augmentation and the shuffled stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.phis import PhisTransform
from storage.streaming import epoch_stream, shuffled_order
from train.config import DataConfig, LossConfig
from train.data import augment
from train.losses import distillation_terms
from train.model.rope import GoldenRope, apply_rope
from train.model.targets import FeatureSpace


def _naive_eq_1_to_6(images, cfg: LossConfig) -> float:
    """float64 loops over images: mean over images of (summary + mean-over-tokens patches + mean registers)."""
    def d(p, t, wc, ws):
        p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
        cos = p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
        diff = np.abs(p - t)
        sl1 = np.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
        return wc * (1 - cos) + ws * sl1
    total = 0.0
    for im in images:
        s = d(im["ps"], im["ts"], cfg.summary_cos, cfg.summary_smooth_l1)
        p = np.mean([d(a, b, cfg.patches_cos, cfg.patches_smooth_l1) for a, b in zip(im["pp"], im["tp"])])
        r = np.mean([d(a, b, cfg.registers_cos, cfg.registers_smooth_l1) for a, b in zip(im["pr"], im["tr"])])
        total += s + p + r
    return total / len(images)


def _images(sizes, seed=0, dim=6):
    rng = np.random.default_rng(seed)
    return [{"ps": rng.normal(size=dim), "ts": rng.normal(size=dim), "pp": rng.normal(size=(n, dim)),
             "tp": rng.normal(size=(n, dim)), "pr": rng.normal(size=(2, dim)), "tr": rng.normal(size=(2, dim))}
            for n in sizes]


def _terms(images, global_images, cfg):
    t = lambda k: torch.tensor(np.stack([im[k] for im in images]), dtype=torch.float32)  # noqa: E731
    cat = lambda k: torch.tensor(np.concatenate([im[k] for im in images]), dtype=torch.float32)  # noqa: E731
    image = torch.tensor(np.concatenate([[i] * len(im["pp"]) for i, im in enumerate(images)]))
    preds = {"x": {"summary": t("ps"), "patches": cat("pp"), "registers": t("pr")}}
    targets = {"x": {"summary": t("ts"), "patches": cat("tp"), "registers": t("tr")}}
    return distillation_terms(preds, targets, image, len(images), global_images, cfg)


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(summary_smooth_l1=0.5, patches_cos=0.3, registers_cos=0.0)])
def test_per_image_normalized_loss_matches_float64_reference_and_ignores_packing(cfg):
    images = _images([1, 3, 50, 7, 200])
    ref = _naive_eq_1_to_6(images, cfg)
    whole = sum(float(v) for v in _terms(images, 5, cfg).values())
    assert whole == pytest.approx(ref, rel=1e-5)
    # the same global batch split into microbatches / ranks in any grouping sums to the same loss
    for groups in ([[0, 1], [2, 3, 4]], [[4], [0, 2], [1, 3]], [[3], [2], [1], [0], [4]]):
        split = sum(float(v) for g in groups for v in _terms([images[i] for i in g], 5, cfg).values())
        assert split == pytest.approx(ref, rel=1e-5)


def test_every_image_weighs_the_same_whatever_its_resolution():
    """Two images with the same per-token error weigh the same although one has 100x more tokens."""
    cfg = LossConfig(summary_cos=0, patches_cos=0, registers_cos=0, registers_smooth_l1=0)
    dim = 4
    small_p, small_t = torch.ones(2, dim), torch.zeros(2, dim)
    big_p, big_t = torch.ones(200, dim), torch.zeros(200, dim)
    image = torch.tensor([0] * 2 + [1] * 200)
    zeros = torch.zeros(2, dim)
    preds = {"x": {"summary": zeros, "patches": torch.cat([small_p, big_p])}}
    targets = {"x": {"summary": zeros, "patches": torch.cat([small_t, big_t])}}
    per_image_sl1 = 0.5 * cfg.patches_smooth_l1  # |1 - 0| < beta: 0.5 x^2
    total = float(distillation_terms(preds, targets, image, 2, 2, cfg)["x/patches"])
    assert total == pytest.approx(per_image_sl1, rel=1e-6)  # mean of two equal per-image losses
    with pytest.raises(ValueError):
        distillation_terms(preds, targets, image, 2, 0, cfg)


def test_rope_depends_only_on_relative_position_and_keeps_norms():
    rope = GoldenRope(16, base=100.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 2, 16, generator=g), torch.randn(1, 1, 2, 16, generator=g)
    def score(cq, ck):
        coords = torch.tensor([[cq, ck]], dtype=torch.float32)  # [1, 2 tokens, 2]
        cos, sin = rope(coords)
        rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return float(rq[0, 0, 0] @ rk[0, 0, 1]), rq
    base, rq = score((0.1, -0.3), (0.5, 0.2))
    shifted, _ = score((0.1 + 0.37, -0.3 - 0.2), (0.5 + 0.37, 0.2 - 0.2))
    assert base == pytest.approx(shifted, rel=1e-4, abs=1e-5)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    cos, sin = rope(torch.zeros(1, 3, 2))  # CLS, registers: no rotation
    assert torch.equal(apply_rope(q, cos[:, :2], sin[:, :2]), q)


def test_feature_space_matches_numpy_phis_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 3
    phis = PhisTransform.from_moments(x.mean(0), np.cov(x, rowvar=False), len(x))
    space = FeatureSpace(phis, 12)
    xt = torch.tensor(x, dtype=torch.float32)
    np.testing.assert_allclose(space.normalize(xt).numpy(), phis.apply(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(space.denormalize(space.normalize(xt)), xt, rtol=1e-4, atol=1e-3)
    ident = FeatureSpace(None, 12)
    assert torch.equal(ident.normalize(xt), xt)


def test_flip_and_crop_move_pixels_and_targets_together():
    """Each patch's pixels encode its grid index; after augmentation pixels and target rows must agree."""
    p, gh, gw = 4, 5, 7
    index = np.arange(gh * gw).reshape(gh, gw)
    pixels = np.repeat(np.repeat(index, p, 0), p, 1)[..., None].repeat(3, 2).astype(np.uint8)
    targets = {"t": np.stack([np.arange(gh * gw), -np.arange(gh * gw)], 1).astype(np.float32)}
    cfg = DataConfig(flip=True, crop=True, crop_min_scale=0.3)
    seen_flip = seen_crop = False
    for seed in range(20):
        img, tg, (h, w) = augment(pixels, targets, (gh, gw), p, cfg, np.random.default_rng(seed))
        assert img.shape == (h * p, w * p, 3) and tg["t"].shape == (h * w, 2)
        per_patch = img[::p, ::p, 0].reshape(-1)
        assert np.array_equal(per_patch, tg["t"][:, 0].astype(np.uint8))
        assert np.array_equal(tg["t"][:, 1], -tg["t"][:, 0])
        rows = per_patch.reshape(h, w)
        seen_flip |= bool(w > 1 and rows[0, 0] > rows[0, 1])
        seen_crop |= (h, w) != (gh, gw)
    assert seen_flip and seen_crop
    same, _, grid = augment(pixels, targets, (gh, gw), p, DataConfig(), np.random.default_rng(0))
    assert np.array_equal(same, pixels) and grid == (gh, gw)


def test_shuffled_order_is_a_seeded_permutation_in_bounded_windows():
    a = list(shuffled_order(1000, 64, seed=3, epoch=0, buffer=32))
    assert sorted(a) == list(range(1000))
    assert a == list(shuffled_order(1000, 64, seed=3, epoch=0, buffer=32))
    assert a != list(shuffled_order(1000, 64, seed=3, epoch=1, buffer=32))
    assert a != list(range(1000))
    # shard-level locality: the first 64 rows come from at most 2 units + the buffer's mixing
    assert len({r // 64 for r in a[:32]}) <= 2
    valid = np.ones(10, bool)
    valid[[2, 5]] = False
    stream = epoch_stream(lambda u: np.where(valid[4 * u:4 * u + 4], 10 * u, -1), 10, 4, seed=0, buffer=3)
    first = [next(stream) for _ in range(16)]
    assert sorted(r for e, r, _ in first if e == 0) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert {e for e, _, _ in first} == {0, 1}
    assert all(v == 10 * (r // 4) for _, r, v in first)  # each row carries its unit's value
    with pytest.raises(ValueError, match="no usable image"):
        next(epoch_stream(lambda u: np.full(2, -1), 3, 2, seed=0, buffer=2))


def test_router_losses_are_summed_over_moe_layers(train_store):
    """TGR-MoE Eq. S1: λ_load Σ_i L_load^(i). A mean over layers would divide by their number (here 3)."""
    from storage.store import FeatureStore
    from train.config import TrainConfig
    from train.data import PlanStream, StoreBatches
    from train.model import build_model
    from train.trainer import compute_terms

    cfg = TrainConfig.model_validate({
        "model": {"preset": "tiny", "depth": 3, "moe": {"layers": "all", "experts": 4, "top_k": 2, "backend": "loop",
                                                        "z_loss_weight": 1e-3}},
        "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0}, "loss": {"router": 0.5}})
    store = FeatureStore.open(train_store)
    torch.manual_seed(0)
    model = build_model(cfg, store, store.teacher_names)
    ds = StoreBatches(train_store, store.teacher_names, cfg.data, patch=16, registers=4, seed=0)
    plan = next(PlanStream(ds.reader.indexes, cfg.data, registers=4, seed=0).steps())
    batch = ds[plan]
    terms, out = compute_terms(model, batch, cfg)
    per_layer = [0.01 * float(a["load_balance_loss"]) + 1e-3 * float(a["z_loss"]) for a in out.aux]
    share = batch["layout"].num_images / batch["global_images"]
    assert len(per_layer) == 3
    assert float(terms["router"]) == pytest.approx(0.5 * sum(per_layer) * share, rel=1e-6)


def test_rope_patch_coordinates_ablation_counts_patches_from_the_centre():
    """``rope_coords = "patches"``: a token's position is its offset from the image centre in patches over
    rope_ref_grid / 2 (a naive loop here), so the same patch offset gets the same angle at every size."""
    from train.config import ModelConfig
    from train.model.vit import Student
    from train.packing import build_layout

    layout = build_layout([[(2, 3), (4, 4)], [(1, 1)]], seq_len=40, registers=1)
    student = Student(ModelConfig(preset="tiny", registers=1, rope_coords="patches", rope_ref_grid=8))
    got = student.rope_coords(layout)
    want = torch.zeros_like(layout.coords)
    k = 0
    for gh, gw in layout.grids.tolist():
        for y in range(gh):
            for x in range(gw):
                want[layout.patch_pos[k]] = torch.tensor([(y + 0.5 - gh / 2) / 4, (x + 0.5 - gw / 2) / 4])
                k += 1
    torch.testing.assert_close(got, want)
    normal = Student(ModelConfig(preset="tiny", registers=1))
    assert torch.equal(normal.rope_coords(layout), layout.coords)


def test_a_loaded_feature_space_applies_its_loaded_statistics_and_identity_is_exact():
    """A run started from another (or evaluated on a store without PHI-S files) normalizes with the
    checkpoint's statistics, not with the identity its own store would give."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(50, 8)) * 3 + 1, dtype=torch.float32)
    xd = x.numpy().astype(np.float64)
    phis = FeatureSpace(PhisTransform.from_moments(xd.mean(0), np.cov(xd, rowvar=False), len(xd)), 8)
    plain = FeatureSpace(None, 8)
    assert torch.equal(plain.normalize(x), x) and torch.equal(plain.denormalize(x), x)
    plain.load_state_dict(phis.state_dict())
    torch.testing.assert_close(plain.normalize(x), phis.normalize(x))
    assert not torch.allclose(plain.normalize(x), x)
