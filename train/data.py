"""From the store to packed microbatches: replayable plans in the main process, loading in workers.

The main process turns the shuffled stream (``storage.streaming``) into microbatch plans using only
``images/grid`` and ``images/ok``, read one write unit at a time (``storage.index``); workers of a
``DataLoader`` read, decode and augment the images of each plan. Because plans are a pure function of (store, config, seed), a run resumed at microbatch m
replays the same plans from m on, and augmentation draws from an RNG keyed by (seed, microbatch,
image slot), so the number of workers never changes what a step sees.

A run may read several stores (a stage-2 mixture of high-resolution and stage-1 data): they are read
as one (``StoreMix``), rows numbered store after store, and the plan stream draws each image's store
by weight from a seeded stream (``storage.streaming.mixture_stream``), so the mixture is replayed as
exactly as one store is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np
import torch

from storage.image_policy import ImagePolicy
from storage.index import ArrayIndex, StoreIndex
from storage.reader import ImageTargets, StoreReader, read_batch
from storage.streaming import epoch_stream, mixture_stream

from .config import DataConfig
from .packing import Microbatch, build_layout, pack_stream, padded_stream, patchify

__all__ = ["StepPlan", "PlanStream", "StoreBatches", "StoreMix", "StorePart", "make_loader", "augment",
           "ordered_plans"]


@dataclass(frozen=True)
class StepPlan:
    """A microbatch plan for this rank, with the image count of the whole step (all ranks, accumulation)."""

    microbatch: Microbatch
    step: int
    global_images: int


@dataclass(frozen=True)
class StorePart:
    """One store of a mixture: its rows ``start:stop`` in the concatenated row numbering, its write unit
    (rows shuffled together) and its weight."""

    start: int
    stop: int
    unit_rows: int
    weight: float = 1.0


class PlanStream:
    """Microbatch plans of a run: shuffled, packed, split over ranks; replayable from any step.

    ``indexes`` are the per-unit indexes (``storage.index``) of every store of the run, rows numbered store
    after store (as in ``StoreMix``); ``weights`` draw the stores (default: equal). Only one unit's ``ok``
    and ``grid`` are looked at at a time, as the stream reaches it: an image longer than ``seq_len`` is
    refused when its unit is reached, not before."""

    def __init__(self, indexes: Sequence[StoreIndex | ArrayIndex], cfg: DataConfig, *, registers: int, seed: int,
                 weights: Sequence[float] | None = None, accumulation: int = 1, world: int = 1, rank: int = 0):
        self.indexes, self.cfg = list(indexes), cfg
        self.weights = list(weights) if weights is not None else [1.0] * len(self.indexes)
        self.starts = np.cumsum([0] + [len(ix) for ix in self.indexes])[:-1].tolist()
        self.prefix, self.seed = 1 + registers, seed
        self.accumulation, self.world, self.rank = accumulation, world, rank

    @classmethod
    def from_arrays(cls, ok: np.ndarray, grid: np.ndarray, unit_rows: int, cfg: DataConfig, *,
                    parts: list[StorePart] | None = None, **kwargs) -> "PlanStream":
        """The plans of whole ``ok`` and ``grid`` arrays in memory (tests; small stores), cut into ``parts``."""
        parts = parts or [StorePart(0, len(ok), unit_rows)]
        indexes = [ArrayIndex(ok[p.start:p.stop], grid[p.start:p.stop], p.unit_rows) for p in parts]
        return cls(indexes, cfg, weights=[p.weight for p in parts], **kwargs)

    def unit_tokens(self, source: int, u: int) -> np.ndarray:
        """Slots each image of unit ``u`` of store ``source`` takes (CLS + registers + patches), -1 if failed."""
        unit = self.indexes[source].unit(u)
        tokens = np.where(unit.ok, self.prefix + unit.grid[:, 0].astype(np.int64) * unit.grid[:, 1], -1)
        if self.cfg.mode == "packed" and len(tokens) and tokens.max() > self.cfg.seq_len:
            raise ValueError(f"image {unit.start + int(np.argmax(tokens))} of {self.indexes[source].name} needs "
                             f"{int(tokens.max())} tokens (CLS + registers + patches) but data.seq_len is "
                             f"{self.cfg.seq_len}: raise data.seq_len")
        return tokens

    def stream(self) -> Iterator[tuple[int, int, int]]:
        """(epoch, row, tokens) in training order: one store's shuffled epochs, or several drawn by weight.

        The first store keeps the run seed (a one-store run sees exactly the order it always had);
        the others get seeds of their own."""
        streams = [epoch_stream(lambda u, k=k: self.unit_tokens(k, u), len(ix), ix.unit_rows,
                                seed=self.seed if k == 0 else self.seed + 7919 * k, buffer=self.cfg.shuffle_buffer)
                   for k, ix in enumerate(self.indexes)]
        for source, epoch, row, tokens in mixture_stream(streams, self.weights, seed=self.seed):
            yield epoch, self.starts[source] + row, tokens

    def microbatches(self) -> Iterator[Microbatch]:
        pending: dict[int, int] = {}  # the token count of the row just handed to the packer, which asks for it at once

        def rows():
            for epoch, row, tokens in self.stream():
                pending[row] = tokens
                yield epoch, row

        if self.cfg.mode == "padded":
            return padded_stream(rows(), pending.pop, images=self.cfg.padded_images)
        return pack_stream(rows(), pending.pop, seq_len=self.cfg.seq_len, seqs=self.cfg.seqs_per_batch,
                           max_images=self.cfg.max_images_per_seq)

    def steps(self, start_step: int = 0) -> Iterator[StepPlan]:
        """This rank's plans from ``start_step`` on (earlier steps are replayed from metadata and skipped)."""
        per_step = self.accumulation * self.world
        group: list[Microbatch] = []
        step = 0
        for mb in self.microbatches():
            group.append(mb)
            if len(group) < per_step:
                continue
            if step >= start_step:
                total = sum(m.num_images for m in group)
                for a in range(self.accumulation):
                    yield StepPlan(group[a * self.world + self.rank], step, total)
            group, step = [], step + 1


def ordered_plans(ok: np.ndarray, grid: np.ndarray, cfg: DataConfig, registers: int) -> Iterator[StepPlan]:
    """Every usable image once, in store order, packed (for evaluation and feature extraction)."""
    prefix = 1 + registers
    rows = np.flatnonzero(ok)
    stream = ((0, int(r)) for r in rows)
    tokens = lambda r: prefix + int(grid[r, 0]) * int(grid[r, 1])  # noqa: E731
    for mb in pack_stream(stream, tokens, seq_len=cfg.seq_len, seqs=cfg.seqs_per_batch, max_images=cfg.max_images_per_seq):
        yield StepPlan(mb, 0, mb.num_images)


def augment(pixels: np.ndarray, patches: dict, grid: tuple[int, int], patch: int, cfg: DataConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, dict, tuple[int, int]]:
    """Flip and grid-aligned crop applied to pixels and every patch grid of ``patches`` together (each
    teacher's targets and cached layers).

    Both approximate the teacher's view: the cached summary and registers saw the whole, unflipped
    image and are kept as they are; the patch targets are exact for a flip only if the teacher is
    flip-equivariant, and exact for a crop only up to the teacher's attention to the cut-off context.
    """
    gh, gw = grid
    grids = {k: v.reshape(gh, gw, -1) for k, v in patches.items()}
    if cfg.crop:
        scale = rng.uniform(cfg.crop_min_scale, 1.0)
        ch, cw = max(1, int(round(gh * np.sqrt(scale)))), max(1, int(round(gw * np.sqrt(scale))))
        y0, x0 = int(rng.integers(0, gh - ch + 1)), int(rng.integers(0, gw - cw + 1))
        pixels = pixels[y0 * patch:(y0 + ch) * patch, x0 * patch:(x0 + cw) * patch]
        grids = {k: v[y0:y0 + ch, x0:x0 + cw] for k, v in grids.items()}
        gh, gw = ch, cw
    if cfg.flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
        grids = {k: v[:, ::-1] for k, v in grids.items()}
    return (np.ascontiguousarray(pixels), {k: np.ascontiguousarray(v.reshape(gh * gw, -1)) for k, v in grids.items()},
            (gh, gw))


class StoreMix:
    """Several stores read as one: row r of store k is row ``parts[k].start + r`` here."""

    def __init__(self, urls: list[str], teachers: list[str], layers: dict[str, list[int]] | None = None):
        self.readers = [StoreReader(u, teachers, layers) for u in urls]
        sizes = np.cumsum([0] + [len(r) for r in self.readers])
        self.starts = sizes[:-1]
        self.indexes = [r.index for r in self.readers]  # what the plan stream reads, one unit at a time

    def __len__(self) -> int:
        return int(sum(len(r) for r in self.readers))

    # the whole index of every store, for evaluation: read on first use, never by the training path
    @cached_property
    def ok(self) -> np.ndarray:
        return np.concatenate([r.ok for r in self.readers])

    @cached_property
    def grid(self) -> np.ndarray:
        return np.concatenate([r.grid for r in self.readers])

    def parts(self, weights: list[float] | None = None) -> list[StorePart]:
        weights = weights or [1.0] * len(self.readers)
        return [StorePart(int(s), int(s) + len(r), r.store.shard_images, w)
                for s, r, w in zip(self.starts, self.readers, weights)]

    def store_of(self, rows) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(rows, np.int64), side="right") - 1

    def read(self, rows: list[int]) -> dict[int, ImageTargets]:
        """Targets of ``rows`` (mixture numbering), one batched read per store."""
        rows_arr = np.asarray(rows, np.int64)
        store_of = self.store_of(rows_arr)
        items = {}
        for k in np.unique(store_of).tolist():
            mine = rows_arr[store_of == k]
            for it in read_batch(self.readers[k], (mine - self.starts[k]).tolist()):
                items[int(it.index + self.starts[k])] = it
        return items


class StoreBatches(torch.utils.data.Dataset):
    """``dataset[StepPlan]`` -> a packed microbatch (pixels as uint8 patches, layout, raw float16 targets).

    ``store_url`` is one store or the list of a run's stores (rows numbered as in ``StoreMix``); ``layers``
    names cached teacher layers to add as ``batch["layers"][teacher][k]`` (patch rows, layout order, the
    same flips and crops as the patch targets)."""

    def __init__(self, store_url: str | list[str], teachers: list[str], cfg: DataConfig, *, patch: int, registers: int,
                 seed: int, train: bool = True, layers: dict[str, list[int]] | None = None):
        self.store_urls = [store_url] if isinstance(store_url, str) else list(store_url)
        self.teachers, self.cfg, self.layers = teachers, cfg, layers or {}
        self.patch, self.registers, self.seed, self.train = patch, registers, seed, train
        self._reader: StoreMix | None = None

    @property
    def reader(self) -> StoreMix:
        if self._reader is None:  # opened lazily: once per worker process
            self._reader = StoreMix(self.store_urls, self.teachers, self.layers)
        return self._reader

    def drop_reader(self) -> None:
        """Forget the open store handles (before DataLoader workers start, so each opens its own)."""
        self._reader = None

    def __len__(self) -> int:  # plans come from the sampler; the length is never used for indexing
        return len(self.reader)

    def __getitem__(self, plan: StepPlan) -> dict:
        mb = plan.microbatch
        rows = mb.rows
        items = self.reader.read(rows)
        pixels, grids = [], []
        feats = {t: {"summary": [], "patches": [], "registers": []} for t in self.teachers}
        layers = {(t, k): [] for t, ks in self.layers.items() for k in ks}
        for slot, row in enumerate(rows):
            it = items[row]
            image = ImagePolicy.decode(it.pixels)
            patches = {t: it.patches[t] for t in self.teachers} | {(t, k): it.layers[t][k] for t, k in layers}
            grid = it.grid
            if self.train and (self.cfg.flip or self.cfg.crop):
                rng = np.random.default_rng([self.seed, mb.index, slot])
                image, patches, grid = augment(image, patches, grid, self.patch, self.cfg, rng)
            pixels.append(patchify(torch.from_numpy(np.array(image)).permute(2, 0, 1), self.patch))
            grids.append(grid)
            for t in self.teachers:
                feats[t]["summary"].append(it.summary[t])
                feats[t]["patches"].append(patches[t])
                if t in it.registers:
                    feats[t]["registers"].append(it.registers[t])
            for key in layers:
                layers[key].append(patches[key])
        sequences, k = [], 0
        for seq in mb.sequences:
            sequences.append(grids[k:k + len(seq)])
            k += len(seq)
        layout = build_layout(sequences, mb.seq_len, self.registers)  # crops only shrink images: it still fits
        targets = {}
        for t, f in feats.items():
            targets[t] = {"summary": torch.from_numpy(np.stack(f["summary"])),
                          "patches": torch.from_numpy(np.concatenate(f["patches"]))}
            if f["registers"]:
                targets[t]["registers"] = torch.from_numpy(np.stack(f["registers"]))
        labels = [items[r].label for r in rows]
        extra = {}
        if layers:
            extra["layers"] = {t: {k: torch.from_numpy(np.concatenate(layers[t, k])) for k in ks}
                               for t, ks in self.layers.items()}
        return {
            **extra,
            "pixels": torch.cat(pixels),
            "layout": layout,
            "targets": targets,
            "rows": torch.tensor(rows, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "index": mb.index,
            "step": plan.step,
            "global_images": plan.global_images,
            "real_tokens": int((layout.doc_ids >= 0).sum()),
            "store_images": np.bincount(self.reader.store_of(rows), minlength=len(self.store_urls)).tolist(),
            "slots": int(layout.doc_ids.numel()),
        }


def _identity(x):
    return x


def make_loader(dataset: StoreBatches, plans, cfg: DataConfig, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Workers load plans in order; ``batch_size=None`` hands each plan to ``dataset[plan]`` as is.
    ``pin_memory`` (a CUDA run): batches arrive in page-locked memory, so their ``non_blocking`` copies to
    the GPU overlap the step instead of waiting for a staging copy.

    The loader draws its workers' base seed from a generator of its own, never from torch's global RNG:
    otherwise starting it would shift the random stream the model draws from (router noise), and a
    resumed run, which starts its loader after restoring that stream, would not continue the same way.
    """
    kwargs = {}
    if cfg.workers > 0:
        kwargs = dict(num_workers=cfg.workers, prefetch_factor=cfg.prefetch, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=plans, collate_fn=_identity,
                                       generator=torch.Generator().manual_seed(0), pin_memory=pin_memory, **kwargs)
