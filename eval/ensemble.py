"""AMoE's entropy-weighted ensembling of teacher heads (AMoE §5, "Teacher-heads ensembling evaluation").

Our text keeps the definitions but lost the symbols; the reconstruction we use: for input x and head h
with task score vector s_h(x) over C classes (cosines to class embeddings, classifier logits, kNN class
posteriors; for retrieval the candidates are the captions of an image, or the images of a caption, and
s_h their cosines),

    p_h(x) = softmax(s_h(x) / T)                 confidence distribution (kNN: the normalized votes)
    H_h(x) = −Σ_c p_h,c(x) log p_h,c(x)          its entropy
    w_h(x) = (H_h(x) + ε)^(−γ) / Σ_h' (H_h'(x) + ε)^(−γ)   per-input weights, sharpened by γ
    s(x)   = Σ_h w_h(x) · s_h(x)                 fused score; the prediction is its argmax

so a head that is sure of an input (low entropy) counts more for that input. Defaults: γ = 1,
ε = 1e-6; T = 0.01 for cosine scores (CLIP's logit scale of 100), 1 for logits; kNN posteriors are
already distributions (their votes carry exp(sim / 0.07)) and are used as p_h = s_h.
"""

from __future__ import annotations

import numpy as np

__all__ = ["confidence", "ensemble_weights", "fuse"]


def confidence(scores: np.ndarray, temperature: float | None) -> np.ndarray:
    """p_h: softmax(scores / T) per row, or the rows normalized to sum 1 when ``temperature`` is None."""
    s = np.asarray(scores, np.float64)
    if temperature is None:
        return s / np.maximum(s.sum(1, keepdims=True), 1e-300)
    z = s / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def ensemble_weights(probs: list[np.ndarray], gamma: float = 1.0, eps: float = 1e-6) -> np.ndarray:
    """``[H, N]`` weights per head and input, summing to 1 over heads."""
    if gamma < 0 or eps <= 0:
        raise ValueError(f"ensembling needs gamma >= 0 and eps > 0, got gamma={gamma}, eps={eps}")
    entropy = np.stack([-(p * np.log(np.maximum(p, 1e-300))).sum(1) for p in probs])
    inv = (entropy + eps) ** (-gamma)
    return inv / inv.sum(0, keepdims=True)


def fuse(scores: list[np.ndarray], temperature: float | None, gamma: float = 1.0, eps: float = 1e-6
         ) -> tuple[np.ndarray, np.ndarray]:
    """(fused scores [N, C], weights [H, N]) of the heads' ``scores`` (each [N, C], the same classes)."""
    if not scores or any(s.shape != scores[0].shape for s in scores):
        raise ValueError("ensembling needs at least one head and the same [inputs, classes] shape for every head")
    weights = ensemble_weights([confidence(s, temperature) for s in scores], gamma, eps)
    return sum(w[:, None] * np.asarray(s, np.float64) for w, s in zip(weights, scores)), weights
