import csv
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from stages.datasets import write_demo_images, write_longtail_pool, zipf_counts
from stages.sources import decode_rgb


def test_demo_images(tmp_path):
    s = write_demo_images(tmp_path / "d")
    rows = list(csv.DictReader(open(s.labels_csv)))
    assert len(rows) == 1797 == len(s.digits) and len(s.photos) >= 20
    labels = np.array([int(r["label"]) for r in rows])
    held = np.array([r["split"] == "heldout" for r in rows])
    assert s.num_heldout == held.sum() and s.num_train + s.num_heldout == 1797
    for c in range(10):  # stratified ~20% per class
        assert abs(held[labels == c].mean() - 0.2) < 0.02
    img = np.asarray(decode_rgb((tmp_path / "d" / rows[0]["path"]).read_bytes()))
    assert img.shape == (64, 64, 3) and img.max() > 100
    for p in s.photos:
        decode_rgb(p.read_bytes())
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*.png")}
    again = write_demo_images(tmp_path / "d")
    assert [r for r in csv.DictReader(open(again.labels_csv))] == rows
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "d").rglob("*.png")}  # idempotent


def test_zipf_counts():
    c = zipf_counts(20000, 21, 100.0)
    assert c.sum() == 20000 and (np.diff(c) <= 0).all()
    assert 80 <= c[0] / c[-1] <= 120
    s = np.log(100.0) / np.log(21)
    ideal = 20000 / np.arange(1, 22) ** s / (1 / np.arange(1, 22) ** s).sum()
    assert np.abs(c - ideal).max() < 1  # within one crop of the float64 law
    with pytest.raises(ValueError, match="need >="):
        zipf_counts(21, 21, 100.0)  # used to return a negative head count
    with pytest.raises(ValueError):
        zipf_counts(5, 21, 100.0)


def test_longtail_pool_is_zipf_and_deterministic(tmp_path):
    pool = write_longtail_pool(tmp_path / "a", n_crops=600, head_to_tail=20.0, crop_min=16, crop_max=40)
    rows = list(csv.DictReader(open(pool.concepts_csv)))
    assert len(rows) == 600 == pool.num_crops
    counts = Counter(r["concept"] for r in rows)
    assert set(counts) == set(pool.counts) and len(counts) >= 20
    ordered = sorted(counts.values(), reverse=True)
    assert 14 <= ordered[0] / ordered[-1] <= 30
    first = decode_rgb((tmp_path / "a" / rows[0]["path"]).read_bytes())
    assert 16 <= max(first.size) <= 40 * 1.2
    again = write_longtail_pool(tmp_path / "b", n_crops=600, head_to_tail=20.0, crop_min=16, crop_max=40, workers=1)
    rows_b = list(csv.DictReader(open(again.concepts_csv)))
    assert rows == rows_b
    assert (tmp_path / "a" / rows[7]["path"]).read_bytes() == (tmp_path / "b" / rows[7]["path"]).read_bytes()


def test_data_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0 and "demo" in result.output and "longtail" in result.output
    result = runner.invoke(app, ["data", "longtail", str(tmp_path / "p"), "--n-crops", "100", "--head-to-tail", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 100 crops" in result.output
    result = runner.invoke(app, ["data", "longtail", str(tmp_path / "p"), "--n-crops", "3"])
    assert result.exit_code != 0


def test_bundled_sets_refuse_a_folder_they_did_not_write(tmp_path):
    import pytest

    from stages.datasets import claim_folder, write_longtail_pool

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photos").mkdir()
    (mine / "photos" / "astronaut.png").write_bytes(b"my own picture")
    with pytest.raises(ValueError, match="not written by"):
        write_demo_images(mine)
    with pytest.raises(ValueError, match="not written by"):
        write_longtail_pool(mine, n_crops=10, workers=1)
    assert (mine / "photos" / "astronaut.png").read_bytes() == b"my own picture"
    out = claim_folder(tmp_path / "new", "data-demo")  # new, then claimed again on a rerun
    (out / "x.txt").write_text("written by the command")
    assert claim_folder(out, "data-demo") == out


def test_segmentation_set_masks_and_distances(tmp_path):
    from PIL import Image

    from stages.datasets import DISTANCE_SCALE, SEG_CLASSES, write_segmentation_set

    s = write_segmentation_set(tmp_path / "seg", n_images=12, crop=(48, 96), digit_px=(12, 32), seed=3)
    rows = list(csv.DictReader(open(s.masks_csv)))
    assert len(rows) == 12 == len(s.images) and s.classes_txt.read_text().split("\n")[:11] == list(SEG_CLASSES)
    for row in rows[:4]:
        image = np.asarray(Image.open(s.root / row["path"]))
        mask = np.asarray(Image.open(s.root / row["mask"]))
        depth = np.asarray(Image.open(s.root / row["mask"].replace("masks/", "depth/"))).astype(np.float64)
        assert mask.shape == depth.shape == image.shape[:2] and mask.dtype == np.uint8
        assert mask.max() <= 10 and (mask > 0).any()  # background + the ten digits, at least one digit per image
        # the distance target, against a brute-force nearest-digit search
        digit = np.argwhere(mask > 0)
        grid = np.argwhere(np.ones(mask.shape, bool))
        nearest = np.sqrt(((grid[:, None, :] - digit[None, :, :]) ** 2).sum(-1)).min(1).reshape(mask.shape)
        np.testing.assert_allclose(depth / DISTANCE_SCALE, nearest, atol=0.5 / DISTANCE_SCALE)
    again = write_segmentation_set(tmp_path / "seg2", n_images=12, crop=(48, 96), digit_px=(12, 32), seed=3)
    assert (s.root / rows[5]["mask"]).read_bytes() == (again.root / rows[5]["mask"]).read_bytes()  # seeded
    result = CliRunner().invoke(app, ["data", "segmentation", str(tmp_path / "cli"), "--n-images", "3"])
    assert result.exit_code == 0 and "wrote 3 images" in result.output, result.output
