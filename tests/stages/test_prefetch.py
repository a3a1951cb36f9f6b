"""A teacher replica that decodes the next unit during this one's forward (the runner's lookahead, on CUDA)
computes exactly what the plain job wrote; a hint the runner did not keep is dropped, not used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from config import load_config
from stages.cache import TeacherWorker, run_cache
from stages.config import CacheConfig, CurateConfig
from stages.runner import UnitJob
from storage import layout as L
from storage.store import FeatureStore

from cache_helpers import TINY_VIT

SMALL = {"min_tokens": 16, "max_tokens": 64, "shard_images": 4, "shard_rows": 96, "chunk_rows": 32,
         "pixel_shard_bytes": 1 << 14, "pixel_chunk_bytes": 1 << 12, "batch_size": 4, "phis": False}


@pytest.fixture(autouse=True)
def _torch_threads():
    """The workers below run in the test process and set torch's thread count: put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_prefetched_units_write_what_the_plain_job_wrote(image_folder, tmp_path, ray_local, monkeypatch):
    folder, _ = image_folder
    url = str(tmp_path / "store")
    inits = []
    run_actors = UnitJob.run_actors

    def recording(self, actor_cls, init_args, *args, **kwargs):
        inits.append(init_args)
        return run_actors(self, actor_cls, init_args, *args, **kwargs)

    monkeypatch.setattr(UnitJob, "run_actors", recording)
    cfg = load_config(CacheConfig, None, {"teacher": TINY_VIT, "random_init": True, "codec": "float32",
                                          "layers": [1], **SMALL})
    report = run_cache(str(folder), url, cfg)
    store = FeatureStore.open(url)
    name, num_units = report.teacher, store.plan().num_units
    assert num_units >= 4 and len(inits) == 1
    group = zarr.open_group(url, mode="r")[f"{L.TEACHERS}/{name}"]
    features = (L.SUMMARY, L.PATCHES, L.REGISTERS, L.layer_path(1))
    written = {f: group[f][:] for f in features}

    # the same units again, in-process, with the writes and the decoding overlapped as on CUDA
    store.teacher_commits(name).clear()
    store.layer_commits(name, 1).clear()
    for f in features:
        zarr.open_group(url, mode="r+")[f"{L.TEACHERS}/{name}/{f}"][:] = 0
    worker = TeacherWorker(*inits[0], overlap=True)
    order = [0, 1, 3, 2] + list(range(4, num_units))
    hints = order[1:] + [None]
    hints[1] = 2  # unit 1 names unit 2, but unit 3 runs next: its decode is dropped
    prefetched = {}
    decoded = []
    decode = worker._decode
    monkeypatch.setattr(worker, "_decode", lambda *a: decoded.append(a[0]) or decode(*a))
    for unit, hint in zip(order, hints):
        result = worker.run_unit(unit, upcoming=None if hint is None else (hint,))
        assert result["unit"] == unit
        prefetched[unit] = result["prefetched"]
    worker.finish()
    assert prefetched == {u: u not in (0, 3) for u in order}
    assert store.teacher_commits(name).committed() == set(range(num_units))
    for f in features:
        np.testing.assert_allclose(group[f][:], written[f], rtol=1e-5, atol=1e-6, err_msg=f)
    assert sorted(decoded) == sorted([*range(num_units), 2])  # every unit once, plus the dropped decode of unit 2


def test_prefetched_embedding_units_equal_the_plain_job(image_folder, tmp_path, ray_local, monkeypatch):
    from stages.embed import EMBED_COMMITS, EmbedWorker, run_embed
    from stages.sources import list_images
    from storage.commits import CommitLog

    folder, _ = image_folder
    refs, out = list_images(folder), str(tmp_path / "run")
    calls = []
    run_actors = UnitJob.run_actors

    def recording(self, actor_cls, init_args, args, **kwargs):
        calls.append((init_args, args))
        return run_actors(self, actor_cls, init_args, args, **kwargs)

    monkeypatch.setattr(UnitJob, "run_actors", recording)
    cfg = load_config(CurateConfig, None,
                      {"embedder": TINY_VIT, "random_init": True, "levels": [4, 2], "target": 4, "min_tokens": 16,
                       "max_tokens": 64, "unit_images": 4, "batch_size": 3})
    report = run_embed(refs, out, cfg)
    group = zarr.open_group(out, mode="r")
    written = {k: group[k][:] for k in ("embeddings", "pool/ids", "pool/ok")}
    log = CommitLog(out, EMBED_COMMITS)
    failures = {u: log.info(u)["failures"] for u in range(report.units_total)}
    assert any(failures.values())  # the folder's bad files: their reasons must come back in order
    (init, args), = calls
    log.clear()
    worker = EmbedWorker(*init, overlap=True)
    num_units = report.units_total
    assert num_units >= 4
    order = [0, 2, 1] + list(range(3, num_units))
    hints = order[1:] + [None]
    hints[0] = 1  # unit 0 names unit 1, but unit 2 runs next: its decode is dropped
    results = [worker.run_unit(*args(u), upcoming=None if h is None else args(h)) for u, h in zip(order, hints)]
    worker.finish()
    assert [r["prefetched"] for r in results] == [False, False] + [True] * (num_units - 2)
    assert CommitLog(out, EMBED_COMMITS).committed() == set(range(num_units))
    for k, want in written.items():
        np.testing.assert_array_equal(group[k][:], want, err_msg=k)
    assert {u: log.info(u)["failures"] for u in range(num_units)} == failures
