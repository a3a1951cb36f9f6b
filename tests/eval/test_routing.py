"""The routing analysis of an MoE run (eval/routing.py) against an independent per-image recomputation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.cka import linear_cka
from eval.evaluate import EvalError, evaluate_run
from storage import layout as L
from storage.store import FeatureStore


def _train(store: str, run, moe: dict | None, steps: int = 2, tas: float = 0.0, keep: int = 2):
    """A run through the functions `pipeline train` calls, a checkpoint after every step (``keep`` kept)."""
    from train.config import TrainConfig, with_stores
    from train.rundir import prepare_run
    from train.trainer import train

    cfg = with_stores(TrainConfig.model_validate({
        "model": {"preset": "tiny", **({"moe": moe} if moe else {})},
        "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
        "optim": {"warmup_steps": 1, "lr": 3e-3}, "loss": {"tas": tas},
        "run": {"steps": steps, "log_every": 1, "threads": 1, "checkpoint_every": 1, "keep_checkpoints": keep}}), store)
    prepare_run(run, cfg)
    train(cfg, None, run)


def _per_image(run, store_url: str, images: int, block: int, checkpoint=None):
    """Each image run alone (no packing) through the latest checkpoint (or ``checkpoint``): the MoE block's
    input and the router's top-1 at its patch tokens, from a hook and a direct router call; and the model."""
    from train.checkpoint import latest_checkpoint, load_checkpoint
    from train.data import StepPlan, StoreBatches
    from train.model import build_model
    from train.packing import Microbatch
    from train.rundir import read_run

    cfg, record = read_run(run)
    model = build_model(cfg, FeatureStore.open(store_url), record["teachers"])
    load_checkpoint(checkpoint or latest_checkpoint(run / "checkpoints"), model)
    model.eval()
    ds = StoreBatches(store_url, ["dino"], cfg.data, patch=16, registers=cfg.model.registers, seed=0, train=False)
    mlp = model.student.blocks[block].mlp
    seen = {}
    hook = mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("x", args[0]))
    hidden, top1 = [], []
    for row in np.flatnonzero(ds.reader.ok)[:images]:
        n = 1 + cfg.model.registers + int(np.prod(ds.reader.grid[row]))
        batch = ds[StepPlan(Microbatch(0, 0, ((int(row),),), n), 0, 1)]
        with torch.no_grad():
            model(batch["pixels"], batch["layout"])
            x = seen["x"].reshape(-1, seen["x"].shape[-1])[batch["layout"].patch_pos]
            top1.append(mlp.router(x).logits.argmax(-1).numpy())
        hidden.append(x.numpy())
    hook.remove()
    return np.concatenate(hidden), np.concatenate(top1), model


def test_routing_counts_cka_and_stability_equal_a_per_image_recomputation(train_store, tmp_path):
    run = tmp_path / "moe"
    moe = {"layers": "all", "experts": 3, "top_k": 2, "backend": "loop"}
    _train(train_store, run, moe, steps=3, tas=0.5, keep=3)
    result = evaluate_run(run, train_store, ["routing"], device="cpu", options={"routing": {"max_images": 12,
                                                                                             "min_tokens": 4}})
    routing = result["routing"]
    assert routing["compared_with"] == "step_00000002" and routing["teacher_layers"] == ["dino/1", "dino/2"]
    store = FeatureStore.open(train_store)
    ok, grid = store.image_array(L.OK)[:], store.image_array(L.GRID)[:]
    first = np.flatnonzero(ok)[:12]
    total = int((grid[first, 0] * grid[first, 1]).sum())
    hidden, top1, model = _per_image(run, train_store, 12, block=1)
    entry = routing["layers"]["1"]
    assert sum(entry["tokens"]) == total and entry["tokens"] == np.bincount(top1, minlength=3).tolist()
    g = store.teacher_group("dino")
    offsets = g[L.OFFSETS][:]
    teacher = np.concatenate([g[L.layer_path(2)][offsets[i]: offsets[i + 1]] for i in first]).astype(np.float32)
    for e in range(3):
        mask = top1 == e
        if mask.sum() >= 4:
            assert entry["cka"]["dino/2"][e] == pytest.approx(linear_cka(hidden[mask], teacher[mask]), rel=1e-3)
        else:
            assert entry["cka"]["dino/2"][e] is None
    earlier = {s: _per_image(run, train_store, 12, 1, run / "checkpoints" / f"step_{s:08d}")[1] for s in (1, 2)}
    history = entry["stability_history"]  # consecutive kept checkpoints, oldest pair first
    assert [(h["step"], h["since"]) for h in history] == [(2, 1), (3, 2)]
    assert history[0]["changed"] == pytest.approx(float((earlier[2] != earlier[1]).mean()))
    assert history[1]["changed"] == pytest.approx(float((top1 != earlier[2]).mean())) == entry["stability"]
    with torch.no_grad():  # π: for each expert, a distribution over the two teachers
        pi = model.tas["1"].weights(torch.from_numpy(hidden)).numpy()
    for e in range(3):
        if (top1 == e).any():
            for n, t in enumerate(["dino", "siglip"]):
                assert entry["tas_pi"][t][e] == pytest.approx(float(pi[top1 == e, e, n].mean()), rel=1e-5)
            assert entry["tas_pi"]["dino"][e] + entry["tas_pi"]["siglip"][e] == pytest.approx(1.0)
    assert all(v is None or -1.0 <= v <= 1.0 for v in entry["affinity"]["dino"])
    assert (run / "routing_cka_block1.png").stat().st_size > 1000
    assert "routing" in json.loads((run / "eval.json").read_text())
    from eval.report import write_report

    text = write_report(run).read_text()
    assert "## Routing" in text and "routing_entropy.png" in text and "checkpoints: 1→2 " in text and (run / "routing_entropy.png").exists()


def test_routing_needs_an_moe_student(train_store, tmp_path):
    run = tmp_path / "dense"
    _train(train_store, run, None, steps=1)
    with pytest.raises(EvalError, match="token-choice MoE"):
        evaluate_run(run, train_store, ["routing"], device="cpu")
