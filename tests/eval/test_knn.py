"""kNN (k=20, T=0.07 weighted votes) against a naive float64 loop, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from eval.knn import knn_accuracy, knn_predict


def _naive(bank, labels, queries, k, t):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in queries:
        q = q / np.linalg.norm(q)
        sims = bank @ q
        top = np.argsort(-sims, kind="stable")[:k]
        votes = {}
        for j in top:
            votes[labels[j]] = votes.get(labels[j], 0.0) + np.exp(sims[j] / t)
        out.append(max(votes, key=votes.get))
    return np.array(out)


def test_knn_matches_naive_weighted_vote():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, 300)
    bank = centers[labels] + 0.8 * rng.normal(size=(300, 16))
    q_labels = rng.integers(0, 5, 100)
    queries = centers[q_labels] + 0.8 * rng.normal(size=(100, 16))
    for k, t in ((20, 0.07), (5, 0.5), (1, 0.07)):
        pred = knn_predict(bank, labels, queries, k=k, temperature=t)
        assert (pred == _naive(bank.astype(np.float64), labels, queries, k, t)).mean() >= 0.99
    acc = knn_accuracy(bank, labels, queries, q_labels)
    assert 0.8 < acc <= 1.0
    shuffled = knn_accuracy(bank, rng.permutation(labels), queries, q_labels)
    assert shuffled < 0.5


def test_knn_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        knn_predict(np.zeros((0, 4)), np.zeros(0, int), np.ones((2, 4)))
    with pytest.raises(ValueError, match="dim"):
        knn_predict(np.ones((3, 4)), np.zeros(3, int), np.ones((2, 5)))
    with pytest.raises(ValueError, match=">= 0"):
        knn_predict(np.ones((3, 4)), np.array([0, -1, 1]), np.ones((2, 4)))


def test_excluded_neighbours_never_vote_equal_to_a_naive_loop():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(60, 8))
    labels = rng.integers(0, 4, 60)
    pred = knn_predict(bank, labels, bank, k=5, temperature=0.1, exclude=np.arange(60))
    x = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for i in range(60):
        sims = x @ x[i]
        sims[i] = -np.inf
        votes = np.zeros(4)
        for j in np.argsort(-sims)[:5]:
            votes[labels[j]] += np.exp(sims[j] / 0.1)
        assert pred[i] == votes.argmax()
    # without the exclusion every point finds itself first: the votes differ
    assert (knn_predict(bank, labels, bank, k=1, temperature=0.1) == labels).all()
    assert not (knn_predict(bank, labels, bank, k=1, temperature=0.1, exclude=np.arange(60)) == labels).all()
