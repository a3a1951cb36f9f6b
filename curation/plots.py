"""PNG figures for a curation run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cluster_sizes(sizes_per_level: Sequence[np.ndarray], path: str | Path,
                       selected_sizes: Sequence[np.ndarray] | None = None) -> Path:
    """Log-log rank-size curve per level; a flat curve means balanced clusters. Optional dashed
    curves give the selected points per cluster, to show the cap cutting the head."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for lvl, sizes in enumerate(sizes_per_level, start=1):
        s = np.sort(np.asarray(sizes))[::-1]
        s = s[s > 0]
        (line,) = ax.loglog(np.arange(1, s.size + 1), s, label=f"level {lvl} (K={len(sizes)})")
        if selected_sizes is not None:
            t = np.sort(np.asarray(selected_sizes[lvl - 1]))[::-1]
            t = t[t > 0]
            ax.loglog(np.arange(1, t.size + 1), t, "--", color=line.get_color(), alpha=0.8)
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("points in cluster")
    ax.set_title("cluster sizes (solid: pool, dashed: selected)" if selected_sizes is not None
                 else "cluster sizes")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_inertia(inertia: Sequence[float], path: str | Path, levels: Sequence[int] | None = None) -> Path:
    """k-means objective per level (log scale: levels differ by orders of magnitude)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(1, len(inertia) + 1)
    ax.bar(x, inertia)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"L{i}" + (f"\nK={levels[i - 1]}" if levels else "") for i in x])
    ax.set_ylabel("inertia (sum of squared distances)")
    ax.set_title("inertia per level")
    return _save(fig, path)


def plot_entropy(rows: Sequence[dict[str, Any]], path: str | Path, key: str = "level") -> Path:
    """Grouped bars of normalized entropy: pool, random subset, curated subset (one group per row,
    e.g. the ``per_level`` rows of :func:`curation.metrics.curation_metrics` or a single
    :func:`curation.metrics.compare_to_random` dict)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    for j, (name, field) in enumerate([("pool", "entropy_pool"), ("random", "entropy_random"),
                                       ("curated", "entropy_curated")]):
        ax.bar(x + (j - 1) * 0.27, [r[field] for r in rows], width=0.27, label=name)
    ax.set_xticks(x, [str(r.get(key, i + 1)) for i, r in enumerate(rows)])
    ax.set_xlabel(key)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("H(p) / log K")
    ax.set_title("normalized entropy: curated vs random")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curation(result, out_dir: str | Path) -> list[Path]:
    """All three figures for a :class:`curation.sampling.CurationResult`."""
    h = result.hierarchy
    out = Path(out_dir)
    sizes = h.sizes_per_level()
    chosen = [np.bincount(h.cluster_map(lvl)[result.selected_labels], minlength=h.levels[lvl - 1])
              for lvl in range(1, h.n_levels + 1)]
    return [plot_cluster_sizes(sizes, out / "cluster_sizes.png", chosen),
            plot_inertia(h.inertia, out / "inertia.png", h.levels),
            plot_entropy(result.metrics["per_level"], out / "entropy.png")]
