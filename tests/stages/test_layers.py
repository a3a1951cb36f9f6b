"""Intermediate teacher layers in the store (``teachers/<name>/layers/<k>``): equal to the library's own block
outputs on the stored pixels, added to a cached teacher without touching its other arrays, resumable after
a crash between a unit's data and its marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_pipeline
from stages.cache import run_cache
from stages.config import CacheConfig
from stages.teachers import build_teacher
from storage import layout as L
from storage.image_policy import ImagePolicy
from storage.store import FeatureStore

from cache_helpers import TINY_CNN, TINY_VIT, write_image_folder

SMALL = {"min_tokens": 16, "max_tokens": 64, "shard_images": 2, "shard_rows": 32, "chunk_rows": 16, "batch_size": 4,
         "num_cpus": 2, "pixel_shard_bytes": 16384, "pixel_chunk_bytes": 4096}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layer_images")
    write_image_folder(root, bad=False)
    return root


def _cfg(teacher: str, name: str, layers=(), random_init=True) -> CacheConfig:
    return CacheConfig(teacher=teacher, name=name, random_init=random_init, layers=list(layers), **SMALL)


def _hooked_blocks(teacher, layers) -> dict[int, torch.nn.Module]:
    """The modules whose outputs ``layers/<k>`` must equal: a ViT's block k, a CNN's feature stage k."""
    if teacher.is_vit:
        return {k: teacher.model.blocks[k - 1] for k in layers}
    return {k: teacher.model.get_submodule(teacher.model.feature_info[k - 1]["module"]) for k in layers}


def _reference(teacher, pixels: np.ndarray, layers) -> dict[int, np.ndarray]:
    """Block outputs captured by forward hooks during the teacher's plain forward (no forward_intermediates),
    prefix tokens dropped, put on the student grid by the library's own resampling."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, out.detach().float()))
             for k, m in _hooked_blocks(teacher, layers).items()]
    grid = (pixels.shape[0] // 16, pixels.shape[1] // 16)
    try:
        with torch.inference_mode():
            teacher.forward(torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(), grid)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for k, value in seen.items():
        if teacher.is_vit:  # [1, prefix + h*w, D]
            out[k] = value[0, teacher.model.num_prefix_tokens:].numpy()
        else:  # [1, C, h, w]
            if tuple(value.shape[-2:]) != grid:
                value = F.interpolate(value, size=grid, mode="bilinear", align_corners=False, antialias=True)
            out[k] = value[0].permute(1, 2, 0).reshape(-1, value.shape[1]).numpy()
    return out


def _check_layers(store_url: str, name: str, spec: str, layers, random_init=True) -> None:
    store = FeatureStore.open(store_url)
    g = store.teacher_group(name)
    assert g.attrs["layers"] == sorted(layers)
    teacher = build_teacher(spec, random_init=random_init, seed=0)
    offsets, pixel_offsets, ok = g[L.OFFSETS][:], store.image_array(L.PIXEL_OFFSETS)[:], store.image_array(L.OK)[:]
    checked = 0
    for i in np.flatnonzero(ok):
        pixels = ImagePolicy.decode(store.image_array(L.PIXELS)[pixel_offsets[i]: pixel_offsets[i + 1]])
        ref = _reference(teacher, pixels, layers)
        for k in layers:
            stored = g[L.layer_path(k)][offsets[i]: offsets[i + 1]].astype(np.float32)
            assert stored.shape == ref[k].shape, (k, stored.shape, ref[k].shape)
            np.testing.assert_allclose(stored, ref[k], rtol=2e-3, atol=2e-3 * max(1.0, float(np.abs(ref[k]).max())))
        checked += 1
    assert checked >= 5


def test_vit_and_cnn_layers_equal_the_library_block_outputs_and_patches_stay_exact(images, tmp_path, ray_local):
    url = str(tmp_path / "store")
    run_cache(str(images), url, _cfg(TINY_VIT, "vit", layers=[2, 1]))
    _check_layers(url, "vit", TINY_VIT, [1, 2])
    # the same forward gives summary and patches: they equal a store cached without layers
    plain = str(tmp_path / "plain")
    run_cache(str(images), plain, _cfg(TINY_VIT, "vit"))
    for feature in (L.SUMMARY, L.PATCHES, L.REGISTERS):
        np.testing.assert_array_equal(FeatureStore.open(url).teacher_group("vit")[feature][:],
                                      FeatureStore.open(plain).teacher_group("vit")[feature][:], err_msg=feature)
    # a real CNN: feature stages of strides 8 and 32 on the student grid (real ImageNet weights)
    # (with its ImageNet classifier as class embeddings: zero-shot evaluation reads them from the store)
    run_cache(str(images), url, _cfg(TINY_CNN, "cnn", layers=[3, 5], random_init=False).model_copy(
        update={"classifier": True}))
    _check_layers(url, "cnn", TINY_CNN, [3, 5], random_init=False)
    attrs = FeatureStore.open(url).teacher_attrs("cnn")
    assert attrs["layer_dims"] == {"3": 40, "5": 320} and "feature stage" in attrs["layer_rule"]
    _check_classifier_zeroshot(url, "cnn")


def _check_classifier_zeroshot(url: str, name: str) -> None:
    """Zero-shot through the cached classifier set on the cached (float16) summary = the library's own logits
    of the model on the stored pixels (the real EfficientNet-Lite0 and its ImageNet head)."""
    from eval.zeroshot import class_scores
    from stages.teachers.base import resize_pixels

    store = FeatureStore.open(url)
    (emb, attrs), = store.text_sets(name).values()
    teacher = build_teacher(TINY_CNN)
    torch.testing.assert_close(torch.from_numpy(emb), teacher.model.get_classifier().weight.float())
    assert attrs["kind"] == "classifier" and len(attrs["classes"]) == 1000 and attrs["classes"][285] == "Egyptian cat"
    g, ok = store.teacher_group(name), store.image_array(L.OK)[:]
    pixel_offsets, grid = store.image_array(L.PIXEL_OFFSETS)[:], store.image_array(L.GRID)[:]
    for i in np.flatnonzero(ok):
        pixels = ImagePolicy.decode(store.image_array(L.PIXELS)[pixel_offsets[i]: pixel_offsets[i + 1]])
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
        x = resize_pixels(x, teacher.input_size(tuple(grid[i])), teacher.mean, teacher.std)
        with torch.no_grad():
            logits = teacher.model(x)[0].double().numpy()
        ours = class_scores(g[L.SUMMARY][i: i + 1].astype(np.float32), emb, attrs)[0]
        np.testing.assert_allclose(ours, logits, atol=2e-2 * max(1.0, np.abs(logits).max()) / 10)
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 0.05:  # clear winners: the same prediction (float16 summaries may swap near-ties)
            assert ours.argmax() == logits.argmax()


def test_adding_layers_to_a_cached_teacher_touches_nothing_else_and_survives_a_crash(images, tmp_path, ray_local):
    url = tmp_path / "store"
    run_cache(str(images), str(url), _cfg(TINY_VIT, "vit"))
    before = FeatureStore.open(str(url)).teacher_attrs("vit")
    group_meta = url / "teachers" / "vit" / "zarr.json"  # its attributes gain the layer entries
    files = {p: p.stat().st_mtime_ns for p in (url / "teachers" / "vit").rglob("*") if p.is_file() and p != group_meta}
    settings = ["--random-init", *sum((["--set", f"{k}={v}"] for k, v in SMALL.items()), [])]
    args = ("cache-teachers", images, "--store", url, "--teacher", TINY_VIT, "--name", "vit", "--layers", "2", *settings)
    crashed = run_pipeline(*args, env={"AMOE_FAULT": "commit.before@2"}, new_session=True)
    assert crashed.returncode != 0
    partial = FeatureStore.open(str(url))
    assert partial.teacher_attrs("vit")["layers"] == [] and partial.teacher_attrs("vit")["complete"]
    assert len(partial.layer_commits("vit", 2).committed()) == 1  # one unit written before the crash
    run_cache(str(images), str(url), _cfg(TINY_VIT, "vit", layers=[2]))  # the rerun (in-process: same code)
    after = FeatureStore.open(str(url)).teacher_attrs("vit")
    assert after["layers"] == [2] and after["layer_dims"] == {"2": 48}
    layer_keys = {"layers", "layer_dims", "layer_rule", "codec_fidelity"}
    assert {k: v for k, v in after.items() if k not in layer_keys} == {k: v for k, v in before.items() if k not in layer_keys}
    # the codec's measurements gain the layer's entry; the teacher's own ones are untouched
    assert set(after["codec_fidelity"]) == set(before["codec_fidelity"]) | {"layers/2"}
    assert {k: after["codec_fidelity"][k] for k in before["codec_fidelity"]} == before["codec_fidelity"]
    assert {p: p.stat().st_mtime_ns for p in files} == files, "adding a layer rewrote the teacher's other files"
    _check_layers(str(url), "vit", TINY_VIT, [2])
    with pytest.raises(ValueError, match=r"has layers 1\.\.2"):  # refused before any work
        run_cache(str(images), str(url), _cfg(TINY_VIT, "vit", layers=[3]))


def test_the_reader_returns_cached_layers_with_each_image_and_names_missing_ones(images, tmp_path, ray_local):
    from storage.reader import StoreReader, read_batch
    from storage.store import StoreError

    url = str(tmp_path / "store")
    run_cache(str(images), url, _cfg(TINY_VIT, "vit", layers=[1]))
    reader = StoreReader(url, ["vit"], layers={"vit": [1]})
    g = FeatureStore.open(url).teacher_group("vit")
    offsets = g[L.OFFSETS][:]
    rows = [int(i) for i in np.flatnonzero(reader.ok)[[3, 0, 5]]]
    for item in read_batch(reader, rows):
        i = item.index
        np.testing.assert_array_equal(item.layers["vit"][1], g[L.layer_path(1)][offsets[i]: offsets[i + 1]])
        assert item.layers["vit"][1].shape[0] == item.patches["vit"].shape[0]
    with pytest.raises(StoreError, match="--layers 2"):
        StoreReader(url, ["vit"], layers={"vit": [2]})


def test_verify_finds_a_damaged_layer_uncommits_only_it_and_cache_teachers_rewrites_it(images, tmp_path, ray_local):
    from storage.reader import StoreReader
    from storage.store import StoreError
    from storage.verify import verify_store

    url = tmp_path / "store"
    run_cache(str(images), str(url), _cfg(TINY_VIT, "vit", layers=[1, 2]))
    g = FeatureStore.open(str(url)).teacher_group("vit")
    before = {k: g[L.layer_path(k)][:] for k in (1, 2)}
    shard = sorted((url / "teachers" / "vit" / "layers" / "1" / "c").rglob("*"))
    [p for p in shard if p.is_file()][1].unlink()  # the second shard object of layers/1
    report = verify_store(str(url), repair=True)
    assert {d.part for d in report.damaged} == {"teacher vit layer 1"} and len(report.damaged) == 1
    assert "missing chunk object(s) [1] of vit/layers/1" in report.damaged[0].reason
    attrs = FeatureStore.open(str(url)).teacher_attrs("vit")
    assert attrs["layers"] == [2] and attrs["complete"]  # the teacher's own arrays and layer 2 are intact
    store = FeatureStore.open(str(url))
    assert store.layer_commits("vit", 1).committed() == set(range(store.plan().num_units)) - {report.damaged[0].unit}
    assert len(store.layer_commits("vit", 2).committed()) == store.plan().num_units
    with pytest.raises(StoreError, match="--layers 1"):
        StoreReader(str(url), ["vit"], layers={"vit": [1]})
    StoreReader(str(url), ["vit"], layers={"vit": [2]})
    # a layer still being cached (not yet complete) is checked and repaired the same way
    FeatureStore.open(str(url), mode="r+").teacher_group("vit").attrs.update({"layers": []})
    shard = sorted(p for p in (url / "teachers" / "vit" / "layers" / "2" / "c").rglob("*") if p.is_file())
    shard[0].unlink()
    report = verify_store(str(url), repair=True)
    assert {d.part for d in report.damaged} == {"teacher vit layer 2"}
    assert len(FeatureStore.open(str(url)).layer_commits("vit", 2).committed()) == store.plan().num_units - 1
    run_cache(str(images), str(url), _cfg(TINY_VIT, "vit", layers=[1, 2]))
    assert not verify_store(str(url)).damaged
    g = FeatureStore.open(str(url)).teacher_group("vit")
    for k in (1, 2):
        np.testing.assert_array_equal(g[L.layer_path(k)][:], before[k])
