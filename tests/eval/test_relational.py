"""The relational error eval reports (mean |d^S − d^T| of mean-normalized pair distances) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from eval.evaluate import relational_errors
from eval.features import StoreFeatures


def _numpy_reference(s: np.ndarray, t: np.ndarray) -> float:
    i, j = np.triu_indices(len(s), k=1)
    ds = np.linalg.norm(s[i] - s[j], axis=1)
    dt = np.linalg.norm(t[i] - t[j], axis=1)
    return float(np.abs(ds / ds.mean() - dt / dt.mean()).mean())


def test_relational_error_per_head_matches_numpy_and_vanishes_for_a_scaled_copy():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(40, 8)).astype(np.float32)
    student = (teacher + 0.5 * rng.normal(size=(40, 8))).astype(np.float32)
    feats = StoreFeatures(rows=np.arange(40), labels=-np.ones(40, int), cosine={},
                          features={"student/cls": student[:, :3], "student/a": student, "teacher/a": teacher,
                                    "student/b": 3 * teacher + 1, "teacher/b": teacher})
    out = relational_errors(feats)
    assert set(out) == {"a", "b"}
    assert out["a"] == pytest.approx(_numpy_reference(student, teacher), rel=1e-5)
    assert out["b"] == pytest.approx(0.0, abs=1e-6)
    sampled = relational_errors(feats, most=25, seed=1)["a"]  # a seeded sample of the images
    pick = np.sort(np.random.default_rng(1).choice(40, 25, replace=False))
    assert sampled == pytest.approx(_numpy_reference(student[pick], teacher[pick]), rel=1e-5)
