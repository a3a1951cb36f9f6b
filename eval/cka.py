"""Linear CKA between two sets of token features (AMoE Eq. 8, after Kornblith et al. 2019).

    CKA(X, Y) = ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F · ‖ỸᵀỸ‖_F),   X̃, Ỹ: X, Y with their column means removed

for n paired rows (here: the same tokens seen by a student layer and a teacher layer). The feature
widths may differ; the value lies in [0, 1] and does not change under an orthogonal transform or an
isotropic scaling of either side. Computed in float64 from the D×D cross-products, so memory does
not grow with the number of tokens.
"""

from __future__ import annotations

import numpy as np

__all__ = ["linear_cka"]


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of paired rows ``x`` [n, dx] and ``y`` [n, dy]; NaN when either side has no variance."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs paired rows [n, dx] and [n, dy], got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(x.T @ y) ** 2
    scale = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / scale) if scale > 0 else float("nan")
