"""Zero-shot classification from cached class embeddings and AMoE's entropy-weighted head ensembling
(eval/zeroshot.py, eval/ensemble.py): against naive float64 loops, the wrapped library's text tower on the
stored pixels, and a trained run's eval.json recomputed from its features."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from eval.ensemble import fuse
from eval.zeroshot import class_scores, predict
from train_helpers import train_tiny


def test_class_scores_are_cosines_or_the_classifiers_logits():
    rng = np.random.default_rng(0)
    f, e, b = rng.normal(size=(5, 7)), rng.normal(size=(3, 7)), rng.normal(size=3)
    cos = class_scores(f, e, {"score": "cosine"})
    logit = class_scores(f, e, {"score": "logit", "bias": list(b)})
    for i in range(5):
        for c in range(3):
            assert cos[i, c] == pytest.approx(float(f[i] @ e[c] / np.linalg.norm(f[i]) / np.linalg.norm(e[c])))
            assert logit[i, c] == pytest.approx(float(f[i] @ e[c] + b[c]))
    assert (predict(3 * f, e, {"score": "cosine"}) == cos.argmax(1)).all()  # scale-free
    with pytest.raises(ValueError, match="width 7 cannot be scored against class embeddings of width 6"):
        class_scores(f, e[:, :6], {"score": "cosine"})


def _naive_fuse(scores, temperature, gamma, eps):
    """AMoE's ensembling input by input and head by head (float64)."""
    n, c = scores[0].shape
    out = np.zeros((n, c))
    for x in range(n):
        inv = []
        for s in scores:
            z = np.array(s[x], np.float64)
            p = z / z.sum() if temperature is None else np.exp(z / temperature) / np.exp(z / temperature).sum()
            h = -sum(v * math.log(v) for v in p if v > 0)
            inv.append((h + eps) ** -gamma)
        for w, s in zip(inv, scores):
            out[x] += w / sum(inv) * np.asarray(s[x], np.float64)
    return out


def test_ensembling_equals_a_float64_loop_and_follows_the_confident_head():
    rng = np.random.default_rng(1)
    heads = [rng.normal(size=(6, 4)) * 0.05 for _ in range(3)]
    for temperature, gamma in ((0.01, 1.0), (1.0, 2.0)):
        fused, weights = fuse(heads, temperature, gamma, 1e-6)
        np.testing.assert_allclose(fused, _naive_fuse(heads, temperature, gamma, 1e-6), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(weights.sum(0), 1.0)
    posteriors = [rng.dirichlet(np.ones(4), size=6) for _ in range(2)]
    np.testing.assert_allclose(fuse(posteriors, None)[0], _naive_fuse(posteriors, None, 1.0, 1e-6), rtol=1e-10)
    sure, unsure = np.eye(4)[[0, 1, 2, 3, 0, 1]] * 0.9 + 0.025, np.full((6, 4), 0.25)
    fused, weights = fuse([unsure, sure], None)
    assert (fused.argmax(1) == sure.argmax(1)).all() and (weights[1] > 0.7).all()
    same, _ = fuse([sure, sure], None)
    np.testing.assert_allclose(same, sure)
    with pytest.raises(ValueError, match="same"):
        fuse([sure, sure[:3]], None)


def test_the_text_towers_class_set_and_zeroshot_equal_open_clip_on_the_stored_pixels(train_store):
    """The cached class embeddings are open_clip's own (templates x names, each normalized, averaged, normalized),
    and zero-shot through them on the cached summary scores each stored image as open_clip's encode_image does."""
    from open_clip.tokenizer import SimpleTokenizer

    from train_helpers import TINY_SIGLIP
    from stages.teachers import build_teacher
    from stages.teachers.base import resize_pixels
    from storage import layout as L
    from storage.image_policy import ImagePolicy
    from storage.store import FeatureStore

    store = FeatureStore.open(train_store)
    emb, attrs = store.text_sets("siglip")["classes"]
    assert attrs["kind"] == "classes" and attrs["label_aligned"] and len(attrs["classes"]) == 10
    teacher = build_teacher(TINY_SIGLIP, random_init=True, seed=0)
    tokenizer = SimpleTokenizer(context_length=16, clean="canonicalize")
    with torch.no_grad():
        rows = []
        for name in attrs["classes"]:
            t = teacher.model.encode_text(tokenizer([tpl.format(name) for tpl in attrs["templates"]]), normalize=True)
            rows.append(torch.nn.functional.normalize(t.mean(0), dim=0))
    np.testing.assert_allclose(emb, torch.stack(rows).numpy(), atol=1e-5)
    ok, offsets = store.image_array(L.OK)[:], store.image_array(L.PIXEL_OFFSETS)[:]
    summary = store.teacher_group("siglip")[L.SUMMARY]
    for i in np.flatnonzero(ok)[:12]:
        pixels = ImagePolicy.decode(store.image_array(L.PIXELS)[offsets[i]: offsets[i + 1]])
        x = resize_pixels(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].contiguous(),
                          teacher.image_size, teacher.mean, teacher.std)  # SigLIP's fixed input (64 x 64 here)
        with torch.no_grad():
            image = torch.nn.functional.normalize(teacher.model.encode_image(x), dim=-1)[0].double().numpy()
        library = emb.astype(np.float64) @ image
        ours = class_scores(summary[i: i + 1].astype(np.float32), emb, attrs)[0]
        np.testing.assert_allclose(ours, library, atol=3e-3)
        top2 = np.sort(library)[-2:]
        if top2[1] - top2[0] > 6e-3:
            assert ours.argmax() == library.argmax()


def test_eval_zeroshot_and_ensemble_equal_a_recomputation_from_the_features(train_store, tmp_path):
    """A store copy where dino also holds a set of the same ten classes (random embeddings of its width), so the
    zero-shot ensemble has two heads; every number of eval.json recomputed from the extracted features."""
    from eval.evaluate import EvalError, evaluate_run
    from eval.features import extract_features, load_trained
    from storage.store import FeatureStore
    from train.rundir import read_run

    store = str(tmp_path / "store")
    shutil.copytree(train_store, store)
    siglip_emb, siglip_attrs = FeatureStore.open(store).text_sets("siglip")["classes"]
    dino_emb = np.random.default_rng(0).normal(size=(10, 48)).astype(np.float32)
    FeatureStore.open(store, mode="r+").write_text("dino", "classes", dino_emb, {**siglip_attrs, "templates": []})
    run = tmp_path / "run"
    train_tiny(store, run)
    result = evaluate_run(run, store, ["zeroshot", "ensemble"], device="cpu")
    cfg, record = read_run(run)
    model, _ = load_trained(run, store, cfg, record["teachers"], torch.device("cpu"))
    feats = extract_features(model, store, cfg, record["teachers"], torch.device("cpu"))
    sets = {"dino": dino_emb, "siglip": siglip_emb}
    labelled = feats.labels >= 0
    truth = feats.labels[labelled]
    for t, emb in sets.items():
        entry = result["zeroshot"]["sets"][f"{t}/classes"]
        cos = lambda f: (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T  # noqa: E731
        head, teacher = cos(feats.features[f"student/{t}"]).argmax(1), cos(feats.features[f"teacher/{t}"]).argmax(1)
        assert entry["agreement"][f"student/{t}"] == pytest.approx(float((head == teacher).mean()))
        assert entry["top1"][f"teacher/{t}"] == pytest.approx(float((teacher[labelled] == truth).mean()))
        assert entry["labelled_images"] == int(labelled.sum()) == 40
    # zero-shot ensemble of the two heads (T = 0.01 for cosines), against the naive fusion
    naive = {side: _naive_fuse([class_scores(feats.features[f"{side}/{t}"], sets[t], {"score": "cosine"})
                                for t in ("dino", "siglip")], 0.01, 1.0, 1e-6) for side in ("student", "teacher")}
    zs = result["ensemble"]["zeroshot"]["classes"]
    assert zs["teachers"] == ["dino", "siglip"]
    assert zs["agreement_with_teacher_ensemble"]["ensemble"] == pytest.approx(
        float((naive["student"].argmax(1) == naive["teacher"].argmax(1)).mean()))
    assert zs["top1"]["teacher"]["ensemble"] == pytest.approx(float((naive["teacher"].argmax(1)[labelled] == truth).mean()))
    # kNN ensemble (queries = bank = the store: no image votes for itself), against naive votes and fusion; on
    # the teachers' side, whose features separate the digits (the 2-step student's are still nearly all alike)
    knn = result["ensemble"]["knn"]
    x = {h: feats.features[h][labelled] / np.linalg.norm(feats.features[h][labelled], axis=1, keepdims=True)
         for h in ("teacher/dino", "teacher/siglip")}
    # a query whose 20th and 21st neighbours are equally similar (to float32 rounding) has no defined top 20:
    # faiss' float32 order and this float64 one may pick either, so such queries may differ, and only they.
    # (With torch 2.14 / timm of 2026-12 the random tiny teachers' summaries are nearly parallel and every query
    # is such a tie, which leaves this check without force on this data; the fusion is checked above.)
    posts, ambiguous = [], np.zeros(len(truth), bool)
    for h in x:
        votes = np.zeros((len(truth), 10))
        for i in range(len(truth)):
            sims = x[h] @ x[h][i]
            sims[i] = -np.inf
            ranked = np.argsort(-sims, kind="stable")
            ambiguous[i] |= bool(abs(sims[ranked[19]] - sims[ranked[20]]) < 1e-5)
            for j in ranked[:20]:
                votes[i, truth[j]] += np.exp(sims[j] / 0.07)
        posts.append(votes / votes.sum(1, keepdims=True))
        slack = (1 + ambiguous.sum()) / len(truth)
        assert knn["teacher"][h] == pytest.approx(float((posts[-1].argmax(1) == truth).mean()), abs=slack), \
            f"{ambiguous.sum()} queries with a tie at the 20th neighbour"
    fused = _naive_fuse(posts, None, 1.0, 1e-6)
    assert knn["teacher"]["ensemble"] == pytest.approx(float((fused.argmax(1) == truth).mean()),
                                                      abs=(1 + ambiguous.sum()) / len(truth))
    assert set(knn["student"]) == {"student/dino", "student/siglip", "ensemble", "mean_weight"}
    saved = json.loads((run / "eval.json").read_text())
    assert saved["store"] == store and "zeroshot" in saved and "ensemble" in saved
    with pytest.raises(EvalError, match="--text-classes FILE"):  # no class embeddings: named how to cache them
        _no_sets(run, tmp_path)


def _no_sets(run, tmp_path):
    """zeroshot on a copy of the store without any text set."""
    from eval.evaluate import evaluate_run
    from storage.store import FeatureStore

    bare = tmp_path / "bare"
    shutil.copytree(json.loads((run / "store.json").read_text())["url"], bare)
    for t in ("dino", "siglip"):
        del FeatureStore.open(str(bare), mode="r+").teacher_group(t)["text"]
    evaluate_run(run, str(bare), ["zeroshot"], bank=str(bare), device="cpu")
