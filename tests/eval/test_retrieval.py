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


def test_eval_retrieval_equals_a_recomputation_from_the_features(train_store, tmp_path):
    """Two captions per labelled digit ("the digit k" and its number word) written with the text tower's caption set
    into a copy of the store; recall of each head and teacher recomputed from the extracted features."""
    from eval.evaluate import evaluate_run
    from eval.features import extract_features, load_trained
    from stages.teachers import build_teacher
    from stages.text_sets import caption_set
    from storage.store import FeatureStore
    from train.rundir import read_run

    store = str(tmp_path / "store")
    shutil.copytree(train_store, store)
    labels = FeatureStore.open(store).labels()
    rows = [int(r) for r in np.flatnonzero(labels >= 0)]
    captions = [c for r in rows for c in (f"the digit {labels[r]}", DIGITS[labels[r]])]
    images = [r for r in rows for _ in range(2)]
    text = caption_set(build_teacher(TINY_SIGLIP, random_init=True, seed=0), captions, images)
    FeatureStore.open(store, mode="r+").write_text("siglip", "captions", text.embeddings, text.attrs)
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
