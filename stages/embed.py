"""Embedding job of `pipeline curate`: one L2-normalized summary embedding per image, with any teacher.

The run folder DIR is a Zarr v3 group (a local folder or any fsspec URL: ``s3://bucket/run``); after this
job it holds

```
DIR/
  zarr.json            attrs: kind "amoe-curation", embed {what was embedded, how}, embed_complete
  embeddings [N, D]    float16|float32, row i = image i of the IMAGES list, unit norm (zeros where not ok)
  pool/ids    [N] str  content hash of the image bytes ("" where unreadable)
  pool/source [N] str  where image i came from
  pool/ok     [N] bool false where decoding failed
  pool/failures/{index [F] int64, reason [F] str}   written once every unit is committed (storage.failures)
  _commits/embed/unit-*.json                         one marker per unit (its failures inside)
```

Images are read with ``stages.sources`` and resized with the store's ``ImagePolicy`` (the pixels
cache-teachers would store and the teacher would see), then batched by size through the teacher
adapter on an actor pool (``stages.runner``). Work is split in units of ``unit_images`` consecutive images; every
array is chunked by unit, so a unit's writes touch only its own chunk objects, and the unit's commit
marker is written after them. A rerun (after ``kill -9``) skips committed units; a unit is a pure
function of its images, so the result equals an uninterrupted run. Bad images never stop the job.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from storage import layout as L
from storage.arrays import create_array
from storage.commits import CommitLog
from storage.failures import count_reasons, write_failure_table
from storage.fingerprint import digest, digest_strings, with_added_fields
from storage.fsutil import filesystem, join, zarr_options
from storage.image_policy import ImagePolicy

from .placement import place_job, replica_threads
from .ray_cluster import ray_cluster
from .runner import DecodeAhead, UnitJob, ray_node_id
from .sources import ImageRef, iter_decoded, printable_source

if TYPE_CHECKING:
    from .config import CurateConfig
    from .teachers import Teacher

__all__ = ["EMBEDDINGS", "EmbedError", "EmbedReport", "EmbedWorker", "decode_unit", "embed_images",
           "embed_sources", "normalize_rows", "run_embed"]

RUN_KIND = "amoe-curation"
EMBEDDINGS = "embeddings"
POOL = "pool"
EMBED_COMMITS = "_commits/embed"


class EmbedError(RuntimeError):
    """A run folder that cannot be used as asked (it holds another embedding job)."""


@dataclass
class EmbedReport:
    out: str
    num_images: int = 0
    num_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    dim: int = 0
    units_total: int = 0
    units_skipped: int = 0
    images_computed: int = 0
    units_prefetched: int = 0  # units whose images were decoded during the previous unit's forward (CUDA)
    skipped: bool = False  # everything was already embedded
    placement: str = ""  # where the replicas computed (stages.placement)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ one unit
def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit L2 norm per row, in float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def decode_unit(sources: list[str], policy: ImagePolicy) -> tuple[list[np.ndarray | None], list[str], list[str]]:
    """Read, decode and resize: (uint8 [H, W, 3] or None per image, content ids, failure reasons)."""
    n = len(sources)
    images: list[np.ndarray | None] = [None] * n
    ids, reasons = [""] * n, [""] * n
    for i, (content_id, image, reason) in enumerate(iter_decoded(sources, policy.resize)):
        ids[i], reasons[i] = content_id, reason
        if image is not None:
            images[i] = np.asarray(image)
    return images, ids, reasons


def embed_images(teacher: Teacher, images: list[np.ndarray | None], batch_size: int,
                 max_tokens: int | None = None) -> np.ndarray:
    """Normalized summary embeddings [n, D] float32 of policy-sized images (zero rows for None).

    Images go through ``Teacher.forward_images`` (batched by size in a fixed order), so a unit's
    result does not depend on which worker computes it or when."""
    out = np.zeros((len(images), teacher.summary_dim), np.float32)
    present = {i: img for i, img in enumerate(images) if img is not None}
    for keys, result in teacher.forward_images(present, batch_size, max_tokens):
        out[keys] = normalize_rows(result.summary.float().numpy())
    return out


def embed_sources(teacher: Teacher, sources: list[str], policy: ImagePolicy, batch_size: int = 32,
                  max_tokens: int | None = None) -> dict:
    """One unit end to end: ``embeddings`` [n, D] float32 (unit norm), ``ids``, ``ok``, ``reasons``."""
    return _embedded(teacher, decode_unit(sources, policy), batch_size, max_tokens)


def _embedded(teacher: Teacher, decoded: tuple[list, list[str], list[str]], batch_size: int,
              max_tokens: int | None) -> dict:
    images, ids, reasons = decoded
    return {"embeddings": embed_images(teacher, images, batch_size, max_tokens), "ids": ids,
            "ok": np.array([img is not None for img in images], bool), "reasons": reasons}


# ------------------------------------------------------------------------------------ the actor
def _policy(cfg: CurateConfig) -> ImagePolicy:
    return ImagePolicy(cfg.patch_size, cfg.min_tokens, cfg.max_tokens)


class EmbedWorker:
    """One embedder replica: ``run_unit`` decodes, embeds, writes the unit's chunks, then commits it.

    The unit's images are read and decoded by the actor's threads in parallel (torch waits for them on
    CPU); on CUDA (``overlap``) the next unit's (``upcoming``, the runner's lookahead) are decoded while
    the GPU embeds this one.
    """

    def __init__(self, url: str, teacher_kwargs: dict, policy: dict, dtype: str, threads: int,
                 batch: tuple[int, int | None], unit_images: int, overlap: bool | None = None):
        import torch
        import zarr

        from .teachers import build_teacher

        torch.set_num_threads(threads)
        self.teacher = build_teacher(**teacher_kwargs)
        self.policy = ImagePolicy.from_dict(policy)
        self.group = zarr.open_group(url, mode="r+", **zarr_options(url))
        self.dtype, self.unit_images = dtype, unit_images
        self.batch_size, self.batch_tokens = batch
        self.commits = CommitLog(url, EMBED_COMMITS)
        self.threads = threads
        self.decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        overlap = self.teacher.device.type == "cuda" if overlap is None else overlap
        self.ahead = DecodeAhead(overlap)  # the next unit's images, decoded during this unit's forward

    def _decode(self, sources: list[str]) -> tuple[list, list[str], list[str]]:
        """``decode_unit`` of ``sources`` in one contiguous piece per thread, joined in order."""
        step = max(1, -(-len(sources) // self.threads))
        parts = list(self.decoder.map(lambda a: decode_unit(sources[a:a + step], self.policy),
                                      range(0, len(sources), step)))
        return tuple([x for part in parts for x in part[k]] for k in range(3))

    def run_unit(self, unit: int, sources: list[str], upcoming: tuple | None = None) -> dict:
        t0 = time.perf_counter()
        decoded, prefetched = self.ahead.take(unit, self._decode, sources)
        if upcoming is not None:
            self.ahead.start(upcoming[0], self._decode, upcoming[1])
        res = _embedded(self.teacher, decoded, self.batch_size, self.batch_tokens)
        i0 = unit * self.unit_images
        i1 = i0 + len(sources)
        g = self.group
        g[EMBEDDINGS][i0:i1] = res["embeddings"].astype(self.dtype)
        g[f"{POOL}/ids"][i0:i1] = np.asarray(res["ids"], dtype=str)
        g[f"{POOL}/source"][i0:i1] = np.asarray([printable_source(x) for x in sources], dtype=str)
        g[f"{POOL}/ok"][i0:i1] = res["ok"]
        failures = [[i0 + j, r] for j, r in enumerate(res["reasons"]) if not res["ok"][j]]
        self.commits.commit(unit, {"images": [i0, i1], "failures": failures, "node": ray_node_id()})
        return {"unit": unit, "images": int(res["ok"].sum()), "prefetched": prefetched,
                "seconds": time.perf_counter() - t0}

    def finish(self) -> None:
        """The runner names no unit after an actor's last: a decode still held here is dropped."""
        self.ahead.drop()


# ------------------------------------------------------------------------------------ the job
def _create_arrays(group, n: int, dim: int, dtype: str, unit: int) -> None:
    create_array(group, EMBEDDINGS, shape=(n, dim), dtype=dtype, chunks=(unit, dim), fill_value=0)
    pool = group.require_group(POOL)
    create_array(pool, "ids", shape=(n,), dtype=str, chunks=(unit,))
    create_array(pool, "source", shape=(n,), dtype=str, chunks=(unit,))
    create_array(pool, "ok", shape=(n,), dtype=bool, chunks=(unit,), fill_value=False)


def open_run_folder(out: str):
    """The curation run folder ``out`` (a path or fsspec URL) as a Zarr group, created when nothing (or an
    empty folder) is there.

    Anything else (a non-empty folder that is not a curation run folder, a file) is refused: the project
    never writes into what it did not write.
    """
    import zarr

    fs, root = filesystem(out)
    meta = join(root, "zarr.json")
    if fs.isfile(meta):
        kind = (json.loads(fs.cat_file(meta)).get("attributes") or {}).get("kind")
        if kind != RUN_KIND:
            raise EmbedError(f"{out} is a Zarr group of another kind ({kind!r}), not a curation run folder: "
                             "use a new --out")
        return zarr.open_group(str(out), mode="r+", **zarr_options(out))
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
        what = "a file" if not fs.isdir(root) else "a non-empty folder"
        raise EmbedError(f"{out} is {what} and not a curation run folder: refusing to write into it (use a new "
                         "or empty --out)")
    return zarr.create_group(str(out), attributes={"kind": RUN_KIND}, overwrite=False, **zarr_options(out))


def run_embed(refs: list[ImageRef], out: str, cfg: CurateConfig, *,
              on_progress: Callable[[str, int, int], None] | None = None) -> EmbedReport:
    """Embed ``refs`` into ``out`` (a run folder, created when absent); resumes a killed run.

    Starts an embedded Ray cluster unless one is running (or joins ``cfg.ray_address``)."""

    from .teachers import build_teacher

    progress = on_progress or (lambda *a: None)
    sources = [r.source for r in refs]
    n, unit = len(sources), cfg.unit_images
    policy = _policy(cfg)
    seconds: dict[str, float] = {}
    placement = place_job(cfg)  # before any work: a device or replica request the cluster cannot serve
    t = time.perf_counter()
    teacher = build_teacher(**cfg.teacher_kwargs())  # the driver's copy, on CPU: dimension and fingerprint
    placement = placement.for_teacher(teacher)
    dim = int(teacher.summary_dim)
    stored_sources = [printable_source(x) for x in sources]
    expected = {"num_images": n, "unit_images": unit, "sources_digest": digest_strings(stored_sources),
                "embedder": cfg.embedder, "embedder_fingerprint": digest(teacher.fingerprint()),
                "compute_dtype": placement.compute_dtype, "dim": dim, "dtype": cfg.dtype,
                "image_policy": policy.to_dict()}
    del teacher
    seconds["build_embedder"] = time.perf_counter() - t
    # before any writes, after the embedder built (a bad SPEC leaves no folder): refuse what we did not write
    group = open_run_folder(str(out))

    previous = group.attrs.get("embed")
    commits = CommitLog(str(out), EMBED_COMMITS)
    if previous is not None:  # a record written before a field existed holds that field's old meaning
        previous = with_added_fields(previous)
    if previous is not None and previous != expected:
        differ = sorted(k for k in expected if previous.get(k) != expected[k])
        raise EmbedError(f"{out} already holds embeddings of another job (differs in: {', '.join(differ)}); "
                         "rerun with the same IMAGES, embedder and settings, or use a new --out")
    if previous is None:  # fresh folder (or a crash before the first marker): arrays first, then the attrs
        commits.clear()
        _create_arrays(group, n, dim, cfg.dtype, unit)
        group.attrs.update({"kind": RUN_KIND, "embed": expected, "embed_complete": False})

    num_units = -(-n // unit)
    report = EmbedReport(str(out), num_images=n, dim=dim, units_total=num_units, placement=placement.describe())
    job = UnitJob("embed", num_units, commits.committed(), progress)
    todo = job.todo
    report.units_skipped = num_units - len(todo)
    report.skipped = not todo and bool(group.attrs.get("embed_complete"))
    t = time.perf_counter()
    if todo:
        workers = min(placement.workers, len(todo))
        threads = replica_threads(cfg.threads, cfg.num_cpus, workers)
        with ray_cluster(cfg.ray_address, cfg.num_cpus):
            init = (str(out), {**cfg.teacher_kwargs(), **placement.teacher_kwargs()}, policy.to_dict(), cfg.dtype,
                    threads, (cfg.batch_size, cfg.batch_tokens), unit)
            for result in job.run_actors(EmbedWorker, init, lambda u: (u, sources[u * unit:(u + 1) * unit]),
                                         workers=workers, num_cpus=threads, num_gpus=placement.gpus_per_worker,
                                         lookahead=True):
                report.images_computed += result["images"]
                report.units_prefetched += bool(result["prefetched"])
    else:
        progress("embed", num_units, num_units)
    seconds["embed"] = time.perf_counter() - t

    # failure table from the unit markers (small), then the folder is complete
    failures: list[tuple[int, str]] = []
    for u in range(num_units):
        failures += [(int(i), str(r)) for i, r in commits.info(u)["failures"]]
    failures.sort()
    # the curation folder keeps zarr strings, like its pool/ids and pool/source (the store's format 3 is not its)
    write_failure_table(group.require_group(f"{POOL}/{L.FAILURES}"), [i for i, _ in failures], [r for _, r in failures],
                        flat=False)
    group.attrs.update({"embed_complete": True, "num_failed": len(failures)})
    report.num_failed = len(failures)
    report.failure_reasons = count_reasons(r for _, r in failures)
    report.seconds = seconds
    return report
