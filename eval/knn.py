"""Weighted k-nearest-neighbour classification on frozen features (DINO, RADIO and AMoE protocol).

Features are L2-normalized; faiss finds the k most cosine-similar bank items of each query; each
neighbour votes for its label with weight exp(sim / T) (k = 20, T = 0.07), and the class with the
largest vote wins.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["knn_predict", "knn_accuracy", "knn_votes", "l2_normalize"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, exclude: np.ndarray | None = None
                ) -> np.ndarray:
    """Predicted label of every query; ``bank_labels`` are non-negative ints.

    ``exclude[i]`` is a bank index query i must not count as a neighbour (itself, when the bank holds the
    queries; -1 for none): otherwise every image would vote for its own label.
    """
    return knn_votes(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=num_classes,
                     exclude=exclude).argmax(1)


def knn_votes(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, k: int = 20,
              temperature: float = 0.07, num_classes: int | None = None, exclude: np.ndarray | None = None
              ) -> np.ndarray:
    """Each query's summed vote weights per class ``[Q, C]`` (float64; ``knn_predict`` takes the largest)."""
    bank, queries = l2_normalize(bank), l2_normalize(queries)
    bank_labels = np.asarray(bank_labels, np.int64)
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("kNN needs a non-empty bank and query set")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank dim {bank.shape[1]} != query dim {queries.shape[1]}")
    if (bank_labels < 0).any():
        raise ValueError("bank labels must be >= 0 (drop unlabelled images first)")
    k = min(k, len(bank) - (exclude is not None))
    if k < 1:
        raise ValueError("kNN needs at least one neighbour besides the query itself")
    index = faiss.IndexFlatIP(bank.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # faiss-gpu (the ``gpu`` extra): exact search on the GPUs
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(bank))
    sims, idx = index.search(np.ascontiguousarray(queries), k + (exclude is not None))
    if exclude is not None:  # drop the excluded neighbour where it was found, else the farthest of the k + 1
        drop = np.argmax(np.concatenate([idx == np.asarray(exclude)[:, None], np.ones((len(idx), 1), bool)], 1), 1)
        keep = np.ones(idx.shape, bool)
        keep[np.arange(len(idx)), np.minimum(drop, k)] = False
        sims, idx = sims[keep].reshape(len(idx), k), idx[keep].reshape(len(idx), k)
    num_classes = num_classes or int(bank_labels.max()) + 1
    votes = np.zeros((len(queries), num_classes), np.float64)
    weights = np.exp(sims.astype(np.float64) / temperature)
    np.add.at(votes, (np.repeat(np.arange(len(queries)), k), bank_labels[idx].ravel()), weights.ravel())
    return votes


def knn_accuracy(bank, bank_labels, queries, query_labels, *, k: int = 20, temperature: float = 0.07,
                 exclude: np.ndarray | None = None) -> float:
    pred = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature,
                       num_classes=int(max(np.max(bank_labels), np.max(query_labels))) + 1, exclude=exclude)
    return float((pred == np.asarray(query_labels)).mean())
