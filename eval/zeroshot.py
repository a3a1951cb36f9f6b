"""Zero-shot classification from class embeddings cached in the store (``teachers/<t>/text/<set>``).

A feature in a teacher's raw summary space (the teacher's own cached summary, or a head's summary
mapped back through the teacher's PHI-S) is scored against the set's class embeddings as the set says
(``stages.text_sets``): ``cosine`` for a text tower's class embeddings (CLIP/SigLIP protocol: both
sides L2-normalized), ``logit`` for a classifier's weights (summary · w_c + b_c: the teacher's own
logits). The top-1 class is the prediction. No teacher is loaded.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_scores", "predict"]


def class_scores(features: np.ndarray, embeddings: np.ndarray, attrs: dict) -> np.ndarray:
    """``[N, C]`` scores of ``features`` [N, D] for the set's classes (float64)."""
    f, e = np.asarray(features, np.float64), np.asarray(embeddings, np.float64)
    if f.shape[1] != e.shape[1]:
        raise ValueError(f"features of width {f.shape[1]} cannot be scored against class embeddings of width "
                         f"{e.shape[1]}")
    if attrs.get("score") == "logit":
        bias = attrs.get("bias")
        return f @ e.T + (np.asarray(bias, np.float64) if bias is not None else 0.0)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return f @ e.T


def predict(features: np.ndarray, embeddings: np.ndarray, attrs: dict) -> np.ndarray:
    return class_scores(features, embeddings, attrs).argmax(1)
