"""Named students built on the meta device: total and active parameters against counts done by hand."""

from __future__ import annotations

import torch

from train.config import ModelConfig
from train.model import Student
from train.moe import MoEMLP, upcycle_model


def _counts(preset: str | ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Student(ModelConfig(preset=preset) if isinstance(preset, str) else preset)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEMLP):
            per_expert = sum(p[0].numel() for p in (m.experts.w1, m.experts.b1, m.experts.w2, m.experts.b2) if p is not None)
            inactive += (m.num_experts - m.top_k) * per_expert
    return total, total - inactive


def _amoe_by_hand() -> tuple[int, int]:
    d, heads, hd, depth, E, k, h = 768, 8, 128, 18, 28, 6, 384
    attn = d * 3 * heads * hd + 3 * heads * hd + 2 * hd + heads * hd * d + d  # qkv(+bias), qk RMSNorm, proj(+bias)
    norms = 2 * d  # two RMSNorms (weight only)
    router = d * E  # no bias
    expert = d * 2 * h + h * d  # gated: [gate | up] then down, no biases
    stem = (3 * 16 * 16) * d + d + d + 4 * d + d  # patch embed, CLS, 4 registers, final RMSNorm
    return stem + depth * (attn + norms + router + E * expert), stem + depth * (attn + norms + router + k * expert)


def test_amoe_parameter_counts_by_hand():
    total, active = _amoe_by_hand()
    assert _counts("amoe") == (total, active)
    assert (round(total / 1e9, 2), round(active / 1e9, 2)) == (0.50, 0.15)


def test_m2ot_b_parameter_counts_by_hand():
    d, depth, hidden, E, k = 768, 12, 3072, 8, 2
    attn = d * 3 * d + 3 * d + d * d + d
    norms = 2 * 2 * d  # two LayerNorms with bias
    mlp = d * hidden + hidden + hidden * d + d
    fine = hidden // k  # fine-grained experts: k active experts hold one dense MLP's weights
    expert = d * fine + fine + fine * d + d
    stem = (3 * 16 * 16) * d + d + d + 4 * d + 2 * d
    dense_block = attn + norms + mlp
    moe_block_total = attn + norms + d * E + E * expert
    moe_block_active = attn + norms + d * E + k * expert
    sparse = depth // 2  # every other block (1, 3, ..., 11)
    total = stem + (depth - sparse) * dense_block + sparse * moe_block_total
    active = stem + (depth - sparse) * dense_block + sparse * moe_block_active
    assert _counts("m2ot-b") == (total, active)
    assert round(dense_block / 1e6, 2) == 7.09  # a ViT-B block
    assert (round(total / 1e6), round(active / 1e6)) == (171, 86)  # M²oT Table 4: 170M / 86M


def test_amoe_dense_equals_amoe_without_experts():
    dense_total, dense_active = _counts("amoe-dense")
    assert dense_total == dense_active


def test_upcycled_student_equals_dense_before_any_step():
    import numpy as np
    from train.packing import build_layout

    torch.manual_seed(0)
    kw = dict(patch_size=4, dim=32, depth=4, num_heads=2, registers=2)
    dense = Student(ModelConfig(**kw)).eval()
    # renormalized gates: the k copies' weights sum to 1 (M²oT's own Eq. 5 gates would scale by their mass)
    sparse = Student(ModelConfig(**kw, moe={"layers": "odd", "experts": 4, "top_k": 2, "backend": "loop",
                                            "renormalize": True})).eval()
    upcycle_model(sparse, dense.state_dict())
    grids = [(2, 3), (3, 3)]
    layout = build_layout([grids], 32, 2)
    pixels = torch.rand(15, 48)
    with torch.no_grad():
        a, b = dense(pixels, layout, "dense"), sparse(pixels, layout, "dense")
    torch.testing.assert_close(b.patches, a.patches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.cls, a.cls, rtol=1e-5, atol=1e-5)
    assert len(b.aux) == 2 and not np.isnan(float(b.aux[0]["router_loss"]))
    import pytest
    with pytest.raises(ValueError, match="dense checkpoint"):
        upcycle_model(sparse, {k: v for k, v in dense.state_dict().items() if "blocks.1.mlp.fc1" not in k})


def test_baseline_kinds_run_on_packed_sequences():
    from train.packing import build_layout

    grids = [(2, 3), (3, 3), (1, 4)]
    layout = build_layout([grids[:2], grids[2:]], 24, 2)
    pixels = torch.rand(19, 48)
    for kind in ("topk", "soft", "expert_choice"):
        torch.manual_seed(0)
        model = Student(ModelConfig(patch_size=4, dim=32, depth=2, num_heads=2, registers=2,
                                    moe={"layers": "all", "kind": kind, "experts": 4, "top_k": 2, "backend": "loop"}))
        out = model(pixels, layout, "dense")
        assert out.patches.shape == (19, 32) and torch.isfinite(out.patches).all()
        (out.patches.square().mean() + out.cls.square().mean()).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "mlp" in n and "router" not in n), kind


def _dense_count(d: int, depth: int, heads: int, hd: int, hidden: int, *, rms: bool, qk_norm: bool, registers: int = 4,
                 patch: int = 16) -> int:
    """A dense student counted by hand: stem, blocks (norm, attention, norm, MLP), final norm."""
    norm = d if rms else 2 * d
    attn = d * 3 * heads * hd + 3 * heads * hd + heads * hd * d + d + (2 * hd if qk_norm else 0)
    mlp = d * hidden + hidden + hidden * d + d
    stem = 3 * patch * patch * d + d + d + registers * d + norm
    return stem + depth * (2 * norm + attn + mlp)


def test_every_dense_preset_counted_by_hand():
    assert _counts("tiny") == (_dense_count(64, 2, 2, 32, 256, rms=False, qk_norm=False),) * 2
    assert _counts("demo") == (_dense_count(192, 4, 3, 64, 768, rms=False, qk_norm=False),) * 2
    assert _counts("amoe-dense") == (_dense_count(768, 18, 8, 128, 3072, rms=True, qk_norm=True),) * 2
    assert round(_counts("demo")[0] / 1e6, 2) == 1.93  # the README's figure


def test_upcycling_refuses_a_dense_model_of_another_shape():
    import pytest

    torch.manual_seed(0)
    kw = dict(patch_size=4, dim=32, num_heads=2, registers=2)
    sparse = Student(ModelConfig(**kw, depth=4, moe={"layers": "odd", "experts": 4, "top_k": 2, "backend": "loop"}))
    deeper = Student(ModelConfig(**kw, depth=6))
    with pytest.raises(ValueError, match="unexpected"):  # its blocks 4 and 5 would be silently dropped
        upcycle_model(sparse, deeper.state_dict())


def test_tgr_presets_counted_by_hand():
    """DeiT widths (TGR-MoE Table S1): 12 LayerNorm blocks, MLP 4x, MoE (8 experts with biases, top-2,
    router without bias) on blocks 8, 10 and 12; CLS + 4 registers, patch 16."""
    for name, (d, heads) in {"tgr-ti": (192, 3), "tgr-s": (384, 6), "tgr-b": (768, 12)}.items():
        dense = _dense_count(d, 12, heads, d // heads, 4 * d, rms=False, qk_norm=False)
        mlp = d * 4 * d + 4 * d + 4 * d * d + d
        total = dense + 3 * (d * 8 + 8 * mlp - mlp)  # three dense MLPs become 8 experts and a router
        active = dense + 3 * (d * 8 + 2 * mlp - mlp)
        assert _counts(name) == (total, active), name


def test_the_amoe_run_files_state_the_paper_runs_and_build_the_preset_student():
    """configs/amoe: stage 1 then stage 2 from it, on stores of the same two teachers at 256 and 768 px."""
    from pathlib import Path

    import open_clip
    import timm

    from config import load_config
    from stages.config import CacheConfig, CurateConfig
    from stages.teachers.spec import parse_spec
    from train.config import TrainConfig, with_stores

    root = Path(__file__).parents[2] / "configs" / "amoe"
    stage1, stage2 = (with_stores(load_config(TrainConfig, root / f"stage{k}.toml", {}), None) for k in (1, 2))
    for cfg in (stage1, stage2):
        assert _counts(cfg.model) == _amoe_by_hand()  # built on the meta device
        assert cfg.loss.arkd == 1.0 and cfg.heads.share and cfg.data.max_images_per_seq == 16
        assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("linear", 500)
    assert stage1.run.steps == 50_000 and stage2.run.steps == 90_000
    assert stage2.model.init_from == "runs/amoe-stage1" and stage1.model.init_from is None
    assert [s.url for s in stage2.data.stores] == ["stores/hires-768", "stores/openlvd200m-256"]
    assert stage1.data.stores[0].url == stage2.data.stores[1].url  # stage 2 mixes stage-1 data back in
    assert stage1.data.seq_len >= 256 + 5 and stage2.data.seq_len >= 2304 + 5  # a full-size image fits
    assert stage1.data.seqs_per_batch * (stage1.data.seq_len // (256 + 5)) == 24  # "a per-rank batch size of 24"
    caches = {f.stem: load_config(CacheConfig, f, {}) for f in sorted(root.glob("cache-*.toml"))}
    assert len(caches) == 4
    for name, cache in caches.items():
        spec = parse_spec(cache.teacher)
        known = timm.list_models() if spec.library == "timm" else open_clip.list_models()
        assert spec.model in known, name
        assert cache.max_tokens == (256 if name.endswith("stage1") else 2304), name
    for teacher in ("dinov3", "siglip2"):  # stage 2 may --init-from stage 1: only the image policy differs
        a, b = (caches[f"cache-{teacher}-stage{k}"].model_dump() for k in (1, 2))
        assert {k for k in a if a[k] != b[k]} == {"max_tokens"}
    curate = load_config(CurateConfig, root / "curate.toml", {})
    assert curate.levels == [20_000_000, 500_000, 50_000, 20_000] and curate.target == 200_000_000
