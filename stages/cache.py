"""`pipeline cache-teachers`: run one teacher once over a store's images and write its targets.

Orchestration (driver) and the teacher actor. The images phase lives in ``stages.ingest``; PHI-S
statistics in ``storage.phis``. Teacher inference runs on an actor pool (``stages.runner``): each
actor owns whole write units (``storage.shards``), reads the stored pixels, runs the teacher on them
(the exact pixels the student will see), writes its shards in a background thread and commits the unit.
"""

from __future__ import annotations

import contextlib
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from storage import layout as L
from storage.codecs import BFLOAT16_MAX, STORED_DTYPE, fidelity, merge_fidelity, summarize_fidelity
from storage.image_policy import ImagePolicy
from storage.index import StoreIndex, UnitOffsets, pixel_offsets, plain_select, token_offsets
from storage.shards import ShardPlan, flat_shard_rows
from storage.faults import fault_point
from storage.store import FeatureStore, StoreError, TeacherGroupSpec

from .config import CacheConfig
from .ingest import IngestReport, MaskInput, ingest_images, read_labels, read_masks
from .memory import WorkerMemory, memory_sample
from .placement import Placement, place_job, replica_threads
from .ray_cluster import ray_cluster
from .runner import DecodeAhead, UnitJob, ray_node_id
from .sources import list_images
from .text_sets import (DEFAULT_TEMPLATES, TextSet, caption_set, class_set, classifier_set, prompt_set, read_captions,
                        read_lines)

__all__ = ["CacheReport", "TeacherWorker", "check_range", "codec_fidelity", "fidelity_units", "run_cache"]

FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeatureOverflowError(ValueError):
    """A teacher feature that the store's codec cannot hold (never written as inf)."""


def check_range(values: np.ndarray, codec: str, teacher: str, feature: str) -> np.ndarray:
    """Cast to the dtype the codec stores; non-finite values or a 16-bit overflow are errors naming the feature."""
    if not np.isfinite(values).all():
        raise FeatureOverflowError(f"teacher '{teacher}' produced NaN/inf in '{feature}'")
    # int8: the rows' DCT (norm ≤ 2·√D·max|x|) and its inverse run in float32, and the channel scale (≤ 10³,
    # storage.codecs) multiplies a decoded channel's quantization error
    int8_limit = float(np.finfo(np.float32).max) / (4e3 * np.sqrt(max(values.shape[-1], 1)))
    limit = {"float16": FLOAT16_MAX, "bfloat16": BFLOAT16_MAX, "int8": int8_limit}.get(codec)
    if limit is not None:
        peak = float(np.abs(values).max(initial=0.0))
        if peak > limit:
            raise FeatureOverflowError(
                f"teacher '{teacher}' feature '{feature}' has |value| up to {peak:.4g}, beyond {codec}'s "
                f"{limit:.4g}: use --codec float32 for this teacher"
            )
    return values.astype(STORED_DTYPE[codec])


@dataclass
class CacheReport:
    store: str
    teacher: str
    ingest: IngestReport
    units_total: int = 0
    units_skipped: int = 0
    images_computed: int = 0
    images_forwarded: int = 0  # teacher forwards, counting neighbours' images a unit needs for its rows
    tokens: int = 0
    units_lost: list[int] = field(default_factory=list)  # answered by an actor lost with its node, run again
    units_prefetched: int = 0  # units whose images were decoded during the previous unit's forward (CUDA)
    seconds: dict[str, float] = field(default_factory=dict)
    phis: dict[str, dict] = field(default_factory=dict)
    resumed: bool = False
    placement: str = ""  # where the replicas computed (stages.placement)
    workers: dict[str, WorkerMemory] = field(default_factory=dict)  # per teacher worker: its memory over its units


class TeacherWorker:
    """One teacher replica; ``run_unit`` computes a unit and writes it.

    On CUDA the writes (float16 cast, compression, checksums) go to a background thread while the GPU
    computes the next unit, and the next unit's images (``upcoming``, from the runner's lookahead) are
    read and decoded while it computes this one. On CPU both run in the caller: the torch threads already hold the cores,
    and a writer competing with them slowed the forward by far more than the writes cost (measured:
    +6 s of forward for 1 s of writing, Lite0 over 600 images on 2 cores). Only the units in
    ``measured_units`` (``fidelity_units``) measure their codec's fidelity: it encodes every row a second
    time, in float64, which cost more than the write itself.
    """

    def __init__(self, store_url: str, name: str, teacher_kwargs: dict, codec: str, threads: int,
                 batch: tuple[int, int | None], unit_token_starts: np.ndarray, layers: tuple[int, ...] = (),
                 measured_units: frozenset[int] | None = None, overlap: bool | None = None):
        import torch

        from .teachers import build_teacher

        torch.set_num_threads(threads)
        self.teacher = build_teacher(**teacher_kwargs)
        self.store = FeatureStore.open(store_url, mode="r+")
        self.group = self.store.teacher_group(name)
        self.name, self.codec = name, codec
        self.fidelity: dict[str, dict] = {}  # the unit being written: per feature, its codec's measured cosine
        self.measured_units = measured_units  # None: every unit
        self.measuring = False  # whether the unit being written is one of them
        self.batch_size, self.batch_tokens = batch
        self.plan = self.store.plan()
        # the index is read a unit at a time (the units this worker computes and their neighbours): memory per
        # worker is bounded by units in flight, not by the store's size
        self.index = StoreIndex(self.store, plain_select, teacher=None, capacity=8)
        self.tokens = UnitOffsets(self.store.num_images, self.store.shard_images,
                                  lambda u: unit_token_starts[u] + np.concatenate(
                                      [[0], np.cumsum(self.index.unit(u).tokens())]).astype(np.int64),
                                  unit_token_starts)
        self.pixel_offsets = pixel_offsets(self.index)
        self.shard_rows = int(self.group[L.PATCHES].shards[0])
        self.commits = self.store.teacher_commits(name)
        # what each unit still needs: the teacher's own arrays and each requested layer commit separately,
        # so layers added to a complete teacher leave its other arrays untouched
        self.main_done = self.commits.committed()
        self.layer_logs = {k: self.store.layer_commits(name, k) for k in layers}
        self.layer_done = {k: log.committed() for k, log in self.layer_logs.items()}
        self.overlap = self.teacher.device.type == "cuda" if overlap is None else overlap
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") if self.overlap else None
        self.pending: Future | None = None
        # PNG decoding releases the GIL: the actor's CPU threads decode a unit in parallel
        self.decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png-decode")
        self.ahead = DecodeAhead(self.overlap)  # the next unit's images, decoded during this unit's forward

    def _decode(self, unit: int) -> dict[int, np.ndarray]:
        """The usable images ``unit`` computes (its work range), read and decoded; any thread may call it
        (the index and offset caches lock, the decoder pool takes work from several threads)."""
        w0, w1 = self.plan.work_range(unit, [self.tokens], [self.shard_rows])
        ok = self.index.ok_range(w0, w1)  # the flags only (rows() would read labels and pixel offsets too)
        keys = [i for i in range(w0, w1) if ok[i - w0]]
        po = np.asarray(self.pixel_offsets[w0:w1 + 1])
        lo, hi = int(po[0]), int(po[-1])
        blob = self.store.image_array(L.PIXELS)[lo:hi] if hi > lo else np.zeros(0, np.uint8)
        blobs = [blob[int(po[i - w0]) - lo: int(po[i - w0 + 1]) - lo] for i in keys]
        return dict(zip(keys, self.decoder.map(ImagePolicy.decode, blobs)))

    def _forward(self, images: dict[int, np.ndarray], layers: list[int]) -> dict[int, tuple]:
        """Per image: (summary [D], patches [gh*gw, D], registers [R, D] or None, {k: [gh*gw, Dk]}), float32."""
        results = {}
        for keys, out in self.teacher.forward_images(images, self.batch_size, self.batch_tokens, layers):
            summary = out.summary.float().numpy()
            patches = out.patches.float().reshape(len(keys), -1, out.patches.shape[-1]).numpy()
            registers = None if out.registers is None else out.registers.float().numpy()
            maps = {k: v.float().reshape(len(keys), -1, v.shape[-1]).numpy() for k, v in out.layers.items()}
            for j, i in enumerate(keys):
                results[i] = (summary[j], patches[j], None if registers is None else registers[j],
                              {k: v[j] for k, v in maps.items()})
        return results

    def run_unit(self, unit: int, upcoming: tuple | None = None) -> dict:
        """Compute and write ``unit``; ``upcoming``: the runner's args of the unit this actor runs next, whose
        images are then decoded during this unit's forward (with ``overlap``)."""
        t0 = time.perf_counter()
        i0, i1 = self.plan.image_range(unit)
        r0, r1 = self.plan.owned_rows(unit, self.tokens, self.shard_rows)
        main = unit not in self.main_done
        layers = [k for k, done in self.layer_done.items() if unit not in done]
        images, prefetched = self.ahead.take(unit, self._decode, unit)
        if upcoming is not None:
            self.ahead.start(upcoming[0], self._decode, upcoming[0])
        t1 = time.perf_counter()
        results = self._forward(images, layers)
        t2 = time.perf_counter()
        self._wait_for_write()  # at most one unit in flight: bounded memory
        if self.writer is None:
            self._write(unit, i0, i1, r0, r1, results, main, layers)
        else:
            self.pending = self.writer.submit(self._write, unit, i0, i1, r0, r1, results, main, layers)
        held = sum(a.nbytes for a in images.values()) + sum(
            x.nbytes for res in results.values() for x in (*res[:3], *res[3].values()) if x is not None)
        return {"unit": unit, "images": sum(1 for i in results if i0 <= i < i1), "tokens": r1 - r0,
                "prefetched": prefetched, "decode_s": t1 - t0, "forward_s": t2 - t1,
                "write_s": time.perf_counter() - t2,
                "images_forward": len(results), "memory": memory_sample(held)}

    def _write(self, unit: int, i0: int, i1: int, r0: int, r1: int, results: dict, main: bool = True,
               layers: list[int] = ()) -> None:
        """The unit's rows of what it still needs (the teacher's arrays, layers), then their commit markers:
        each layer's, then the teacher's."""
        g = self.group
        self.measuring = self.codec != "float32" and (self.measured_units is None or unit in self.measured_units)
        for k in layers:
            array = g[L.layer_path(k)]
            self.store.clear_rows(array, r0, r1)
            if r1 > r0:
                self._put(array, r0, r1, self._rows(results, r0, r1, lambda res: res[3][k]), L.layer_path(k))
        if main:
            self._write_main(unit, i0, i1, r0, r1, results)
        info = {"images": [i0, i1], "rows": [r0, r1], "host": platform.node(), "node": ray_node_id()}
        measured, self.fidelity = self.fidelity, {}
        for k in layers:  # each marker carries the measurements of what it commits
            self.layer_logs[k].commit(unit, {**info, "fidelity": {f: m for f, m in measured.items()
                                                                  if f == L.layer_path(k)}})
        if main:
            self.commits.commit(unit, {**info, "fidelity": {f: m for f, m in measured.items()
                                                            if not f.startswith(f"{L.LAYERS}/")}})

    def _rows(self, results: dict, r0: int, r1: int, pick: Callable[[tuple], np.ndarray]) -> np.ndarray:
        """Flat token rows ``r0:r1`` gathered from the per-image arrays ``pick(results[image])``."""
        j = int(self.tokens.searchsorted(r0, "right")) - 1
        rows, cursor = [], r0
        while cursor < r1:
            start, stop = int(self.tokens[j]), int(self.tokens[j + 1])
            if stop > start:
                rows.append(pick(results[j])[cursor - start: min(stop, r1) - start])
                cursor = min(stop, r1)
            j += 1
        return np.concatenate(rows)

    def _write_main(self, unit: int, i0: int, i1: int, r0: int, r1: int, results: dict) -> None:
        g, n = self.group, i1 - i0
        end = i1 + 1 if unit == self.plan.num_units - 1 else i1
        for name, (a, b) in {L.SUMMARY: (i0, i1), L.REGISTERS: (i0, i1), L.OFFSETS: (i0, end), L.PATCHES: (r0, r1)}.items():
            if name in g:
                self.store.clear_rows(g[name], a, b)  # the unit's objects are rewritten whole
        summary = np.zeros((n, g[L.SUMMARY].shape[1]), np.float32)
        registers = np.zeros((n, *g[L.REGISTERS].shape[1:]), np.float32) if L.REGISTERS in g else None
        for i in range(i0, i1):
            if i in results:
                summary[i - i0] = results[i][0]
                if registers is not None:
                    registers[i - i0] = results[i][2]
        self._put(g[L.SUMMARY], i0, i1, summary, L.SUMMARY)
        if registers is not None:
            self._put(g[L.REGISTERS], i0, i1, registers, L.REGISTERS)
        g[L.OFFSETS][i0:end] = self.tokens[i0:end]
        if r1 > r0:
            self._put(g[L.PATCHES], r0, r1, self._rows(results, r0, r1, lambda res: res[1]), L.PATCHES)

    def _put(self, array, a: int, b: int, values: np.ndarray, feature: str) -> None:
        """Write float32 ``values`` as rows ``a:b`` of a feature array and measure what its codec kept of them."""
        array[a:b] = check_range(values, self.codec, self.name, feature)
        if self.measuring:
            measured = fidelity(self.codec, values, int(array.chunks[0]), array.serializer)  # its own version
            self.fidelity[feature] = merge_fidelity(self.fidelity.get(feature), measured)

    def _wait_for_write(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises a write error in the caller
            self.pending = None

    def finish(self) -> None:
        """After the last unit: wait for its write (the runner calls this on every actor)."""
        self._wait_for_write()
        self.ahead.drop()  # the runner names no unit after an actor's last: nothing should be here


def _uncommitted(store: FeatureStore, name: str, layers: list[int], num_units: int) -> set[int]:
    """Units of teacher ``name`` without their commit marker (or a requested layer's)."""
    done = store.teacher_commits(name).committed()
    for k in layers:
        done &= store.layer_commits(name, k).committed()
    return set(range(num_units)) - done


def run_cache(
    images: str,
    store_url: str,
    cfg: CacheConfig,
    *,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CacheReport:
    """Cache one teacher into ``store_url`` (creating the store and its images/ when needed).

    One writer per teacher: a second command writing the same teacher of the same store at the same
    time is refused (``storage.locks``); commands adding different teachers may run at once.
    """
    progress = on_progress or (lambda *a: None)
    policy = ImagePolicy(cfg.patch_size, cfg.min_tokens, cfg.max_tokens, cfg.image_format, cfg.image_quality)
    _check_not_inside(images, store_url)
    refs = list_images(images)
    labels = read_labels(cfg.labels, [r.source for r in refs]) if cfg.labels else None  # bad CSV: refused now
    masks = _masks(cfg, [r.source for r in refs])
    placement = place_job(cfg)  # before any work: a device or replica request the cluster cannot serve
    t = time.perf_counter()
    # the driver builds the teacher once on CPU (fingerprint, dims, frozen heads, text embeddings), before
    # the store is created: a bad SPEC or weights file leaves no new store behind
    from .teachers import build_teacher

    teacher = build_teacher(**cfg.teacher_kwargs())
    placement = placement.for_teacher(teacher)
    name = cfg.name or teacher.name
    # the replicas' compute dtype is part of the targets' identity (the device is not)
    # "dtype" names the feature codec (float16 and float32 are plain dtypes; storage.codecs)
    fingerprint = {**teacher.fingerprint(), "image_policy": policy.to_dict(), "student_patch_size": cfg.patch_size,
                   "dtype": cfg.feature_codec, "compute_dtype": placement.compute_dtype}
    spec = TeacherGroupSpec(name, teacher.summary_dim, teacher.embed_dim, teacher.num_registers, cfg.feature_codec,
                            fingerprint)
    # also refuses --layers the teacher does not have and text it cannot encode, before any work
    extras = _TeacherExtras.of(teacher, cfg, [r.source for r in refs])
    del teacher  # the actors build their own replicas
    build_s = time.perf_counter() - t
    store = FeatureStore.open_or_create(store_url, policy, created_by=_created_by())
    with store.lock(f"teacher-{name}"):
        resumed = store.check_teacher(spec)  # raises on a conflicting fingerprint, before any work
        report = _cache_teacher(store, refs, labels, masks, spec, extras, resumed, cfg, placement, progress)
    report.seconds = {"build_teacher": build_s, **report.seconds}
    return report


@dataclass
class _TeacherExtras:
    """What the store keeps of a teacher besides its targets, taken from the driver's copy."""

    heads: dict[str, np.ndarray]
    heads_config: dict
    resampled: bool
    text: TextSet | None
    layer_dims: dict[int, int] = field(default_factory=dict)  # requested layers/<k> and their widths
    layer_rule: str = ""

    @classmethod
    def of(cls, teacher, cfg: CacheConfig, sources: list[str]) -> "_TeacherExtras":
        import torch

        text = None
        with torch.inference_mode():  # the set is built before any work: a teacher without a text tower fails at once
            if cfg.text_prompts:
                text = prompt_set(teacher, read_lines(cfg.text_prompts, "prompts"))
            elif cfg.text_classes:
                templates = read_lines(cfg.text_templates, "templates") if cfg.text_templates else DEFAULT_TEMPLATES
                text = class_set(teacher, read_lines(cfg.text_classes, "class names"), templates)
            elif cfg.captions:
                text = caption_set(teacher, *read_captions(cfg.captions, sources))
            elif cfg.classifier:
                text = classifier_set(teacher)
        heads = {k: v.detach().cpu().float().numpy() for k, v in teacher.heads().items()}
        dims = teacher.layer_dims(cfg.layers) if cfg.layers else {}
        return cls(heads, teacher.heads_config(), bool(teacher.resampled), text, dims,
                   teacher.layer_rule() if dims else "")


def _masks(cfg: CacheConfig, sources: list[str]) -> MaskInput | None:
    if not cfg.masks:
        return None
    classes = read_lines(cfg.mask_classes, "mask classes") if cfg.mask_classes else None
    return read_masks(cfg.masks, sources, cfg.mask_kind, classes, cfg.mask_scale)


def _cache_teacher(store: FeatureStore, refs: list, labels: np.ndarray | None, masks: MaskInput | None,
                   spec: TeacherGroupSpec,
                   extras: _TeacherExtras, resumed: bool, cfg: CacheConfig, placement: Placement,
                   progress: Callable[[str, int, int], None]) -> CacheReport:
    """Images (when missing), the teacher group, its units on an actor pool, PHI-S; the caller holds the teacher's lock."""

    from storage.phis import estimate_phis

    name, seconds = spec.name, {}
    threads = replica_threads(cfg.threads, cfg.num_cpus, placement.workers)
    # one writer of the images (and labels) at a time; taken before the cluster starts, so a second
    # writer is refused at once, and released as soon as they are written
    writes = not store.images_complete or (labels is not None and not np.array_equal(store.labels(), labels))
    with contextlib.ExitStack() as stack:
        release = stack.enter_context(store.lock("images")).release if writes else (lambda: None)
        stack.enter_context(ray_cluster(cfg.ray_address, cfg.num_cpus))
        t = time.perf_counter()
        ingest = ingest_images(refs, store, shard_images=cfg.shard_images, pixel_shard_bytes=cfg.pixel_shard_bytes,
                               pixel_chunk_bytes=cfg.pixel_chunk_bytes, labels=labels, masks=masks,
                               on_progress=progress)
        release()  # the images are written: other commands may add their teachers from here on
        seconds["images"] = time.perf_counter() - t

        t = time.perf_counter()
        # every teacher's token offsets, read a unit at a time (8 B per unit held): never the whole index
        tokens = token_offsets(StoreIndex(store, plain_select, teacher=None, capacity=4))
        if not resumed:
            shard_rows = cfg.shard_rows or flat_shard_rows(tokens, store.shard_images, cfg.chunk_rows)
            store.create_teacher(spec, tokens, shard_images=store.shard_images, shard_rows=shard_rows,
                                 chunk_rows=cfg.chunk_rows, extra_attrs={"resampled": extras.resampled, "spec": cfg.teacher},
                                 heads=(extras.heads, extras.heads_config))
        if extras.text is not None:
            store.write_text(name, cfg.text_set_name(), extras.text.embeddings, extras.text.attrs)
        was_complete = resumed and bool(store.teacher_attrs(name).get("complete"))
        if extras.layer_dims:
            store.create_layers(name, extras.layer_dims, extras.layer_rule)

        plan: ShardPlan = store.plan()
        done = store.teacher_commits(name).committed()  # a unit is done when it and each requested layer are
        for k in extras.layer_dims:
            done &= store.layer_commits(name, k).committed()
        job = UnitJob(f"teacher {name}", plan.num_units, done, progress)
        report = CacheReport(store.url, name, ingest, plan.num_units, plan.num_units - len(job.todo), resumed=resumed,
                             placement=placement.describe())
        init = (store.url, name, {**cfg.teacher_kwargs(), **placement.teacher_kwargs()}, cfg.feature_codec, threads,
                (cfg.batch_size, cfg.batch_tokens), tokens.unit_starts, tuple(extras.layer_dims),
                frozenset(fidelity_units(plan.num_units, cfg.fidelity_units)))
        per_unit: dict[int, dict] = {}  # a unit run again counts once in the report (its last run)
        for attempt in range(2):
            for result in job.run_actors(TeacherWorker, init, workers=placement.workers, num_cpus=threads,
                                         num_gpus=placement.gpus_per_worker,
                                         lookahead=True):
                per_unit[result["unit"]] = result
                report.workers.setdefault(result["memory"]["worker"], WorkerMemory()).add(result["memory"])
                for key in ("decode_s", "forward_s", "write_s"):
                    seconds[key] = seconds.get(key, 0.0) + result[key]
            # an actor lost with its node (Ray restarted it and retried its open calls) may have taken the
            # write of a unit it had already answered: such units have no marker and run once more, here
            lost = _uncommitted(store, name, list(extras.layer_dims), plan.num_units)
            if not lost:
                break
            if attempt:
                raise StoreError(f"{store.url}: teacher {name!r} units {sorted(lost)[:8]} have no commit marker "
                                 "after the job (workers lost?); rerun the same command to finish them")
            report.units_lost = sorted(lost)
            job = UnitJob(f"teacher {name}", plan.num_units, set(range(plan.num_units)) - lost, progress)
        report.images_computed = sum(r["images"] for r in per_unit.values())
        report.images_forwarded = sum(r["images_forward"] for r in per_unit.values())
        report.tokens = sum(r["tokens"] for r in per_unit.values())
        report.units_prefetched = sum(bool(r["prefetched"]) for r in per_unit.values())
        seconds["teacher"] = time.perf_counter() - t

    if extras.layer_dims:
        store.complete_layers(name, list(extras.layer_dims))
    phis_done = was_complete and all(store.exists(f"{L.TEACHERS}/{name}/{L.PHIS}/{f}.npz") for f in L.PHIS_FEATURES)
    if cfg.phis and not phis_done:  # a complete teacher that only gained layers keeps its statistics
        t = time.perf_counter()
        group = store.teacher_group(name)
        ok = store.image_array(L.OK)[:]
        for k, feature in enumerate(L.PHIS_FEATURES):
            if k:
                fault_point("phis")
            kwargs = {"valid": ok} if feature == L.SUMMARY else {}
            transform = estimate_phis(group[feature], max_rows=cfg.phis_max_rows, seed=cfg.seed, **kwargs)
            transform.save(store.phis_path(name, feature))
            report.phis[feature] = {"method": transform.method, "scale": float(transform.scale), "count": int(transform.count)}
        seconds["phis"] = time.perf_counter() - t

    if spec.codec != "float32" and (report.units_total > report.units_skipped or not was_complete):
        measured = codec_fidelity(store, name, plan.num_units, list(extras.layer_dims), cfg.fidelity_units)
        if was_complete:  # layers added to a complete teacher: its own entries stay as they were
            measured = {f: m for f, m in measured.items() if f.startswith(f"{L.LAYERS}/")}
        store.teacher_group(name).attrs.update({"codec_fidelity": {
            **(store.teacher_attrs(name).get("codec_fidelity") or {}), **measured}})
    store.teacher_group(name).attrs.update({"complete": True})
    store.repair_teacher_index()
    report.seconds = seconds
    return report


def fidelity_units(num_units: int, sample_units: int = 64) -> list[int]:
    """The units whose writers measure their codec's fidelity: up to ``sample_units``, spread evenly from the
    first unit to the last."""
    return sorted(set(np.linspace(0, num_units - 1, min(sample_units, num_units)).round().astype(int).tolist()))


def codec_fidelity(store: FeatureStore, name: str, num_units: int, layers: list[int] = (),
                   sample_units: int = 64) -> dict:
    """The codec's measured fidelity per feature, from the commit markers of the ``fidelity_units`` (each marker
    holds what its writer measured; ``layers``: also their own markers, since layers added to a cached teacher
    commit apart): mean and worst cosine to the float32 targets, raw and centred, over those units
    (``units_sampled``: those whose markers carry a measurement; a store resumed with another sample count
    may have fewer)."""
    units = fidelity_units(num_units, sample_units)
    merged: dict[str, dict] = {}
    sampled: dict[str, int] = {}
    for log in (store.teacher_commits(name), *(store.layer_commits(name, k) for k in layers)):
        for unit in units:
            try:
                info = log.info(unit)
            except FileNotFoundError:  # not committed in this log
                continue
            for feature, measured in (info.get("fidelity") or {}).items():
                merged[feature] = merge_fidelity(merged.get(feature), measured)
                sampled[feature] = sampled.get(feature, 0) + 1
    return {feature: {**summarize_fidelity(m), "units_sampled": sampled[feature]} for feature, m in merged.items()}


def _check_not_inside(images: str, store_url: str) -> None:
    """Refuse IMAGES that lie inside STORE: writing the store would overwrite its own input."""
    if "://" in store_url or "{" in images or "*" in images:
        return
    src, dst = Path(images).resolve(), Path(store_url).resolve()
    if src == dst or dst in src.parents:
        raise StoreError(f"IMAGES {images} lies inside --store {store_url}: the store would be written over its "
                         "own input; use another --store")


def _created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"amoe-pipeline {version('amoe-pipeline')}"
    except PackageNotFoundError:
        return "amoe-pipeline"
