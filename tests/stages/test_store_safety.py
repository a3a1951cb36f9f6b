"""Nothing lost, nothing silently wrong: refusals that protect what the project did not write, writer
locks, a teacher index that survives concurrent adds, and sources that record every odd file."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import error_line, run_pipeline
from stages.cache import run_cache
from stages.config import CacheConfig
from stages.sources import iter_decoded, list_images
from storage import layout as L
from storage.store import FeatureStore

from cache_helpers import TINY_CNN, TINY_VIT, write_image_folder

SMALL = {"random_init": True, "min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96,
         "chunk_rows": 32, "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 4,
         "phis_max_rows": 5000, "num_cpus": 2}
OTHER_VIT = TINY_VIT.replace("depth=2", "depth=1")


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text("\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in SMALL.items()) + "\n")
    return path


def _cache(images, store, teacher, name, tmp_path, *extra, **kw):
    return run_pipeline("cache-teachers", images, "--store", store, "--teacher", teacher, "--name", name,
                        "--config", _toml(tmp_path), *extra, **kw)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety_images")
    write_image_folder(root, bad=False)
    return root


# ------------------------------------------------------------------ never write into what we did not write
def test_a_folder_that_is_not_a_store_is_refused_and_left_as_it_was(small_images, tmp_path):
    target = tmp_path / "mine"
    (target / "sub").mkdir(parents=True)
    (target / "keep.txt").write_text("precious")
    (target / "sub" / "deeper.txt").write_text("also precious")
    error_line(_cache(small_images, target, TINY_CNN, "cnn", tmp_path), str(target), "not a feature store")
    assert (target / "keep.txt").read_text() == "precious"
    assert (target / "sub" / "deeper.txt").read_text() == "also precious"
    assert not (target / "zarr.json").exists()

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    error_line(_cache(small_images, a_file, TINY_CNN, "cnn", tmp_path), str(a_file))
    assert a_file.read_text() == "x"


def test_a_bad_teacher_spec_or_weights_file_creates_no_store(small_images, tmp_path):
    store = tmp_path / "new_store"
    error_line(_cache(small_images, store, "bogus:x", "x", tmp_path), "unknown teacher library 'bogus'")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not a weights file")
    error_line(_cache(small_images, store, TINY_CNN, "cnn", tmp_path, "--no-random-init", "--weights", weights),
               str(weights))
    assert not store.exists()


def test_images_inside_the_store_are_refused(tmp_path):
    folder = tmp_path / "self"
    write_image_folder(folder, bad=False)
    before = sorted(p.name for p in folder.iterdir())
    error_line(_cache(folder, folder, TINY_CNN, "cnn", tmp_path), "inside --store")
    error_line(_cache(folder / "photo0_0.png", folder, TINY_CNN, "cnn", tmp_path), "inside --store")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_curate_refuses_a_folder_or_manifest_it_did_not_write(small_images, tmp_path):
    out = tmp_path / "out"
    (out / "manifest").mkdir(parents=True)
    (out / "manifest" / "notes.txt").write_text("mine")
    proc = run_pipeline("curate", small_images, "--out", out, "--embedder", TINY_VIT, "--random-init",
                        "--levels", "4,2", "--target", "5")
    error_line(proc, str(out), "not a curation run folder")
    assert (out / "manifest" / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    error_line(run_pipeline("curate", small_images, "--out", fresh, "--embedder", "bogus:x", "--levels", "4,2",
                            "--target", "5"), "unknown teacher library 'bogus'")
    assert not fresh.exists()  # a bad embedder SPEC leaves no run folder behind

    from stages.manifest import write_manifest

    with pytest.raises(ValueError, match="not a curation manifest"):
        write_manifest(out / "manifest", ids=np.array(["a"]), sources=np.array(["/x.png"]), index=np.array([0]),
                       clusters=np.zeros((1, 1)), attrs={})
    assert (out / "manifest" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ writer locks and the teacher index
def test_two_teachers_added_at_once_are_both_kept(small_images, tmp_path, ray_local):
    url = str(tmp_path / "store")
    run_cache(str(small_images), url, CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL))
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache-teachers", str(small_images), "--store",
                               url, "--teacher", spec, "--name", name, "--config", str(_toml(tmp_path))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for spec, name in ((TINY_VIT, "vit"), (OTHER_VIT, "vit1"))]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
    store = FeatureStore.open(url)
    assert set(store.teacher_names) == {"cnn", "vit", "vit1"}
    assert set(store.attrs["teachers"]) == {"cnn", "vit", "vit1"}
    assert all(store.teacher_attrs(n)["complete"] for n in store.teacher_names)


def test_two_commands_creating_one_new_store_never_crash_raw(small_images, tmp_path):
    """Both start on nothing: one writes the images, the other either finds them done or is refused in one
    line (never a raw traceback). (A rerun after a refusal: the stale-lock test below.)"""
    url = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache-teachers", str(small_images), "--store",
                               url, "--teacher", spec, "--name", name, "--config", str(_toml(tmp_path))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for spec, name in ((TINY_CNN, "cnn"), (TINY_VIT, "vit"))]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    for p, out, err in results:
        assert "Traceback" not in err, err
        if p.returncode:
            assert p.returncode == 2 and "being written by another process" in err, err
    assert any(p.returncode == 0 for p, _, _ in results)
    store = FeatureStore.open(url)
    done = {name for (p, _, _), name in zip(results, ("cnn", "vit")) if p.returncode == 0}
    assert store.images_complete and set(store.fingerprint()["teachers"]) == done


def test_the_teacher_list_is_read_off_the_groups_and_repaired(small_images, tmp_path, ray_local):
    url = str(tmp_path / "store")
    for spec, name in ((TINY_CNN, "cnn"), (TINY_VIT, "vit")):
        run_cache(str(small_images), url, CacheConfig(teacher=spec, name=name, **SMALL))
    store = FeatureStore.open(url, mode="r+")
    store.update_attrs(teachers=["vit"])  # what a lost concurrent update leaves behind
    assert FeatureStore.open(url).teacher_names == ["vit", "cnn"]
    report = run_cache(str(small_images), url, CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL))
    assert report.resumed and FeatureStore.open(url).attrs["teachers"] == ["vit", "cnn"]


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(small_images, tmp_path, ray_local):
    url = str(tmp_path / "store")
    run_cache(str(small_images), url, CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL))
    store = FeatureStore.open(url, mode="r+")
    with store.lock("teacher-vit"):  # this test process is a live writer of teacher "vit"
        error_line(_cache(small_images, url, TINY_VIT, "vit", tmp_path), "teacher 'vit'",
                   f"pid {os.getpid()}", "being written by another process")
    assert "vit" not in FeatureStore.open(url).teacher_names

    fresh = str(tmp_path / "fresh")
    FeatureStore.open_or_create(fresh, FeatureStore.open(url).policy, "test")
    with FeatureStore.open(fresh, mode="r+").lock("images"):  # another command is writing the images
        error_line(_cache(small_images, fresh, TINY_CNN, "cnn", tmp_path), "the images of", "being written")

    # a writer that was SIGKILLed leaves its lock behind: the rerun takes it over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = store.path(L.LOCKS, "teacher-vit.lock")
    store.fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}).encode())
    run_cache(str(small_images), url, CacheConfig(teacher=TINY_VIT, name="vit", **SMALL))
    assert FeatureStore.open(url).teacher_attrs("vit")["complete"] and not store.fs.exists(lock)


def test_images_computed_counts_each_image_once(small_images, tmp_path, ray_local):
    report = run_cache(str(small_images), str(tmp_path / "store"), CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL))
    ok = FeatureStore.open(str(tmp_path / "store")).image_array(L.OK)[:]
    assert report.images_computed == int(ok.sum())


# ------------------------------------------------------------------ sources: every odd file is recorded
def _png(seed: int, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_non_utf8_file_name_is_a_recorded_failure_not_an_abort(small_images, tmp_path, ray_local):
    folder = tmp_path / "names"
    folder.mkdir()
    for p in list(small_images.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    bad_name = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(os.fsencode(bad_name), "wb") as f:
        f.write(_png(1))
    report = run_cache(str(folder), str(tmp_path / "store"), CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL))
    store = FeatureStore.open(str(tmp_path / "store"))
    index, reasons = store.failures()
    sources = store.image_strings(L.SOURCE)
    assert report.ingest.num_images == 4 and report.ingest.num_failed == 1
    assert reasons == ["unreadable: file name is not valid UTF-8"]
    assert sources[int(index[0])].endswith("caf\\xe9.png")


def test_a_tar_member_name_seen_twice_stays_two_images(tmp_path):
    tar = tmp_path / "dup.tar"
    with tarfile.open(tar, "w") as t:
        for seed in (1, 2):
            data = _png(seed)
            info = tarfile.TarInfo("a.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    refs = list_images(tar)
    assert [r.source for r in refs] == [f"{tar}::a.png", f"{tar}::a.png::2"]
    decoded = list(iter_decoded([r.source for r in refs]))
    assert all(image is not None for _, image, _ in decoded)
    assert decoded[0][0] != decoded[1][0]  # two different images, read from their own members


def test_dangling_and_looping_links_are_listed_and_recorded(tmp_path):
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png(3))
    os.symlink(folder / "missing.png", folder / "dangling.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    refs = list_images(folder)
    assert sorted(Path(r.source).name for r in refs) == ["dangling.png", "good.png", "loop.png"]
    reasons = {Path(s).name: why for s, (_, _, why) in zip([r.source for r in refs], iter_decoded([r.source for r in refs]))}
    assert reasons["good.png"] == "" and reasons["dangling.png"].startswith("unreadable")
    assert reasons["loop.png"].startswith("unreadable")


def test_labels_that_match_nothing_are_refused_and_a_corrected_csv_is_applied(small_images, tmp_path, ray_local):
    from storage.inspect import describe_store

    names = sorted(p.name for p in small_images.iterdir())
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,label\n" + "".join(f"elsewhere/{n},1\n" for n in names))
    store = tmp_path / "store"
    error_line(_cache(small_images, store, TINY_CNN, "cnn", tmp_path, "--labels", wrong), str(wrong),
               "none of the")
    assert not store.exists()  # refused before anything was written

    def write_csv(rows):
        path = tmp_path / "labels.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(rows)
        return str(path)

    cfg = CacheConfig(teacher=TINY_CNN, name="cnn", **SMALL)
    report = run_cache(str(small_images), str(store), cfg.model_copy(
        update={"labels": write_csv([(str(small_images / n), k) for k, n in enumerate(names[:5])])}))
    assert report.ingest.labelled == 5
    assert describe_store(str(store))["images"]["labels"] == 5  # `inspect` prints "labels: 5 of N images"

    corrected = write_csv([(str(small_images / n), 7 if k == 0 else k) for k, n in enumerate(names)])
    report = run_cache(str(small_images), str(store), cfg.model_copy(update={"labels": corrected}))
    labels = FeatureStore.open(str(store)).labels()
    sources = [Path(s).name for s in FeatureStore.open(str(store)).image_strings(L.SOURCE)]
    assert labels[sources.index(names[0])] == 7 and (labels >= 0).all()
    assert report.ingest.labelled == len(names) and report.ingest.labels_changed == len(names) - 5 + 1


def test_the_lite_package_file_given_as_weights_loads_like_the_package(tmp_path):
    from stages.teachers import build_teacher
    from stages.teachers.weights import packaged_lite_weights

    copy = tmp_path / "shared" / "lite0.pth"
    copy.parent.mkdir()
    copy.write_bytes(packaged_lite_weights("efficientnet_lite0").read_bytes())
    auto = build_teacher("timm:efficientnet_lite0")
    given = build_teacher("timm:efficientnet_lite0", weights=copy)
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(_png(5, (64, 64)))))).permute(2, 0, 1)[None].contiguous()
    a, b = auto.forward(x, (4, 4)), given.forward(x, (4, 4))
    torch.testing.assert_close(b.summary, a.summary, rtol=0, atol=0)
    torch.testing.assert_close(b.patches, a.patches, rtol=0, atol=0)
    assert given.fingerprint()["weights"]["sha256"] == auto.fingerprint()["weights"]["sha256"]
