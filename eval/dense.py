"""Dense linear probes on frozen patch features: segmentation (mIoU) and per-pixel regression (RMSE).

The probe is one linear map from a patch feature to C class logits (or one value), applied to every
patch token; its [gh, gw] output is upsampled bilinearly to the labelled pixels (align_corners=False)
and trained against every labelled pixel, as the linear segmentation probes of DINOv2 and AMoE §5 do
(AMoE: 10 epochs, batch 32). Training reads the loss on every ``train_stride``-th pixel row and column
(the centre pixel of each stride x stride block; the bilinear weights of exactly those pixels, so their
logits equal the full upsampling's): a regular sample of the per-pixel loss at 1/stride² of the cost.
Test predictions are made at every pixel. Features are standardized per channel (train-split statistics) so that one
learning rate suits every feature space; a regression target is standardized the same way and the
prediction mapped back. Ignored pixels (255, 65535: ``storage.masks``) count nowhere.

mIoU: per class c, IoU_c = TP_c / (TP_c + FP_c + FN_c) over all test pixels (one confusion matrix for
the split, not per image), averaged over the classes that occur in the labels or the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DenseProbe", "bilinear_weights", "confusion_matrix", "fit_probe", "iou_per_class", "predict_dense", "rmse"]


@dataclass
class DenseProbe:
    linear: torch.nn.Linear
    mean: torch.Tensor  # [D] feature standardization
    std: torch.Tensor
    kind: str  # "classes" or "values"
    target_mean: float = 0.0  # values: the prediction is out * target_std + target_mean
    target_std: float = 1.0


def _pixel_output(probe: DenseProbe, feats: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] logits (or [1, H, W] standardized values) of one image from its [gh*gw, D] features."""
    gh, gw = grid
    out = probe.linear((feats - probe.mean) / probe.std)  # [gh*gw, C]
    out = out.T.reshape(1, -1, gh, gw)
    return F.interpolate(out, size=size, mode="bilinear", align_corners=False)[0]


def bilinear_weights(rows: np.ndarray, n_in: int, n_out: int) -> torch.Tensor:
    """[len(rows), n_in] weights of output positions ``rows`` of a 1-D bilinear resize from ``n_in`` to ``n_out``
    samples, as ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (source position
    (y + 0.5) · n_in / n_out − 0.5, clamped at 0; neighbours floor and floor + 1, clamped at the end)."""
    src = np.maximum((np.asarray(rows, np.float64) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((len(rows), n_in))
    np.add.at(w, (np.arange(len(rows)), lo), 1 - frac)
    np.add.at(w, (np.arange(len(rows)), hi), frac)
    return torch.from_numpy(w).float()


@dataclass
class _TrainImage:
    feats: torch.Tensor  # [gh*gw, D]
    grid: tuple[int, int]
    rows: torch.Tensor  # [h', gh] bilinear weights of the sampled pixel rows
    cols: torch.Tensor  # [w', gw]
    target: torch.Tensor  # [h', w'] class index or real value
    valid: torch.Tensor  # [h', w'] labelled


def _train_image(feats: np.ndarray, grid: tuple[int, int], target: np.ndarray, kind: str, ignore: int, scale: float,
                 stride: int) -> _TrainImage:
    h, w = target.shape
    ys, xs = np.arange(min(stride // 2, h - 1), h, stride), np.arange(min(stride // 2, w - 1), w, stride)
    sub = target[np.ix_(ys, xs)]
    value = torch.from_numpy(sub.astype(np.int64))
    return _TrainImage(torch.from_numpy(feats).float(), grid, bilinear_weights(ys, grid[0], h),
                       bilinear_weights(xs, grid[1], w), value if kind == "classes" else value.float() / scale,
                       torch.from_numpy(sub != ignore))


def _loss(probe: DenseProbe, im: _TrainImage) -> torch.Tensor:
    """Summed loss over the sampled labelled pixels of one image."""
    gh, gw = im.grid
    logits = probe.linear((im.feats - probe.mean) / probe.std).reshape(gh, gw, -1)
    out = torch.einsum("yh,hwc,xw->cyx", im.rows, logits, im.cols)
    if probe.kind == "classes":
        return F.cross_entropy(out[None], torch.where(im.valid, im.target, -100)[None], ignore_index=-100,
                               reduction="sum")
    z = (im.target[im.valid] - probe.target_mean) / probe.target_std
    return ((out[0][im.valid] - z) ** 2).sum()


def fit_probe(features: list[np.ndarray], grids: list[tuple[int, int]], targets: list[np.ndarray], *, kind: str,
              num_classes: int, ignore: int, scale: float = 1.0, epochs: int = 10, batch_size: int = 32,
              lr: float = 1e-2, weight_decay: float = 1e-4, min_steps: int = 300, train_stride: int = 4,
              seed: int = 0) -> DenseProbe:
    """Train a linear probe: ``features[i]`` [gh*gw, D] of image i, ``targets[i]`` its [H, W] mask (class
    indices, or stored values that ``scale`` divides into the target); AdamW, cosine schedule, seeded.

    ``epochs`` at ``batch_size`` is AMoE's protocol (10 at 32), made for ADE20K-size sets (~6k steps); on
    a small set the epochs are raised until the probe takes ``min_steps`` optimizer steps, else it stops
    far from its optimum and measures the schedule rather than the features."""
    if not features or len(features) != len(targets) or len(grids) != len(features):
        raise ValueError("a dense probe needs one feature map, grid and target per image, and at least one image")
    if kind not in ("classes", "values"):
        raise ValueError(f"probe kind must be classes or values, got {kind!r}")
    if train_stride < 1:
        raise ValueError(f"train_stride must be at least 1, got {train_stride}")
    gen = torch.Generator().manual_seed(seed)
    flat = torch.from_numpy(np.concatenate(features)).double()
    images = [_train_image(f, g, t, kind, ignore, scale, train_stride) for f, g, t in zip(features, grids, targets)]
    images = [im for im in images if im.valid.any()]
    if not images:
        raise ValueError("no labelled pixel to fit the probe on")
    probe = DenseProbe(torch.nn.Linear(flat.shape[1], num_classes if kind == "classes" else 1),
                       flat.mean(0).float(), flat.std(0).clamp_min(1e-6).float(), kind)
    torch.nn.init.normal_(probe.linear.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(probe.linear.bias)
    if kind == "values":
        values = torch.cat([im.target[im.valid] for im in images]).double()
        probe.target_mean, probe.target_std = float(values.mean()), max(float(values.std()), 1e-6)
    per_epoch = -(-len(images) // batch_size)
    epochs = max(epochs, -(-min_steps // per_epoch))
    opt = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen).tolist()
        for b in range(0, len(order), batch_size):
            batch = [images[i] for i in order[b:b + batch_size]]
            loss = sum(_loss(probe, im) for im in batch) / sum(int(im.valid.sum()) for im in batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe


@torch.no_grad()
def predict_dense(probe: DenseProbe, features: list[np.ndarray], grids: list[tuple[int, int]],
                  sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """[H, W] predictions per image: class indices (int64) or target values (real units)."""
    preds = []
    for f, g, size in zip(features, grids, sizes):
        out = _pixel_output(probe, torch.from_numpy(f).float(), g, size)
        if probe.kind == "classes":
            preds.append(out.argmax(0).numpy())
        else:
            preds.append((out[0] * probe.target_std + probe.target_mean).numpy())
    return preds


def confusion_matrix(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int, ignore: int) -> np.ndarray:
    """[C, C] pixel counts, rows = true class, columns = predicted; ignored pixels left out."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for p, t in zip(preds, targets):
        valid = t != ignore
        if (t[valid] >= num_classes).any():
            raise ValueError(f"a mask holds class {int(t[valid].max())}, beyond the {num_classes} classes")
        conf += np.bincount(t[valid].astype(np.int64) * num_classes + p[valid].astype(np.int64),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return conf


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class (NaN where the class occurs neither in the labels nor in the predictions)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def rmse(preds: list[np.ndarray], targets: list[np.ndarray], ignore: int, scale: float = 1.0) -> float:
    """Root mean squared error over every labelled pixel of the split (targets: stored values / ``scale``)."""
    err, count = 0.0, 0
    for p, t in zip(preds, targets):
        valid = t != ignore
        err += float(((p[valid] - t[valid].astype(np.float64) / scale) ** 2).sum())
        count += int(valid.sum())
    if not count:
        raise ValueError("no labelled pixel to measure the error on")
    return float(np.sqrt(err / count))
