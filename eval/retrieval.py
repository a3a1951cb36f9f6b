"""Image-text retrieval from caption embeddings cached in the store (``text/<set>`` of kind ``captions``).

Images and captions are compared by cosine; image→text recall@k is the share of images with one of their
own captions among their k most similar captions, text→image recall@k the share of captions whose image
is among their k most similar images (CLIP's protocol; ties keep the lower index).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_matrix", "recall_at", "recall_from_scores"]


def cosine_matrix(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """[I, C] cosine similarities (float64)."""
    if images.shape[1] != captions.shape[1]:
        raise ValueError(f"image features of width {images.shape[1]} cannot be compared with captions of width "
                         f"{captions.shape[1]}")
    a = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    b = captions / np.maximum(np.linalg.norm(captions, axis=1, keepdims=True), 1e-12)
    return a.astype(np.float64) @ b.astype(np.float64).T


def recall_from_scores(i2t: np.ndarray, t2i: np.ndarray, caption_image: np.ndarray, ks=(1, 5)) -> dict[str, dict]:
    """Recall@k from an image→caption score matrix ``i2t`` [I, C] and a caption→image one ``t2i`` [C, I] (the
    transpose of one similarity matrix, or two fused ones: ``eval.ensemble``)."""
    caption_image = np.asarray(caption_image, np.int64)
    if i2t.size == 0:
        raise ValueError("retrieval needs images and captions")
    if caption_image.min() < 0 or caption_image.max() >= i2t.shape[0]:
        raise ValueError("a caption names an image outside the evaluated images")
    by_image = np.argsort(-i2t, axis=1, kind="stable")
    by_caption = np.argsort(-t2i, axis=1, kind="stable")
    out = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        own = caption_image[by_image[:, :k]] == np.arange(i2t.shape[0])[:, None]
        out["image_to_text"][f"r{k}"] = float(own.any(1).mean())
        out["text_to_image"][f"r{k}"] = float((by_caption[:, :k] == caption_image[:, None]).any(1).mean())
    return out


def recall_at(images: np.ndarray, captions: np.ndarray, caption_image: np.ndarray, ks=(1, 5)) -> dict[str, dict]:
    """``images`` [I, D], ``captions`` [C, D], ``caption_image`` [C] (index into ``images``) ->
    ``{"image_to_text": {"r1": ..}, "text_to_image": {..}}``."""
    if len(images) == 0 or len(captions) == 0:
        raise ValueError("retrieval needs images and captions")
    sims = cosine_matrix(images, captions)
    return recall_from_scores(sims, sims.T, caption_image, ks)
