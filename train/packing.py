"""Token-balanced sequence packing (AMoE §3.2, after NaViT's Patch n' Pack).

Images of different resolutions are packed into ``seqs`` sequences of exactly ``seq_len`` token slots
per microbatch, so every step costs the same compute whatever the resolution mix; attention is kept
inside each image by the ``doc_ids`` of ``PackedLayout``. Plans only need each image's token count,
which the store keeps in ``images/grid``: the whole data order of a run can be replayed from metadata,
which is what makes resuming mid-epoch exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

__all__ = ["Microbatch", "PackedLayout", "pack_stream", "padded_stream", "build_layout", "grid_coords", "patchify"]


@dataclass(frozen=True)
class Microbatch:
    """One microbatch plan: store rows per sequence; ``index`` counts microbatches since the run began."""

    index: int
    epoch: int
    sequences: tuple[tuple[int, ...], ...]
    seq_len: int  # token slots per sequence (for padded batching: the longest image in the batch)

    @property
    def rows(self) -> list[int]:
        return [r for seq in self.sequences for r in seq]

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.sequences)


def pack_stream(stream: Iterable[tuple[int, int]], tokens_of: Callable[[int], int], *, seq_len: int, seqs: int,
                max_images: int, start_index: int = 0) -> Iterator[Microbatch]:
    """First-fit packing of a (epoch, row) stream into microbatches of ``seqs`` sequences.

    Each image goes to the first open sequence with room (tokens and image count); when none has room
    the microbatch is emitted and a new one starts with that image. Stream order is otherwise kept, so
    the packing is deterministic and images are never dropped.
    """
    if seqs <= 0 or max_images <= 0 or seq_len <= 0:
        raise ValueError(f"bad packing shape: seq_len={seq_len}, seqs={seqs}, max_images={max_images}")
    index = start_index
    open_seqs: list[list[int]] = []
    used: list[int] = []
    epoch0 = None
    for epoch, row in stream:
        n = tokens_of(row)
        if n > seq_len:
            raise ValueError(f"image {row} needs {n} tokens, more than seq_len={seq_len}: raise seq_len")
        if epoch0 is None:
            epoch0 = epoch
        slot = next((k for k in range(len(open_seqs)) if used[k] + n <= seq_len and len(open_seqs[k]) < max_images), None)
        if slot is None and len(open_seqs) < seqs:
            open_seqs.append([])
            used.append(0)
            slot = len(open_seqs) - 1
        if slot is None:
            yield Microbatch(index, epoch0, tuple(tuple(s) for s in open_seqs), seq_len)
            index += 1
            open_seqs, used, epoch0 = [[]], [0], epoch
            slot = 0
        open_seqs[slot].append(row)
        used[slot] += n
    if open_seqs:  # a finite stream (evaluation) ends with a partly filled microbatch
        yield Microbatch(index, epoch0, tuple(tuple(s) for s in open_seqs), seq_len)


def padded_stream(stream: Iterable[tuple[int, int]], tokens_of: Callable[[int], int], *, images: int,
                  start_index: int = 0) -> Iterator[Microbatch]:
    """The baseline AMoE compares against: ``images`` images per batch, each padded to the longest."""
    index, batch, longest, epoch0 = start_index, [], 0, None
    for epoch, row in stream:
        epoch0 = epoch if epoch0 is None else epoch0
        batch.append(row)
        longest = max(longest, tokens_of(row))
        if len(batch) == images:
            yield Microbatch(index, epoch0, tuple((r,) for r in batch), longest)
            index, batch, longest, epoch0 = index + 1, [], 0, None
    if batch:
        yield Microbatch(index, epoch0, tuple((r,) for r in batch), longest)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """``[3, H, W] -> [gh*gw, 3*patch*patch]`` in row-major patch order (the layout's patch order),
    channels outermost per patch."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


def grid_coords(gh: int, gw: int) -> np.ndarray:
    """Patch-centre coordinates normalized per image to [-1, 1] on both axes (AMoE suppl. §8), [gh*gw, 2] (y, x)."""
    y = (2 * np.arange(gh) + 1) / gh - 1
    x = (2 * np.arange(gw) + 1) / gw - 1
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)


@dataclass
class PackedLayout:
    """Where every token of a microbatch sits in the ``[seqs, seq_len]`` slot grid (flat slot indices).

    Per image: CLS, then its registers, then its patches in row-major order. ``doc_ids`` is the image
    index of each slot (-1 for padding), from which attention masks are built.
    """

    doc_ids: torch.Tensor  # [S, L] int64
    coords: torch.Tensor  # [S*L, 2] float32, (y, x); zero for CLS, registers and padding
    cls_pos: torch.Tensor  # [B]
    reg_pos: torch.Tensor  # [B, R]
    patch_pos: torch.Tensor  # [T] in image order, then row-major inside each image
    patch_image: torch.Tensor  # [T] image index of each patch token
    grids: torch.Tensor  # [B, 2]

    @property
    def num_images(self) -> int:
        return int(self.grids.shape[0])

    def to(self, device) -> "PackedLayout":
        return PackedLayout(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def build_layout(sequences: list[list[tuple[int, int]]], seq_len: int, registers: int) -> PackedLayout:
    """Layout of a microbatch given the (gh, gw) grid of each image, sequence by sequence."""
    prefix = 1 + registers
    num_seqs = len(sequences)
    doc_ids = np.full((num_seqs, seq_len), -1, np.int64)
    coords = np.zeros((num_seqs * seq_len, 2), np.float32)
    cls_pos, reg_pos, patch_pos, patch_image, grids = [], [], [], [], []
    image = 0
    for s, seq in enumerate(sequences):
        cursor = s * seq_len
        for gh, gw in seq:
            n = prefix + gh * gw
            if cursor + n > (s + 1) * seq_len:
                raise ValueError(f"sequence {s} overflows seq_len={seq_len}")
            doc_ids.reshape(-1)[cursor:cursor + n] = image
            cls_pos.append(cursor)
            reg_pos.append(np.arange(cursor + 1, cursor + prefix))
            pos = np.arange(cursor + prefix, cursor + n)
            patch_pos.append(pos)
            patch_image.append(np.full(gh * gw, image))
            coords[pos] = grid_coords(gh, gw)
            grids.append((gh, gw))
            cursor += n
            image += 1
    return PackedLayout(
        doc_ids=torch.from_numpy(doc_ids),
        coords=torch.from_numpy(coords),
        cls_pos=torch.tensor(cls_pos, dtype=torch.int64),
        reg_pos=torch.from_numpy(np.stack(reg_pos).astype(np.int64)) if reg_pos else torch.zeros(0, registers, dtype=torch.int64),
        patch_pos=torch.from_numpy(np.concatenate(patch_pos).astype(np.int64)),
        patch_image=torch.from_numpy(np.concatenate(patch_image).astype(np.int64)),
        grids=torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
    )
