"""Dense linear probes (eval/dense.py) and the seg task: the metrics against scikit-learn and naive loops, the
sampled-pixel training against torch's own upsampling and a closed-form least-squares fit, and a trained run's
eval.json["seg"] against a recomputation that reads the masks from the mask files, not the store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.dense import bilinear_weights, confusion_matrix, fit_probe, iou_per_class, predict_dense, rmse


@pytest.mark.parametrize("n_in,n_out", [(3, 48), (5, 80), (7, 7), (4, 9), (6, 3)])
def test_bilinear_weights_are_torch_upsampling(n_in, n_out):
    x = torch.randn(1, 2, n_in, n_in + 2, dtype=torch.float64)
    full = F.interpolate(x, size=(n_out, n_out + 5), mode="bilinear", align_corners=False)[0]
    rows, cols = np.arange(n_out), np.arange(n_out + 5)
    mine = torch.einsum("yh,chw,xw->cyx", bilinear_weights(rows, n_in, n_out).double(), x[0],
                        bilinear_weights(cols, n_in + 2, n_out + 5).double())
    torch.testing.assert_close(mine, full, atol=1e-6, rtol=0)


def test_miou_and_rmse_match_sklearn_and_a_naive_loop():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 5, (9, 11)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(0, 6, (9, 11)) for _ in range(3)]
    targets[1][2:4, :] = 255  # ignored pixels
    conf = confusion_matrix(preds, targets, 6, 255)
    valid = np.concatenate([t.ravel() != 255 for t in targets])
    t = np.concatenate([x.ravel() for x in targets])[valid]
    p = np.concatenate([x.ravel() for x in preds])[valid]
    assert conf.sum() == valid.sum()
    assert np.nanmean(iou_per_class(conf)) == pytest.approx(jaccard_score(t, p, average="macro"))
    assert np.trace(conf) / conf.sum() == pytest.approx((t == p).mean())
    values = [rng.integers(0, 1000, (4, 6)).astype(np.uint16) for _ in range(2)]
    values[0][0, 0] = 65535
    guesses = [rng.normal(30, 10, (4, 6)) for _ in range(2)]
    errs = [(g[i, j] - v[i, j] / 16.0) ** 2 for g, v in zip(guesses, values) for i in range(4) for j in range(6)
            if v[i, j] != 65535]
    assert rmse(guesses, values, 65535, 16.0) == pytest.approx(np.sqrt(np.mean(errs)))
    with pytest.raises(ValueError, match="beyond the 6 classes"):
        confusion_matrix([preds[0]], [np.full((9, 11), 7, np.uint8)], 6, 255)


def _patch_world(n: int, rng, dim: int = 12, classes: int = 4):
    """Images whose patch classes are written in their features; the mask is each patch's class on its 16x16 pixels."""
    feats, grids, masks = [], [], []
    centres = rng.normal(0, 3, (classes, dim))
    for _ in range(n):
        gh, gw = int(rng.integers(3, 6)), int(rng.integers(3, 6))
        cls = rng.integers(0, classes, (gh, gw))
        feats.append((centres[cls.ravel()] + rng.normal(0, 0.5, (gh * gw, dim))).astype(np.float32))
        grids.append((gh, gw))
        masks.append(np.kron(cls, np.ones((16, 16), np.int64)).astype(np.uint8))
    return feats, grids, masks


def test_a_probe_finds_classes_its_features_carry_and_not_shuffled_ones():
    rng = np.random.default_rng(1)
    feats, grids, masks = _patch_world(60, rng)
    probe = fit_probe(feats[:40], grids[:40], masks[:40], kind="classes", num_classes=4, ignore=255)
    preds = predict_dense(probe, feats[40:], grids[40:], [m.shape for m in masks[40:]])
    assert np.nanmean(iou_per_class(confusion_matrix(preds, masks[40:], 4, 255))) > 0.8
    shuffled = fit_probe(feats[:40], grids[:40], masks[:40][::-1], kind="classes", num_classes=4, ignore=255)
    preds = predict_dense(shuffled, feats[40:], grids[40:], [m.shape for m in masks[40:]])
    assert np.nanmean(iou_per_class(confusion_matrix(preds, masks[40:], 4, 255))) < 0.5


def test_a_regression_probe_reaches_the_least_squares_optimum():
    """The per-pixel least-squares fit of the upsampled features (closed form, float64) is the best any linear
    probe can do on its training pixels; the trained probe gets within 2% of its error."""
    rng = np.random.default_rng(2)
    feats, grids, targets, design, truth = [], [], [], [], []
    w = rng.normal(size=5)
    for _ in range(12):
        gh, gw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        f = rng.normal(size=(gh * gw, 5))
        up = torch.einsum("yh,hwd,xw->yxd", bilinear_weights(np.arange(16 * gh), gh, 16 * gh).double(),
                          torch.from_numpy(f).reshape(gh, gw, 5), bilinear_weights(np.arange(16 * gw), gw, 16 * gw).double())
        value = up.numpy() @ w + 40 + rng.normal(0, 0.5, (16 * gh, 16 * gw))
        stored = np.clip(np.rint(value * 16), 0, 65534).astype(np.uint16)
        stored[:3, :3] = 65535  # unknown pixels
        feats.append(f.astype(np.float32)), grids.append((gh, gw)), targets.append(stored)
        keep = stored != 65535
        design.append(up.numpy()[keep]), truth.append(stored[keep] / 16.0)
    x = np.concatenate(design)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = np.concatenate(truth)
    optimum = np.sqrt(np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2))
    probe = fit_probe(feats, grids, targets, kind="values", num_classes=1, ignore=65535, scale=16.0, lr=0.05,
                      min_steps=600, train_stride=1)
    got = rmse(predict_dense(probe, feats, grids, [t.shape for t in targets]), targets, 65535, 16.0)
    assert optimum <= got <= 1.02 * optimum
    assert got < 0.5 * rmse([np.full(t.shape, y.mean()) for t in targets], targets, 65535, 16.0)


def test_bad_probe_input_is_refused():
    with pytest.raises(ValueError, match="one feature map, grid and target per image"):
        fit_probe([], [], [], kind="classes", num_classes=2, ignore=255)
    f = [np.zeros((4, 3), np.float32)]
    with pytest.raises(ValueError, match="no labelled pixel"):
        fit_probe(f, [(2, 2)], [np.full((32, 32), 255, np.uint8)], kind="classes", num_classes=2, ignore=255)
    with pytest.raises(ValueError, match="kind must be"):
        fit_probe(f, [(2, 2)], [np.zeros((32, 32), np.uint8)], kind="depth", num_classes=2, ignore=255)


# ---------------------------------------------------------------------------------------------- the seg task
@pytest.fixture(scope="module")
def seg_store(tmp_path_factory):
    """Segmentation images cached with the session's tiny "dino" teacher, class masks in one store and the
    distance targets in another."""
    from stages.cache import run_cache
    from stages.datasets import DISTANCE_SCALE, write_segmentation_set
    from cli_helpers import shared_ray
    from stages.config import CacheConfig
    from stages.ray_cluster import ray_cluster
    from train_helpers import TINY_VIT

    root = tmp_path_factory.mktemp("seg")
    data = write_segmentation_set(root / "data", n_images=24, crop=(48, 112), digit_px=(16, 40), seed=0)
    # the session stores' settings (tests/conftest.py), so that their "dino" has the same fingerprint
    cfg = CacheConfig(teacher=TINY_VIT, name="dino", random_init=True, seed=0, min_tokens=4, max_tokens=48,
                      shard_images=16, shard_rows=256, chunk_rows=64, batch_size=16, workers=1, num_cpus=2)
    urls = {"classes": str(root / "classes"), "values": str(root / "values")}
    shared_ray()
    with ray_cluster(num_cpus=2):
        run_cache(str(data.root / "images"), urls["classes"], cfg.model_copy(
            update={"masks": str(data.masks_csv), "mask_classes": str(data.classes_txt)}))
        run_cache(str(data.root / "images"), urls["values"], cfg.model_copy(
            update={"masks": str(data.depth_csv), "mask_kind": "values", "mask_scale": float(DISTANCE_SCALE)}))
    return data, urls


def _recomputed(run, url: str, data, csv_path: Path, kind: str, entry: dict) -> dict[str, float]:
    """The seg entry's metric per feature, from the run's features, the split rule and the mask files."""
    from eval.features import extract_patch_features, load_trained
    from storage import layout as L
    from storage.store import FeatureStore
    from train.rundir import read_run

    cfg, record = read_run(run)
    model, _ = load_trained(run, url, cfg, record["teachers"], torch.device("cpu"))
    store = FeatureStore.open(url)
    sources = [Path(s).name for s in store.image_strings(L.SOURCE)]
    hw = store.image_array(L.HW)[:]
    files = {Path(r["path"]).name: data.root / r["mask"] for r in csv.DictReader(open(csv_path))}
    masked = np.flatnonzero(store.image_array(L.OK)[:])  # every usable image has a mask here
    order = np.random.default_rng(0).permutation(len(masked))
    n_train = int(round(len(masked) * 0.5))
    train, test = masked[order[:n_train]], masked[order[n_train:]]
    feats = extract_patch_features(model, url, cfg, record["teachers"], torch.device("cpu"))
    where = {int(r): j for j, r in enumerate(feats.rows)}
    mask = {i: np.asarray(Image.open(files[sources[i]]).resize((int(hw[i, 1]), int(hw[i, 0])), Image.NEAREST))
            for i in masked}
    out = {}
    for name, per in feats.features.items():
        side = {s: ([per[where[int(i)]] for i in rows], [feats.grids[where[int(i)]] for i in rows], [mask[int(i)] for i in rows])
                for s, rows in (("train", np.sort(train)), ("test", np.sort(test)))}
        if kind == "classes":
            probe = fit_probe(*side["train"], kind="classes", num_classes=11, ignore=255)
            preds = predict_dense(probe, side["test"][0], side["test"][1], [m.shape for m in side["test"][2]])
            out[name] = float(np.nanmean(iou_per_class(confusion_matrix(preds, side["test"][2], 11, 255))))
        else:
            probe = fit_probe(*side["train"], kind="values", num_classes=1, ignore=65535, scale=16.0)
            preds = predict_dense(probe, side["test"][0], side["test"][1], [m.shape for m in side["test"][2]])
            out[name] = rmse(preds, side["test"][2], 65535, 16.0)
    return out


def test_seg_task_equals_a_recomputation_from_the_mask_files(seg_store, train_store, tmp_path):
    from cli_helpers import assert_ok, error_line, run_pipeline
    from train_helpers import train_tiny

    data, urls = seg_store
    run = tmp_path / "run"
    train_tiny(urls["classes"], run)
    proc = assert_ok(run_pipeline("eval", run, "--store", urls["classes"], "--tasks", "seg"))
    assert "dense linear probe (mIoU" in proc.stdout
    seg = json.loads((run / "eval.json").read_text())["seg"]
    assert seg["kind"] == "classes" and seg["classes"][0] == "background" and len(seg["classes"]) == 11
    assert seg["train_images"] == 12 and seg["test_images"] == 12
    assert set(seg["miou"]) == {"student/patches", "student/dino", "teacher/dino"}
    background = [np.asarray(Image.open(data.root / r["mask"])) for r in csv.DictReader(open(data.masks_csv))]
    assert seg["majority_class"]["class"] == 0 and 0 < seg["majority_class"]["miou"] < 1 / 11 + 1e-9
    assert seg["majority_class"]["pixel_accuracy"] > 0.5 and np.mean([(m == 0).mean() for m in background]) > 0.5
    want = _recomputed(run, urls["classes"], data, data.masks_csv, "classes", seg)
    for name, value in want.items():
        assert seg["miou"][name] == pytest.approx(value, abs=1e-6), name
    # the regression target through the same task, from another store (--seg-store); eval.json keeps both stores
    proc = assert_ok(run_pipeline("eval", run, "--store", urls["classes"], "--seg-store", urls["values"],
                                  "--tasks", "seg"))
    seg = json.loads((run / "eval.json").read_text())["seg"]
    assert seg["kind"] == "values" and seg["store"] == urls["values"] and "RMSE" in proc.stdout
    want = _recomputed(run, urls["values"], data, data.depth_csv, "values", seg)
    for name, value in want.items():
        assert seg["rmse"][name] == pytest.approx(value, rel=1e-5), name
    assert seg["rmse_of_train_mean"] > 0
    from eval.report import write_report

    report = write_report(run).read_text()
    assert "## Dense linear probe: per-pixel regression" in report
    assert f"| teacher/dino | {seg['rmse']['teacher/dino']:.3f} |" in report
    error_line(run_pipeline("eval", run, "--store", urls["classes"], "--tasks", "knn", "--seg-store", urls["values"]),
               "read by the seg task only")
    # a store of the same teacher without masks is refused in one line naming --masks; no store at all too
    error_line(run_pipeline("eval", run, "--store", urls["classes"], "--tasks", "seg", "--seg-store", train_store),
               "seg needs per-pixel masks", "--masks")
    error_line(run_pipeline("eval", run, "--store", urls["classes"], "--tasks", "seg", "--seg-store",
                            tmp_path / "nowhere"), "no feature store")
