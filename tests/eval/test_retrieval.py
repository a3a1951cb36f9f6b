"""Image-text retrieval from cached captions (eval/retrieval.py, stages/text_sets.py): recall against a naive
loop, the captions CSV mapped onto store rows, and a run's eval.json recomputed from its features."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from eval.retrieval import recall_at
from train_helpers import DIGITS, TINY_SIGLIP, train_tiny


def _naive(images, captions, caption_image, k):
    a = images / np.linalg.norm(images, axis=1, keepdims=True)
    b = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    sims = a @ b.T
    i2t = []
    for i in range(len(a)):
        ranked = sorted(range(len(b)), key=lambda c: (-sims[i, c], c))[:k]
        i2t.append(any(caption_image[c] == i for c in ranked))
    t2i = []
    for c in range(len(b)):
        ranked = sorted(range(len(a)), key=lambda i: (-sims[i, c], i))[:k]
        t2i.append(caption_image[c] in ranked)
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_recall_equals_a_naive_loop_with_several_captions_per_image():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(9, 6))
    caption_image = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 8])
    captions = images[caption_image] + 1.2 * rng.normal(size=(13, 6))
    got = recall_at(images, captions, caption_image, ks=(1, 3, 5))
    for k in (1, 3, 5):
        i2t, t2i = _naive(images, captions, caption_image, k)
        assert got["image_to_text"][f"r{k}"] == pytest.approx(i2t)
        assert got["text_to_image"][f"r{k}"] == pytest.approx(t2i)
    assert recall_at(images, images, np.arange(9), ks=(1,))["image_to_text"]["r1"] == 1.0
    with pytest.raises(ValueError, match="outside"):
        recall_at(images, captions, caption_image + 1)


def test_a_captions_csv_maps_onto_store_rows_and_is_refused_when_it_names_other_images(tmp_path):
    from stages.text_sets import read_captions

    sources = [str(tmp_path / "imgs" / f"{n}.png") for n in ("a", "b", "c")]
    csv = tmp_path / "captions.csv"
    csv.write_text("path,caption\nimgs/c.png,a cat\nimgs/a.png,an apple\nimgs/c.png,  a small cat \nimgs/b.png,\n")
    assert read_captions(str(csv), sources) == (["a cat", "an apple", "a small cat"], [2, 0, 2])
    csv.write_text("path,caption\nimgs/zzz.png,nothing\n")
    with pytest.raises(ValueError, match="zzz.png is not one of the images"):
        read_captions(str(csv), sources)
    csv.write_text("path,text\nimgs/a.png,x\n")
    with pytest.raises(ValueError, match="needs the columns 'path' and 'caption'"):
        read_captions(str(csv), sources)


def _captioned_copy(train_store: str, tmp_path):
    """A copy of the store with two captions per labelled digit ("the digit k" and its number word) in siglip's
    text/captions: (store, captioned rows, each caption's row, the caption set)."""
    from stages.teachers import build_teacher
    from stages.text_sets import caption_set
    from storage.store import FeatureStore

    store = str(tmp_path / "store")
    shutil.copytree(train_store, store)
    labels = FeatureStore.open(store).labels()
    rows = [int(r) for r in np.flatnonzero(labels >= 0)]
    captions = [c for r in rows for c in (f"the digit {labels[r]}", DIGITS[labels[r]])]
    images = [r for r in rows for _ in range(2)]
    text = caption_set(build_teacher(TINY_SIGLIP, random_init=True, seed=0), captions, images)
    FeatureStore.open(store, mode="r+").write_text("siglip", "captions", text.embeddings, text.attrs)
    return store, rows, images, text


def test_eval_retrieval_equals_a_recomputation_from_the_features(train_store, tmp_path):
    """Two captions per labelled digit ("the digit k" and its number word) written with the text tower's caption set
    into a copy of the store; recall of each head and teacher recomputed from the extracted features."""
    from eval.evaluate import evaluate_run
    from eval.features import extract_features, load_trained
    from train.rundir import read_run

    store, rows, images, text = _captioned_copy(train_store, tmp_path)
    run = tmp_path / "run"
    train_tiny(store, run)
    entry = evaluate_run(run, store, ["retrieval"], device="cpu")["retrieval"]["sets"]["siglip/captions"]
    assert (entry["images"], entry["captions"]) == (len(rows), 2 * len(rows))
    cfg, record = read_run(run)
    model, _ = load_trained(run, store, cfg, record["teachers"], torch.device("cpu"))
    feats = extract_features(model, store, cfg, record["teachers"], torch.device("cpu"))
    position = {int(r): j for j, r in enumerate(feats.rows)}
    for side in ("student", "teacher"):
        x = feats.features[f"{side}/siglip"][[position[r] for r in rows]]
        for k in (1, 5):
            i2t, t2i = _naive(x.astype(np.float64), text.embeddings.astype(np.float64),
                              np.repeat(np.arange(len(rows)), 2), k)
            assert entry["image_to_text"][f"{side}/siglip"][f"r{k}"] == pytest.approx(i2t)
            assert entry["text_to_image"][f"{side}/siglip"][f"r{k}"] == pytest.approx(t2i)


def _cosines32(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """Cosines with the task's arithmetic (rows normalized in float32, products in float64): the tiny teachers give
    the digits near-identical summaries, so rankings hinge on near-ties that any other rounding reorders."""
    a = images.astype(np.float32) / np.linalg.norm(images.astype(np.float32), axis=1, keepdims=True)
    b = captions.astype(np.float32) / np.linalg.norm(captions.astype(np.float32), axis=1, keepdims=True)
    return a.astype(np.float64) @ b.astype(np.float64).T


def _naive_recall1(i2t: np.ndarray, t2i: np.ndarray, caption_image: np.ndarray) -> tuple[float, float]:
    """Recall@1 both ways by a loop (ties: the lower index)."""
    first = lambda row: min(range(len(row)), key=lambda j: (-row[j], j))  # noqa: E731
    return (float(np.mean([caption_image[first(i2t[i])] == i for i in range(len(i2t))])),
            float(np.mean([first(t2i[c]) == caption_image[c] for c in range(len(t2i))])))


def _naive_fused_recall(sims: list[np.ndarray], caption_image: np.ndarray, temperature: float = 0.01) -> tuple:
    """Entropy-weighted fusion query by query (float64 loops), then recall@1 both ways."""
    def fused_rows(mats):
        out = np.zeros_like(mats[0])
        for q in range(mats[0].shape[0]):
            inv = []
            for m in mats:
                z = np.exp((m[q] - m[q].max()) / temperature)
                p = z / z.sum()
                inv.append(1.0 / (-(p * np.log(np.maximum(p, 1e-300))).sum() + 1e-6))
            out[q] = sum(w / sum(inv) * m[q] for w, m in zip(inv, mats))
        return out

    return _naive_recall1(fused_rows(sims), fused_rows([s.T for s in sims]), caption_image)


def test_ensembled_retrieval_equals_a_naive_fusion(train_store, tmp_path):
    """The same captions cached for both teachers (siglip: its text tower; dino: a caption set in its own summary
    space, built here from its cached summaries plus noise): fused recall@1 recomputed query by query."""

    from eval.evaluate import evaluate_run
    from eval.features import extract_features, load_trained
    from storage import layout as L
    from storage.store import FeatureStore
    from train.rundir import read_run

    store, rows, images, text = _captioned_copy(train_store, tmp_path)
    writable = FeatureStore.open(store, mode="r+")
    summary = writable.teacher_group("dino")[L.SUMMARY][:].astype(np.float64)
    noisy = summary[images] + np.random.default_rng(0).normal(0, 0.2 * summary[rows].std(0), (len(images), summary.shape[1]))
    noisy = noisy.astype(np.float32).astype(np.float64)  # what the store holds
    writable.write_text("dino", "captions", noisy.astype(np.float32), text.attrs)
    run = tmp_path / "run"
    train_tiny(store, run)
    entry = evaluate_run(run, store, ["ensemble"], device="cpu")["ensemble"]["retrieval"]["captions"]
    assert entry["teachers"] == ["dino", "siglip"] and entry["captions"] == 2 * len(rows)
    cfg, record = read_run(run)
    model, _ = load_trained(run, store, cfg, record["teachers"], torch.device("cpu"))
    feats = extract_features(model, store, cfg, record["teachers"], torch.device("cpu"))
    where = {int(r): j for j, r in enumerate(feats.rows)}
    position = sorted(where[r] for r in rows)  # images in feature order, as the task ranks them (ties: lower index)
    embeddings = {"dino": noisy, "siglip": text.embeddings.astype(np.float64)}
    caption_image = np.array([position.index(where[r]) for r in images])
    for side in ("student", "teacher"):
        sims = [_cosines32(feats.features[f"{side}/{t}"][position], embeddings[t]) for t in ("dino", "siglip")]
        i2t, t2i = _naive_fused_recall(sims, caption_image)
        assert entry[side]["ensemble"]["image_to_text"]["r1"] == pytest.approx(i2t)
        assert entry[side]["ensemble"]["text_to_image"]["r1"] == pytest.approx(t2i)
        alone = _naive_recall1(sims[0], sims[0].T, caption_image)
        assert entry[side][f"{side}/dino"]["image_to_text"]["r1"] == pytest.approx(alone[0])
        assert entry[side][f"{side}/dino"]["text_to_image"]["r1"] == pytest.approx(alone[1])
    from eval.report import write_report

    report = write_report(run).read_text()
    fused = entry["teacher"]["ensemble"]["image_to_text"]["r1"]
    assert any(ln.startswith("| retrieval captions image→text R@1 | teacher |") and ln.endswith(f"| {fused:.3f} |")
               for ln in report.splitlines())
