"""Value-level end-to-end checks: what the trainer logs, what the store holds and what eval reports, each
against an independent float64 / naive computation from the raw stored rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from cli_helpers import ENV, assert_ok, run_pipeline
from storage import layout as L
from storage.store import FeatureStore
from train.config import ModelConfig
from train.model import Student
from train.packing import build_layout

BASE = ["--model", "tiny", "--set", "data.seq_len=160", "--set", "data.seqs_per_batch=2", "--set", "data.workers=0",
        "--set", "run.log_every=1", "--set", "run.threads=1", "--set", "optim.warmup_steps=2"]


def _records(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _train(store: str, run, *, steps: int, moe: dict | None = None, optim: dict | None = None,
           checkpoint_every: int = 200):
    """The trainer in this process (the same function `pipeline train` calls), as BASE configures it."""
    from train.config import TrainConfig
    from train.trainer import train

    cfg = TrainConfig.model_validate({
        "model": {"preset": "tiny", **({"moe": moe} if moe else {})},
        "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
        "optim": {"warmup_steps": 2, **(optim or {})},
        "run": {"steps": steps, "log_every": 1, "threads": 1, "checkpoint_every": checkpoint_every}})
    train(cfg, store, run)
    return cfg


def _step0_batches(cfg, store_url: str, teachers: list[str]) -> list[dict]:
    """The microbatches of step 0 (pixels and layout are the model's input; their targets are not used here)."""
    from train.data import PlanStream, StoreBatches

    ds = StoreBatches(store_url, teachers, cfg.data, patch=cfg.model.patch_size, registers=cfg.model.registers,
                      seed=cfg.run.seed)
    plans = PlanStream(ds.reader.indexes, cfg.data, registers=cfg.model.registers, seed=cfg.run.seed,
                       accumulation=cfg.optim.accumulation).steps(0)
    return [ds[next(plans)] for _ in range(cfg.optim.accumulation)]


def _phis(store: FeatureStore, teacher: str, feature: str):
    with np.load(store.phis_path(teacher, feature)) as z:
        return z["mean"].astype(np.float64), z["whiten"].astype(np.float64)


def _distance(p: np.ndarray, t: np.ndarray, w_cos: float, w_sl1: float, beta: float = 1.0) -> np.ndarray:
    """w_cos·(1 − cos) + w_sl1·smooth-L1 (mean over channels), per row, float64 (M²oT Eq. 2)."""
    cos = (p * t).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1), 1e-8)
    d = np.abs(p - t)
    sl1 = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean(-1)
    return w_cos * (1 - cos) + w_sl1 * sl1


def test_step_zero_loss_terms_equal_a_float64_recomputation_from_the_raw_rows(train_store, tmp_path):
    """Catches targets whitened with another feature's statistics, whitened registers, and normalizing by the
    microbatch's image count instead of the whole step's (two microbatches here)."""
    from train.model import build_model

    run = tmp_path / "run"
    cfg = _train(train_store, run, steps=1, optim={"accumulation": 2})
    logged = _records(run)[0]
    teachers = FeatureStore.open(train_store).teacher_names
    store = FeatureStore.open(train_store)
    raw = zarr.open_group(train_store, mode="r")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, store, teachers)  # the run's step-0 weights: the same seed, nothing trained yet
    batches = _step0_batches(cfg, train_store, teachers)
    images = sum(b["layout"].num_images for b in batches)
    offsets = {t: raw[f"teachers/{t}/offsets"][:] for t in teachers}
    terms: dict[str, float] = {}
    for batch in batches:
        with torch.no_grad():
            preds, _ = model(batch["pixels"], batch["layout"], "dense")
        layout = batch["layout"]
        rows = batch["rows"].numpy()
        for t in teachers:
            g = raw[f"teachers/{t}"]
            mean_s, w_s = _phis(store, t, "summary")
            mean_p, w_p = _phis(store, t, "patches")
            pred = {k: v.double().numpy() for k, v in preds[t].items()}
            summary = (g["summary"].get_orthogonal_selection((rows, slice(None))).astype(np.float64) - mean_s) @ w_s.T
            s = _distance(pred["summary"], summary, cfg.loss.summary_cos, cfg.loss.summary_smooth_l1).sum()
            patch_loss, cursor = 0.0, 0
            for k, r in enumerate(rows):
                n = int(offsets[t][r + 1] - offsets[t][r])
                target = (g["patches"][offsets[t][r]: offsets[t][r + 1]].astype(np.float64) - mean_p) @ w_p.T
                patch_loss += _distance(pred["patches"][cursor: cursor + n], target, cfg.loss.patches_cos,
                                        cfg.loss.patches_smooth_l1).mean()
                cursor += n
            assert cursor == len(pred["patches"]) == int(layout.patch_pos.numel())
            terms[f"{t}/summary"] = terms.get(f"{t}/summary", 0.0) + s / images
            terms[f"{t}/patches"] = terms.get(f"{t}/patches", 0.0) + patch_loss / images
            if "registers" in pred:  # raw teacher registers: no PHI-S (AMoE supplement §6)
                regs = g["registers"].get_orthogonal_selection((rows, slice(None), slice(None))).astype(np.float64)
                r_loss = _distance(pred["registers"], regs, cfg.loss.registers_cos, cfg.loss.registers_smooth_l1)
                terms[f"{t}/registers"] = terms.get(f"{t}/registers", 0.0) + r_loss.mean(-1).sum() / images
    assert {k.removeprefix("loss/") for k in logged if k.startswith("loss/")} == set(terms)
    for key, value in terms.items():
        assert logged[f"loss/{key}"] == pytest.approx(value, rel=1e-5), key


def test_phis_saved_in_the_store_equals_a_float64_recomputation_over_valid_rows(train_store):
    store = FeatureStore.open(train_store)
    ok = store.image_array(L.OK)[:]
    assert not ok.all(), "the fixture has a failed image whose zero row must not count"
    for t in store.teacher_names:
        g = store.teacher_group(t)
        for feature, rows in ((L.SUMMARY, g[L.SUMMARY][:][ok]), (L.PATCHES, g[L.PATCHES][:])):
            x = rows.astype(np.float64)
            mean, whiten = _phis(store, t, feature)
            np.testing.assert_allclose(mean, x.mean(0), rtol=0, atol=1e-9)
            cov = np.cov(x, rowvar=False, bias=True)
            phi2 = np.linalg.eigvalsh(cov).mean()  # PHI-S: one isotropic scale, sqrt of the mean eigenvalue
            # a scaled rotation: W Wᵀ = I / φ², and every normalized channel has unit variance
            np.testing.assert_allclose(whiten @ whiten.T, np.eye(len(mean)) / phi2, rtol=1e-6, atol=1e-9 / phi2)
            np.testing.assert_allclose(np.diag(whiten @ cov @ whiten.T), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["topk", "soft", "expert_choice"])
def test_packed_forward_equals_each_image_alone_for_every_moe_kind(kind):
    grids = [(2, 3), (4, 4), (1, 5), (3, 2), (5, 3), (2, 2)]
    torch.manual_seed(0)
    model = Student(ModelConfig(patch_size=4, dim=32, depth=2, num_heads=2, registers=2,
                                moe={"layers": "all", "kind": kind, "experts": 4, "top_k": 2, "backend": "loop"})).eval()
    g = torch.Generator().manual_seed(1)
    pix = [torch.rand(gh * gw, 48, generator=g) for gh, gw in grids]
    with torch.no_grad():
        packed = model(torch.cat(pix), build_layout([grids[:3], grids[3:]], 48, 2), attention="dense")
        offset = 0
        for i, (grid, p) in enumerate(zip(grids, pix)):
            n = grid[0] * grid[1]
            alone = model(p, build_layout([[grid]], 3 + n, 2), attention="dense")
            torch.testing.assert_close(packed.cls[i], alone.cls[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.registers[i], alone.registers[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(packed.patches[offset:offset + n], alone.patches, rtol=0, atol=1e-5)
            offset += n


def test_resume_restores_the_rng_of_a_noisy_router(train_store, tmp_path):
    """Router noise draws from torch's RNG: a resume that did not restore it would route step 2 on."""
    moe = {"layers": "odd", "experts": 4, "top_k": 2, "backend": "loop", "noise_std": 1.0}
    _train(train_store, tmp_path / "whole", steps=4, moe=moe, checkpoint_every=2)
    _train(train_store, tmp_path / "split", steps=2, moe=moe, checkpoint_every=2)
    torch.manual_seed(123)  # whatever state the process is in: the resumed run restores its own
    _train(train_store, tmp_path / "split", steps=4, moe=moe, checkpoint_every=2)
    whole, split = _records(tmp_path / "whole"), _records(tmp_path / "split")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split] and len(whole) == 4
    # and the noise matters: without it the same run routes (and trains) differently
    _train(train_store, tmp_path / "quiet", steps=4, moe={**moe, "noise_std": 0.0}, checkpoint_every=2)
    assert [r["loss"] for r in _records(tmp_path / "quiet")][1:] != [r["loss"] for r in whole][1:]


def test_an_upcycled_run_starts_where_the_dense_checkpoint_is(train_store, tmp_path):
    """Through the CLI: the MoE run's step-0 distillation terms equal the dense checkpoint's on that batch."""
    from train.checkpoint import latest_checkpoint, load_checkpoint
    from train.model import build_model
    from train.rundir import read_run
    from train.trainer import compute_terms

    assert_ok(run_pipeline("train", "--store", train_store, "--out", tmp_path / "dense", *BASE, "--steps", "2"))
    moe = ["--set", "model.moe.layers=odd", "--set", "model.moe.experts=4", "--set", "model.moe.top_k=2",
           "--set", "model.moe.backend=loop", "--set", "model.moe.renormalize=true",  # gates sum to 1: exact
           "--set", f"model.moe.upcycle_from={tmp_path / 'dense'}",
           # with TAS and TGR-MoE (the student routes): their routers have no dense counterpart and start fresh
           "--set", "loss.tas=0.5", "--set", "model.moe.guide=tgr"]
    assert_ok(run_pipeline("train", "--store", train_store, "--out", tmp_path / "moe", *BASE, *moe, "--steps", "1"))
    first = _records(tmp_path / "moe")[0]
    cfg, record = read_run(tmp_path / "dense")
    model = build_model(cfg, FeatureStore.open(train_store), record["teachers"])
    load_checkpoint(latest_checkpoint(tmp_path / "dense" / "checkpoints"), model)
    batch = _step0_batches(cfg, train_store, record["teachers"])[0]
    with torch.no_grad():
        terms, _ = compute_terms(model.eval(), batch, cfg)
    for key, value in terms.items():
        assert first[f"loss/{key}"] == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    assert "loss/router" in first and "loss/tas" in first and "loss/router_distill" in first


def test_knn_excludes_self_matches_and_equals_a_direct_forward(train_store, tmp_path):
    """Bank = queries: an image must not vote for itself. Compared with features from a direct forward of each
    image alone and a naive kNN loop."""
    from train.checkpoint import latest_checkpoint, load_checkpoint
    from train.model import build_model
    from train.rundir import read_run

    run = tmp_path / "run"
    assert_ok(run_pipeline("train", "--store", train_store, "--out", run, *BASE, "--steps", "3"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", str(run), "--store", train_store, "--k", "5"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    top1 = json.loads((run / "eval.json").read_text())["knn"]["top1"]

    cfg, record = read_run(run)
    model = build_model(cfg, FeatureStore.open(train_store), record["teachers"])
    load_checkpoint(latest_checkpoint(run / "checkpoints"), model)
    model.eval()
    raw = zarr.open_group(train_store, mode="r")
    ok, grid, labels = raw["images/ok"][:], raw["images/grid"][:], raw["labels"][:]
    offsets = raw["images/pixel_offsets"][:]
    from storage.image_policy import ImagePolicy
    from train.packing import patchify

    rows = [int(r) for r in np.flatnonzero(ok & (labels >= 0))]
    cls = []
    for r in rows:
        img = ImagePolicy.decode(raw["images/pixels"][offsets[r]: offsets[r + 1]])
        pixels = patchify(torch.from_numpy(np.array(img)).permute(2, 0, 1), 16)
        layout = build_layout([[tuple(int(v) for v in grid[r])]], 5 + len(pixels), cfg.model.registers)
        with torch.no_grad():
            _, out = model(pixels, layout, "dense")
        cls.append(out.cls[0].double().numpy())

    def naive_knn(feats):
        x = np.stack(feats)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        right = 0
        for i in range(len(x)):
            sims = x @ x[i]
            sims[i] = -np.inf  # never itself
            nn = np.argsort(-sims, kind="stable")[:5]
            votes = {}
            for j in nn:
                votes[labels[rows[j]]] = votes.get(labels[rows[j]], 0.0) + np.exp(sims[j] / 0.07)
            right += max(votes, key=votes.get) == labels[rows[i]]
        return right / len(x)

    # (the tiny random teacher gives most digits the same summary, and the heads in its space inherit that:
    # their kNN is all ties, which float32 and float64 break differently, so only the CLS is compared)
    assert top1["student/cls"] == pytest.approx(naive_knn(cls), abs=1e-9)
