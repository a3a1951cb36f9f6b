"""Routing analysis of an MoE run on a store: where tokens go, how stable that is, and what each expert holds.

For every token-choice MoE layer of the student, over the patch tokens of the store's first
``max_images`` usable images (store order, no augmentation):

- ``tokens``: how many tokens have expert e as their top-1 (the largest router score);
- ``stability``: the share of tokens whose top-1 expert differs between the run's latest checkpoint
  and the one before it (TGR-MoE's routing-stability question; absent when only one is kept), and
  ``stability_history``: the same share between every pair of consecutive kept checkpoints
  (``run.keep_checkpoints`` decides how far back it reaches);
- ``affinity[teacher]``: per expert, the mean cosine between that teacher's head prediction and its
  target over the tokens routed to the expert: which teacher's targets each expert's tokens are best
  predicted for (M²oT's expert-teacher specialization, for any run);
- ``tas_pi[teacher]`` (runs with TAS): per expert, the mean weight the teacher-aware router π gives the
  teacher for that expert over its tokens (M²oT's own view of which teacher an expert serves);
- ``cka["<teacher>/<k>"]``: per expert, linear CKA (AMoE Eq. 8, ``eval.cka``) between the MoE layer's
  input at the tokens routed to it and the same tokens of the teacher's cached block k
  (``layers/<k>``, aligned with the patches), for every complete cached layer; none for an expert
  with fewer than ``min_tokens`` tokens.

Only the store and the run are read (no teacher is loaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storage.reader import StoreReader, read_batch
from storage.store import FeatureStore
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.config import TrainConfig
from train.model import TRAINING_ONLY, build_model
from train.moe import MoEMLP
from train.moe.groups import TokenGroups
from train.rundir import RunDir

from .cka import linear_cka
from .features import ordered_batches

__all__ = ["best_teachers", "collect_routing", "plot_cka", "routing_analysis"]


def _moe_blocks(model) -> list[int]:
    return [i for i, block in enumerate(model.student.blocks) if block.sparse]


@torch.no_grad()
def collect_routing(models: list, store_url: str, cfg: TrainConfig, teachers: list[str], device: torch.device,
                    max_images: int, layers: dict[str, list[int]]) -> dict:
    """Per MoE block: the first model's input tokens [P, D] and every model's top-1 expert [P] at the patch
    tokens; per teacher the first model's head-target patch cosine [P]; the cached teacher layers [P, Dk]."""
    blocks = _moe_blocks(models[0])
    seen: dict[int, torch.Tensor] = {}
    hooks = [models[0].student.blocks[i].mlp.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, args[0].detach())) for i in blocks]
    reader = StoreReader(store_url, teachers, layers=layers) if layers else None
    hidden = {i: [] for i in blocks}
    top1 = [{i: [] for i in blocks} for _ in models]
    cosine = {t: [] for t in teachers}
    teacher_layers = {f"{t}/{k}": [] for t, ks in layers.items() for k in ks}
    try:
        for batch in ordered_batches(store_url, cfg, teachers, max_images):
            layout = batch["layout"].to(device)
            pixels = batch["pixels"].to(device)
            tokens = TokenGroups.from_doc_ids(layout.doc_ids)
            where = torch.searchsorted(tokens.index, layout.patch_pos)  # patch tokens among the routed rows
            for m, model in enumerate(models):
                preds, out = model(pixels, layout, cfg.run.attention)
                for i, aux in zip(blocks, out.aux):
                    top1[m][i].append(aux["router_logits"].argmax(-1).index_select(0, where).cpu().numpy())
                if m:
                    continue
                for i in blocks:
                    hidden[i].append(seen[i].reshape(-1, seen[i].shape[-1]).index_select(0, layout.patch_pos)
                                     .float().cpu().numpy())
                for t in teachers:
                    raw = model.spaces[t]["patches"].denormalize(preds[t]["patches"]).cpu()
                    cosine[t].append(F.cosine_similarity(raw, batch["targets"][t]["patches"].float(), dim=-1).numpy())
            if reader is not None:
                items = read_batch(reader, batch["rows"].tolist())
                for t, ks in layers.items():
                    for k in ks:
                        teacher_layers[f"{t}/{k}"].append(np.concatenate([it.layers[t][k] for it in items]))
    finally:
        for h in hooks:
            h.remove()
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    return {"blocks": blocks, "hidden": {i: cat(v) for i, v in hidden.items()},
            "top1": [{i: cat(v) for i, v in per.items()} for per in top1],
            "cosine": {t: cat(v) for t, v in cosine.items()},
            "teacher_layers": {k: cat(v).astype(np.float32) for k, v in teacher_layers.items()}}


def routing_analysis(run: Path, store_url: str, cfg: TrainConfig, teachers: list[str], model, device: torch.device,
                     *, max_images: int = 512, min_tokens: int = 16) -> dict:
    """The ``routing`` entry of ``eval.json`` (see the module docstring) for ``model`` (the latest checkpoint)."""
    blocks = _moe_blocks(model)
    if not blocks or not all(isinstance(model.student.blocks[i].mlp, MoEMLP) for i in blocks):
        raise ValueError("the routing analysis needs a student with token-choice MoE layers (model.moe.kind = topk)")
    store = FeatureStore.open(store_url)
    layers = {t: list(store.teacher_attrs(t).get("layers", [])) for t in teachers}
    layers = {t: ks for t, ks in layers.items() if ks}
    earlier = _earlier_checkpoints(run)  # newest first
    models = [model]
    for path in earlier:
        other = build_model(cfg, store, teachers)
        load_checkpoint(path, other, ignore=TRAINING_ONLY)
        models.append(other.to(device).eval())
    previous = earlier[0] if earlier else None
    latest = latest_checkpoint(RunDir(run).checkpoints)
    steps = [_step(latest) if latest is not None else None] + [_step(p) for p in earlier]
    data = collect_routing(models, store_url, cfg, teachers, device, max_images, layers)
    experts = model.student.blocks[blocks[0]].mlp.num_experts
    out = {"images": int(min(max_images, int(store.image_array("ok")[:].sum()))), "min_tokens": min_tokens,
           "compared_with": previous.name if previous is not None else None, "teacher_layers": sorted(data["teacher_layers"]),
           "layers": {}}
    for i in blocks:
        top1 = data["top1"][0][i]
        masks = [top1 == e for e in range(experts)]
        entry = {"tokens": [int(m.sum()) for m in masks],
                 "affinity": {t: [float(c[m].mean()) if m.any() else None for m in masks]
                              for t, c in data["cosine"].items()},
                 "cka": {name: [linear_cka(data["hidden"][i][m], feats[m]) if m.sum() >= min_tokens else None
                                for m in masks]
                         for name, feats in data["teacher_layers"].items()}}
        if len(models) > 1:
            changed = [float((data["top1"][j + 1][i] != data["top1"][j][i]).mean()) if len(top1) else None
                       for j in range(len(models) - 1)]
            entry["stability"] = changed[0]
            entry["stability_history"] = [{"step": steps[j], "since": steps[j + 1], "changed": changed[j]}
                                          for j in reversed(range(len(changed)))]
        if str(i) in getattr(model, "tas", {}):  # M²oT's own view: π's teacher weights for each expert
            with torch.no_grad():
                pi = model.tas[str(i)].weights(torch.from_numpy(data["hidden"][i]).to(device)).cpu().numpy()
            entry["tas_pi"] = {t: [float(pi[m, e, n].mean()) if m.any() else None for e, m in enumerate(masks)]
                               for n, t in enumerate(model.tas[str(i)].teachers)}
        out["layers"][str(i)] = entry
    return out


def _earlier_checkpoints(run: Path) -> list[Path]:
    """The kept checkpoints before the latest one, newest first."""
    latest = latest_checkpoint(RunDir(run).checkpoints)
    kept = sorted(p for p in RunDir(run).checkpoints.glob("step_*") if p.is_dir() and (p / "state.json").exists())
    return [p for p in reversed(kept) if latest is not None and p.name < latest.name]


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def best_teachers(entry: dict) -> list[str]:
    """Per expert of one layer's routing entry: the teacher whose targets its tokens are best predicted for."""
    best = []
    for e in range(len(entry["tokens"])):
        scores = {t: v[e] for t, v in entry["affinity"].items() if v[e] is not None}
        best.append(max(scores, key=scores.get) if scores else "-")
    return best


def plot_cka(routing: dict, run: Path) -> list[Path]:
    """One heatmap per MoE layer: experts × cached teacher layers (linear CKA); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for layer, entry in routing["layers"].items():
        names = sorted(entry["cka"])
        if not names:
            continue
        grid = np.array([[np.nan if v is None else v for v in entry["cka"][n]] for n in names], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * grid.shape[1], 1.2 + 0.4 * len(names)), dpi=110)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [str(e) for e in range(grid.shape[1])])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert (top-1 tokens)")
        ax.set_title(f"linear CKA, student MoE block {layer}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = run / f"routing_cka_block{layer}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
