"""Evaluate a trained run on a store: one entry point, one function per task, results merged into RUN/eval.json.

``evaluate_run`` loads the run's latest checkpoint through ``train.model`` (never the training loop),
extracts features from each store a task reads (once per store), runs the tasks and merges their
entries into ``RUN/eval.json``: every task owns one top-level key (``knn``, ``zeroshot``, ``retrieval``,
``seg``, ``ensemble``, ``routing``), next to ``checkpoint_step``, the evaluated ``store``, the student-teacher ``cosine`` and
``relational_error`` on it. Each task is one function in ``TASKS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from storage.fingerprint import diff_but_policy
from storage.store import FeatureStore, StoreError
from train.config import TrainConfig
from train.distributed import use_device
from train.losses import relational_error
from train.rundir import RunDir, read_run

from .ensemble import confidence, fuse
from .features import StoreFeatures, extract_features, load_trained
from .knn import knn_accuracy, knn_votes
from .retrieval import cosine_matrix, recall_at, recall_from_scores
from .zeroshot import class_scores
from .zeroshot import predict as zs_predict

__all__ = ["EvalContext", "EvalError", "TASKS", "evaluate_run"]


class EvalError(ValueError):
    """An evaluation that cannot run as asked (unknown task, missing labels, ...); the message says why."""


@dataclass
class EvalContext:
    """What a task reads: the run, its model, the evaluated store (queries) and the neighbour bank."""

    run: Path
    cfg: TrainConfig
    teachers: list[str]
    model: torch.nn.Module
    device: torch.device
    store: str
    bank: str
    _features: dict[str, StoreFeatures] = field(default_factory=dict)

    def features(self, url: str) -> StoreFeatures:
        """Student, head and cached teacher features of every usable image of ``url`` (computed once)."""
        if url not in self._features:
            self._features[url] = extract_features(self.model, url, self.cfg, self.teachers, self.device)
        return self._features[url]


def _knn_sides(ctx: EvalContext):
    """(queries, bank, labelled-query mask, labelled-bank mask, self-exclusion indices or None)."""
    queries, neighbours = ctx.features(ctx.store), ctx.features(ctx.bank)
    qm, bm = queries.labels >= 0, neighbours.labels >= 0
    if not qm.any() or not bm.any():
        raise EvalError(f"kNN needs labels in both stores ({int(qm.sum())} labelled queries in {ctx.store}, "
                        f"{int(bm.sum())} labelled neighbours in {ctx.bank}); cache them with --labels")
    exclude = None
    if ctx.bank == ctx.store:  # the queries are in the bank: no image may vote for itself
        where = {int(r): j for j, r in enumerate(neighbours.rows[bm])}
        exclude = np.array([where.get(int(r), -1) for r in queries.rows[qm]])
    return queries, neighbours, qm, bm, exclude


def knn_task(ctx: EvalContext, k: int = 20, temperature: float = 0.07) -> dict:
    """Weighted kNN top-1 of each feature: labelled queries of the store against the labelled bank."""
    queries, neighbours, qm, bm, exclude = _knn_sides(ctx)
    top1 = {name: knn_accuracy(neighbours.features[name][bm], neighbours.labels[bm], feats[qm], queries.labels[qm],
                               k=k, temperature=temperature, exclude=exclude)
            for name, feats in queries.features.items()}
    return {"k": k, "temperature": temperature, "bank": ctx.bank, "queries": ctx.store, "self_excluded": exclude is not None,
            "bank_images": int(bm.sum()),
            "query_images": int(qm.sum()), "classes": int(len(np.unique(queries.labels[qm]))), "top1": top1}


def routing_task(ctx: EvalContext, max_images: int = 512, min_tokens: int = 16) -> dict:
    """Where an MoE student's tokens go on the evaluated store (``eval.routing``), with CKA heatmaps as PNGs."""
    from .routing import plot_cka, routing_analysis

    try:
        entry = routing_analysis(ctx.run, ctx.store, ctx.cfg, ctx.teachers, ctx.model, ctx.device,
                                 max_images=max_images, min_tokens=min_tokens)
    except ValueError as exc:
        raise EvalError(f"{ctx.run}: {exc}") from None
    entry["plots"] = [p.name for p in plot_cka(entry, ctx.run)]
    return entry


def _class_sets(ctx: EvalContext) -> dict[str, dict[str, tuple[np.ndarray, dict]]]:
    """Per teacher, its class-embedding sets (``classes`` or ``classifier``) from the evaluated store, else the bank's."""
    out: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
    for url in dict.fromkeys([ctx.store, ctx.bank]):
        store = FeatureStore.open(url)
        for t in ctx.teachers:
            for name, (emb, attrs) in store.text_sets(t).items():
                if attrs.get("kind") in ("classes", "classifier"):
                    out.setdefault(t, {}).setdefault(name, (emb, attrs))
    return out


def _aligned(attrs: dict, labels: np.ndarray, classes: int) -> np.ndarray | None:
    """The labelled images whose labels name the set's classes (class i = label i), or None when they do not."""
    labelled = labels >= 0
    if not attrs.get("label_aligned") or not labelled.any() or int(labels.max()) >= classes:
        return None
    return labelled


def zeroshot_task(ctx: EvalContext) -> dict:
    """Zero-shot top-1 of each head and its teacher through every class-embedding set of the teacher
    (``eval.zeroshot``): the head's agreement with the teacher's own prediction always, and accuracy where
    the store's labels are the set's classes."""
    sets = _class_sets(ctx)
    if not sets:
        raise EvalError(f"zero-shot needs class embeddings of a teacher of the run in {ctx.store} or {ctx.bank}: cache "
                        "them with `pipeline cache-teachers ... --text-classes FILE` (a text tower) or `--classifier` "
                        "(a classifier teacher)")
    feats = ctx.features(ctx.store)
    out = {"store": ctx.store, "images": int(len(feats.rows)), "sets": {}}
    for t, per in sets.items():
        for name, (emb, attrs) in per.items():
            teacher = zs_predict(feats.features[f"teacher/{t}"], emb, attrs)
            head = zs_predict(feats.features[f"student/{t}"], emb, attrs)
            entry = {"teacher": t, "kind": attrs.get("kind"), "score": attrs.get("score"), "classes": int(len(emb)),
                     "agreement": {f"student/{t}": float((head == teacher).mean())}}
            mask = _aligned(attrs, feats.labels, len(emb))
            if mask is not None:
                truth = feats.labels[mask]
                entry["labelled_images"] = int(mask.sum())
                entry["top1"] = {f"student/{t}": float((head[mask] == truth).mean()),
                                 f"teacher/{t}": float((teacher[mask] == truth).mean())}
            out["sets"][f"{t}/{name}"] = entry
    return out


def _caption_sets(ctx: EvalContext) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, list[int], dict]]:
    """Every caption set a teacher of the run caches in the evaluated store, restricted to its usable images:
    ``(teacher, set) -> (caption embeddings, caption -> image index, feature rows of those images, attrs)``."""
    store = FeatureStore.open(ctx.store)
    feats = ctx.features(ctx.store)
    position = {int(r): j for j, r in enumerate(feats.rows)}
    out = {}
    for t in ctx.teachers:
        for name, (emb, attrs) in store.text_sets(t).items():
            if attrs.get("kind") != "captions":
                continue
            rows = np.asarray(attrs["images"], np.int64)
            keep = np.array([int(r) in position for r in rows], bool)  # captions of usable images only
            used = sorted({position[int(r)] for r in rows[keep]})
            index = {j: i for i, j in enumerate(used)}
            caption_image = np.array([index[position[int(r)]] for r in rows[keep]], np.int64)
            out[(t, name)] = (emb[keep], caption_image, used, attrs)
    return out


def retrieval_task(ctx: EvalContext, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Image→text and text→image recall@k of each head and its teacher through every caption set a teacher
    of the run caches in the evaluated store (``eval.retrieval``); its images are that store's rows."""
    feats = ctx.features(ctx.store)
    out: dict = {"store": ctx.store, "sets": {}}
    for (t, name), (emb, caption_image, used, _) in _caption_sets(ctx).items():
        entry = {"teacher": t, "images": len(used), "captions": int(len(emb))}
        for side in ("student", "teacher"):
            result = recall_at(feats.features[f"{side}/{t}"][used], emb, caption_image, ks)
            for direction, values in result.items():
                entry.setdefault(direction, {})[f"{side}/{t}"] = values
        out["sets"][f"{t}/{name}"] = entry
    if not out["sets"]:
        raise EvalError(f"retrieval needs captions of a teacher of the run in {ctx.store}: cache them with "
                        "`pipeline cache-teachers ... --captions CSV` (columns path,caption) with a text-tower teacher")
    return out


def _ensemble_retrieval(ctx: EvalContext, gamma: float, eps: float, temperature: float = 0.01,
                        ks: tuple[int, ...] = (1, 5)) -> dict:
    """Retrieval with the heads' similarities fused (``eval.ensemble``) for caption sets that two or more teachers
    cache under one name with the same captions of the same images: per image over its caption scores
    (image→text) and per caption over its image scores (text→image)."""
    feats = ctx.features(ctx.store)
    groups: dict[tuple, list] = {}
    for (t, name), (emb, caption_image, used, attrs) in _caption_sets(ctx).items():
        key = (name, tuple(attrs.get("captions") or []), tuple(attrs.get("images") or []))
        groups.setdefault(key, []).append((t, emb, caption_image, used))
    out = {}
    for (name, _, _), members in groups.items():
        if len(members) < 2:
            continue
        caption_image, used = members[0][2], members[0][3]
        entry: dict = {"teachers": [m[0] for m in members], "temperature": temperature, "images": len(used),
                       "captions": int(len(caption_image))}
        for side in ("student", "teacher"):
            sims = [cosine_matrix(feats.features[f"{side}/{t}"][used], emb) for t, emb, _, _ in members]
            i2t, _ = fuse(sims, temperature, gamma, eps)
            t2i, _ = fuse([s.T for s in sims], temperature, gamma, eps)
            entry[side] = {**{f"{side}/{t}": recall_from_scores(s, s.T, caption_image, ks)
                              for (t, *_), s in zip(members, sims)},
                           "ensemble": recall_from_scores(i2t, t2i, caption_image, ks)}
        out[name] = entry
    return out


def ensemble_task(ctx: EvalContext, k: int = 20, temperature: float = 0.07, gamma: float = 1.0, eps: float = 1e-6
                  ) -> dict:
    """AMoE's entropy-weighted head ensembling (``eval.ensemble``), next to each head alone: kNN class
    posteriors of every head; zero-shot scores of the heads whose teachers cache a set of the same
    name and classes; retrieval similarities where they cache the same captions. The teachers' own
    summaries are ensembled the same way for reference."""
    out: dict = {"gamma": gamma, "eps": eps}
    heads = [f"student/{t}" for t in ctx.teachers]
    if len(heads) < 2:
        raise EvalError(f"ensembling needs two or more teacher heads; the run distils {', '.join(ctx.teachers)}")
    try:
        queries, neighbours, qm, bm, exclude = _knn_sides(ctx)
    except EvalError:
        queries = None
    if queries is not None:
        classes = int(max(neighbours.labels.max(), queries.labels.max())) + 1
        truth = queries.labels[qm]
        entry = {"k": k, "temperature": temperature, "query_images": int(qm.sum())}
        for side in ("student", "teacher"):
            names = [f"{side}/{t}" for t in ctx.teachers]
            posts = [confidence(knn_votes(neighbours.features[n][bm], neighbours.labels[bm], queries.features[n][qm],
                                          k=k, temperature=temperature, num_classes=classes, exclude=exclude), None)
                     for n in names]
            fused, weights = fuse(posts, None, gamma, eps)
            entry[side] = {**{n: float((p.argmax(1) == truth).mean()) for n, p in zip(names, posts)},
                           "ensemble": float((fused.argmax(1) == truth).mean()),
                           "mean_weight": {n: float(w.mean()) for n, w in zip(names, weights)}}
        out["knn"] = entry
    groups: dict[tuple, list[str]] = {}
    sets = _class_sets(ctx)
    for t, per in sets.items():
        for name, (emb, attrs) in per.items():
            groups.setdefault((name, tuple(attrs.get("classes") or [len(emb)]), attrs.get("score")), []).append(t)
    feats = ctx.features(ctx.store) if any(len(m) > 1 for m in groups.values()) else None
    for (name, _, score), members in groups.items():
        if len(members) < 2:
            continue
        temp = 0.01 if score == "cosine" else 1.0
        fused = {}
        for side in ("student", "teacher"):
            scores = [class_scores(feats.features[f"{side}/{t}"], *sets[t][name]) for t in members]
            fused[side], weights = fuse(scores, temp, gamma, eps)
            fused[side + "/heads"] = [s.argmax(1) for s in scores]
        reference = fused["teacher"].argmax(1)  # the teachers' ensembled prediction
        entry = {"teachers": members, "temperature": temp, "agreement_with_teacher_ensemble": {
            **{f"student/{t}": float((p == reference).mean()) for t, p in zip(members, fused["student/heads"])},
            "ensemble": float((fused["student"].argmax(1) == reference).mean())}}
        mask = _aligned(sets[members[0]][name][1], feats.labels, len(sets[members[0]][name][0]))
        if mask is not None:
            truth = feats.labels[mask]
            entry["top1"] = {side: {**{f"{side}/{t}": float((p[mask] == truth).mean())
                                       for t, p in zip(members, fused[side + "/heads"])},
                                    "ensemble": float((fused[side].argmax(1)[mask] == truth).mean())}
                             for side in ("student", "teacher")}
        out.setdefault("zeroshot", {})[name] = entry
    retrieval = _ensemble_retrieval(ctx, gamma, eps)
    if retrieval:
        out["retrieval"] = retrieval
    if not {"knn", "zeroshot", "retrieval"} & set(out):
        raise EvalError("ensembling needs labels in the store and the bank (kNN), or a class-embedding set (zero-shot) "
                        "or a caption set (retrieval) cached under the same name for two or more teachers")
    return out


def seg_task(ctx: EvalContext, store: str | None = None, train_share: float = 0.5, epochs: int = 10,
             batch_size: int = 32, lr: float = 1e-2, min_steps: int = 300, seed: int = 0,
             max_images: int | None = 2000) -> dict:
    """Dense linear probes (``eval.dense``) on the frozen patch features of the student backbone, each head
    (its teacher's raw space) and each cached teacher, against the masks of ``store`` (default: the evaluated
    store): mIoU for class masks, RMSE for value masks (e.g. depth). The store's masked images are split
    (seeded) into the probe's training images and the measured ones."""
    from storage.reader import StoreReader

    from .dense import confusion_matrix, fit_probe, iou_per_class, predict_dense, rmse
    from .features import extract_patch_features

    url = store or ctx.store
    if not 0 < train_share < 1:
        raise EvalError(f"seg train_share must lie in (0, 1), got {train_share}")
    reader = StoreReader(url, ctx.teachers)
    info = reader.mask_info
    if info is None:
        raise EvalError(f"seg needs per-pixel masks in {url}: cache its images with `pipeline cache-teachers IMAGES "
                        "--masks CSV` (e.g. from `pipeline data segmentation`) and pass it with --seg-store")
    if url != ctx.store and url != ctx.bank:
        check_teachers(read_run(ctx.run)[1], url)
    masked = np.flatnonzero(reader.ok & (np.diff(reader.mask_offsets) > 0))
    rng = np.random.default_rng(seed)
    if max_images is not None and len(masked) > max_images:
        masked = np.sort(rng.choice(masked, max_images, replace=False))
    n_train = int(round(len(masked) * train_share))
    if n_train < 1 or n_train >= len(masked):
        raise EvalError(f"seg needs masked images to train the probe and to measure it; {url} has {len(masked)}")
    order = rng.permutation(len(masked))
    train_rows, test_rows = set(masked[order[:n_train]].tolist()), set(masked[order[n_train:]].tolist())
    keep = np.zeros(len(reader), bool)
    keep[masked] = True
    feats = extract_patch_features(ctx.model, url, ctx.cfg, ctx.teachers, ctx.device, keep=keep)
    masks = dict(zip(feats.rows.tolist(), reader.masks(feats.rows)))
    split = {side: [j for j, r in enumerate(feats.rows.tolist()) if r in rows]
             for side, rows in (("train", train_rows), ("test", test_rows))}
    targets = {side: [masks[int(feats.rows[j])] for j in idx] for side, idx in split.items()}
    grids = {side: [feats.grids[j] for j in idx] for side, idx in split.items()}
    num_classes = max(len(info.classes), int(max(t[t != info.ignore].max(initial=0) for t in masks.values())) + 1)
    entry: dict = {"store": url, "kind": info.kind, "train_images": len(split["train"]),
                   "test_images": len(split["test"]), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "min_steps": min_steps,
                   "seed": seed}
    if info.kind == "classes":
        names = list(info.classes) + [str(c) for c in range(len(info.classes), num_classes)]
        entry.update(classes=names, miou={}, pixel_accuracy={}, iou={})
        if not any((t != info.ignore).any() for t in targets["test"]):
            raise EvalError(f"seg: no labelled pixel among the {len(split['test'])} measured images of {url}")
        counts = sum(np.bincount(t[t != info.ignore].ravel(), minlength=num_classes) for t in targets["train"])
        majority = confusion_matrix([np.full(t.shape, int(np.argmax(counts))) for t in targets["test"]],
                                    targets["test"], num_classes, info.ignore)  # the no-information reference
        entry["majority_class"] = {"class": int(np.argmax(counts)), "miou": float(np.nanmean(iou_per_class(majority))),
                                   "pixel_accuracy": float(np.trace(majority) / max(majority.sum(), 1))}
    else:
        entry.update(scale=info.scale, rmse={})
        train_values = np.concatenate([t[t != info.ignore] for t in targets["train"]]) / info.scale
        entry["rmse_of_train_mean"] = rmse([np.full(t.shape, train_values.mean()) for t in targets["test"]],
                                           targets["test"], info.ignore, info.scale)
    for name, per_image in feats.features.items():
        probe = fit_probe([per_image[j] for j in split["train"]], grids["train"], targets["train"], kind=info.kind,
                          num_classes=num_classes, ignore=info.ignore, scale=info.scale, epochs=epochs,
                          batch_size=batch_size, lr=lr, min_steps=min_steps, seed=seed)
        preds = predict_dense(probe, [per_image[j] for j in split["test"]], grids["test"],
                              [t.shape for t in targets["test"]])
        if info.kind == "classes":
            conf = confusion_matrix(preds, targets["test"], num_classes, info.ignore)
            iou = iou_per_class(conf)
            entry["miou"][name] = float(np.nanmean(iou))
            entry["pixel_accuracy"][name] = float(np.trace(conf) / max(conf.sum(), 1))
            entry["iou"][name] = [None if np.isnan(v) else float(v) for v in iou]
        else:
            entry["rmse"][name] = rmse(preds, targets["test"], info.ignore, info.scale)
    return entry


TASKS: dict[str, Callable[..., dict]] = {"knn": knn_task, "zeroshot": zeroshot_task, "retrieval": retrieval_task,
                                         "seg": seg_task, "ensemble": ensemble_task, "routing": routing_task}


def relational_errors(feats: StoreFeatures, most: int = 4096, seed: int = 0) -> dict[str, float]:
    """Per head: mean |d^S − d^T| of the mean-normalized pairwise distances between images (ARKD's view of
    geometry, AMoE suppl. §7), over the store's images (a seeded sample of ``most`` when there are more)."""
    n = len(feats.rows)
    pick = np.sort(np.random.default_rng(seed).choice(n, most, replace=False)) if n > most else np.arange(n)
    out = {}
    for name, teacher in feats.features.items():
        if name.startswith("teacher/") and f"student/{name[8:]}" in feats.features:
            student = feats.features[f"student/{name[8:]}"]
            out[name[8:]] = (relational_error(torch.from_numpy(student[pick]), torch.from_numpy(teacher[pick]))
                             if len(pick) >= 2 else None)  # no pair: nothing to compare (JSON has no NaN)
    return out


def check_teachers(record: dict, url: str) -> None:
    """Refuse a store whose teachers are not the ones the run was trained on (same name, other targets).

    Heads predict in their teacher's space: compared with another teacher's targets they give numbers
    that look like results and mean nothing.
    """
    store = FeatureStore.open(url)
    have = store.fingerprint()["teachers"]
    trained = record["fingerprint"]["teachers"]
    for name in record["teachers"]:
        if name not in have:
            raise EvalError(f"{url} has no complete teacher '{name}' (the run distils {', '.join(record['teachers'])})")
        if have[name] != trained[name]:
            try:
                before = (record.get("teacher_fingerprints") or {}).get(name) or \
                    FeatureStore.open(record["url"]).teacher_attrs(name)["fingerprint"]
                changes = diff_but_policy(before, store.teacher_attrs(name)["fingerprint"])
                if not changes:
                    continue  # the same teacher: cached at another image size, or before a fingerprint field existed
                what = "; ".join(changes)
            except (StoreError, KeyError, OSError):
                what = f"fingerprint digest {have[name][:12]} != {trained[name][:12]}"
            raise EvalError(f"teacher '{name}' of {url} is not the one the run was trained on ({record['url']}): "
                            f"{what}")


def evaluate_run(run: Path, store: str, tasks: list[str] | tuple[str, ...] = ("knn",), *, bank: str | None = None,
                 device: str = "auto", options: dict[str, dict] | None = None) -> dict:
    """Evaluate ``run``'s latest checkpoint on ``store``; returns this evaluation's entries, also merged
    into ``RUN/eval.json``. ``bank`` (kNN neighbours) defaults to the run's training store;
    ``options[task]`` are that task's keyword arguments (e.g. ``{"knn": {"k": 20}}``)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown task(s) {unknown or tasks!r}; available: {', '.join(TASKS)}")
    cfg, record = read_run(run)
    for url in dict.fromkeys([store, bank or record["url"]]):
        check_teachers(record, url)
    dev = use_device(device)
    model, meta = load_trained(run, store, cfg, record["teachers"], dev)
    ctx = EvalContext(run, cfg, record["teachers"], model, dev, store, bank or record["url"])
    result = {"checkpoint_step": meta["step"], "teachers": list(record["teachers"]), "store": store}
    for task in tasks:
        result[task] = TASKS[task](ctx, **(options or {}).get(task, {}))
    result["cosine"] = ctx.features(store).cosine
    result["relational_error"] = relational_errors(ctx.features(store))
    path = RunDir(run).eval
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous.get("store", store) != store:  # entries of one eval.json always describe one evaluated store
        previous = {}
    path.write_text(json.dumps({**previous, **result}, indent=1))
    return result
