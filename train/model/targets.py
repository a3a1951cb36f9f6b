"""What the trainer learns from the store about each teacher: dims, PHI-S spaces, frozen summary pool.

Only ``storage`` is read here (never a teacher library): the store is the one channel through which
teacher knowledge reaches training (docs/store-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from storage import layout as L
from storage.phis import PhisTransform
from storage.store import FeatureStore

from .heads import FrozenSummaryPool, TeacherDims, build_frozen_pool

__all__ = ["FeatureSpace", "TeacherTargets", "load_teacher_targets"]


class FeatureSpace(nn.Module):
    """y = (x − μ)·Wᵀ into PHI-S space and x = y·Uᵀ + μ back; the identity without statistics.

    The buffers are always applied (identity buffers give x exactly): a checkpoint's spaces are what
    a loaded model uses, even when the store it was rebuilt from has no statistics (a run started
    ``--init-from`` a run with PHI-S, or evaluated on a store cached without them)."""

    def __init__(self, transform: PhisTransform | None, dim: int):
        super().__init__()
        self.method = transform.method if transform is not None else "identity"
        if transform is None:
            mean, whiten, unwhiten = np.zeros(dim), np.eye(dim), np.eye(dim)
        else:
            mean, whiten, unwhiten = transform.mean, transform.whiten, transform.unwhiten
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("whiten", torch.as_tensor(whiten, dtype=torch.float32))
        self.register_buffer("unwhiten", torch.as_tensor(unwhiten, dtype=torch.float32))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # in float32 also inside a bf16 forward
            return (x.to(self.mean.dtype) - self.mean) @ self.whiten.T

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            return y.to(self.mean.dtype) @ self.unwhiten.T + self.mean


@dataclass
class TeacherTargets:
    spec: TeacherDims
    spaces: dict[str, FeatureSpace]  # "summary", "patches"; registers always stay raw (AMoE suppl. §6)
    pool: FrozenSummaryPool | None
    fingerprint_digest: str


def load_teacher_targets(store: FeatureStore, name: str, *, phis: bool = True) -> TeacherTargets:
    if not store.has_teacher(name):
        raise ValueError(f"teacher {name!r} is not in the store (it has: {', '.join(store.teacher_names) or 'none'})")
    attrs = store.teacher_attrs(name)
    if not attrs.get("complete"):
        raise ValueError(f"teacher {name!r} is incomplete in the store: finish its cache-teachers run first")
    dims = attrs["dims"]
    regs = int(attrs.get("num_registers", 0))
    spec = TeacherDims(name, int(dims["summary"]), int(dims["patches"]), regs, int(dims["patches"]) if regs else 0)
    spaces = {}
    for feature in L.PHIS_FEATURES:
        transform = None
        if phis and store.exists(f"{L.TEACHERS}/{name}/{L.PHIS}/{feature}.npz"):
            transform = PhisTransform.load(store.phis_path(name, feature))
        spaces[feature] = FeatureSpace(transform, spec.summary_dim if feature == L.SUMMARY else spec.patch_dim)
    pool = None
    group = store.teacher_group(name)
    if L.HEADS in group:
        heads = group[L.HEADS]
        config = dict(heads.attrs).get("config") or {}
        if config.get("attn_pool"):
            tensors = {k: torch.from_numpy(np.asarray(heads[k][...])) for k in heads.array_keys()}
            pool = build_frozen_pool(tensors, config)
    return TeacherTargets(spec, spaces, pool, attrs.get("fingerprint_digest", ""))
