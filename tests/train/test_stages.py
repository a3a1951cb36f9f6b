"""AMoE's two stages: store mixtures drawn by weight (replayed exactly after SIGKILL) and a run started from
another run's weights (`--init-from`), allowed only for the same teachers at another image policy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import stream_reference
from cli_helpers import run_pipeline
import torch
import zarr

from train.checkpoint import latest_checkpoint
from train.config import DataConfig, TrainConfig, with_stores
from train.data import PlanStream, StorePart

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE = ["--model", "tiny", "--set", "data.seq_len=112", "--set", "data.seqs_per_batch=2", "--set", "data.workers=1",
        "--set", "run.log_every=1", "--set", "optim.warmup_steps=2", "--set", "run.threads=1",
        "--set", 'data.teachers=["dino"]']


def _train(out, *args, check=True):
    proc = run_pipeline("train", "--out", out, *BASE, *args)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _mixture(sizes, weights, cfg, seed=0):
    starts = np.cumsum([0, *sizes])
    parts = [StorePart(int(a), int(b), 7, w) for a, b, w in zip(starts[:-1], starts[1:], weights)]
    ok = np.ones(starts[-1], bool)
    grid = np.full((starts[-1], 2), 2)
    return PlanStream.from_arrays(ok, grid, 7, cfg, registers=0, seed=seed, parts=parts), starts


def test_the_plan_stream_draws_each_store_by_weight_and_replays_it():
    cfg = DataConfig(seq_len=64, seqs_per_batch=2, max_images_per_seq=8, shuffle_buffer=32)
    plans, starts = _mixture([300, 50, 120], [3.0, 1.0, 2.0], cfg)
    rows = np.array([r for _, mb in zip(range(400), plans.microbatches()) for r in mb.rows])
    share = np.bincount(np.searchsorted(starts, rows, side="right") - 1, minlength=3) / len(rows)
    expected = np.array([3, 1, 2]) / 6
    sigma = np.sqrt(expected * (1 - expected) / len(rows))
    assert np.all(np.abs(share - expected) < 4 * sigma), (share, expected)
    # each store is walked through its own epochs: the small store repeats its 50 images in turn
    small = rows[(rows >= 300) & (rows < 350)][:100]
    assert sorted(small[:50].tolist()) == list(range(300, 350)) and sorted(small[50:].tolist()) == list(range(300, 350))
    again, _ = _mixture([300, 50, 120], [3.0, 1.0, 2.0], cfg)
    assert [p.microbatch for _, p in zip(range(60), again.steps(0))][40:] == [p.microbatch for p in
                                                                             _take(plans.steps(40), 20)]


def _take(it, n):
    return [x for _, x in zip(range(n), it)]


def test_one_store_keeps_the_order_it_had_before_mixtures():
    """A one-store run resumes on the exact order it was started with, from before store mixtures."""
    cfg = DataConfig(seq_len=64, seqs_per_batch=2, max_images_per_seq=8, shuffle_buffer=16)
    ok = np.ones(90, bool)
    ok[[3, 40]] = False
    grid = np.random.default_rng(0).integers(1, 5, size=(90, 2))
    plans = PlanStream.from_arrays(ok, grid, 10, cfg, registers=4, seed=3)
    old = stream_reference.microbatches(ok, grid, cfg, registers=4, seed=3, parts=[(0, 90, 10, 1.0)])
    assert _take(plans.microbatches(), 50) == _take(old, 50)


def test_store_urls_come_from_flags_and_weights_from_the_config():
    cfg = TrainConfig.model_validate({"data": {"stores": [{"url": "a", "weight": 3}, {"url": "b", "weight": 1}]}})
    assert [(s.url, s.weight) for s in with_stores(cfg, ["x", "y"]).data.stores] == [("x", 3.0), ("y", 1.0)]
    assert [(s.url, s.weight) for s in with_stores(TrainConfig(), "x").data.stores] == [("x", 1.0)]
    with pytest.raises(ValueError, match="2 --store given"):
        with_stores(TrainConfig.model_validate({"data": {"stores": [{"url": "a"}]}}), ["x", "y"])
    with pytest.raises(ValueError, match="no store to train on"):
        with_stores(TrainConfig(), None)
    with pytest.raises(ValueError, match="twice"):
        with_stores(TrainConfig(), ["x", "x"])
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"data": {"stores": [{"url": "a", "weight": 0}]}})


def test_a_mixture_run_draws_both_stores_and_resumes_exactly_after_sigkill(train_store, stage2_store, tmp_path):
    args = ["--store", stage2_store, "--store", train_store, "--steps", "8", "--set", "run.checkpoint_every=3"]
    _train(tmp_path / "whole", *args)
    whole = _records(tmp_path / "whole")
    drawn = np.array([[r["data/store0_images"], r["data/store1_images"]] for r in whole])
    assert drawn.sum(0).min() > 0 and all(r["loss"] > 0 for r in whole)
    recorded = json.loads((tmp_path / "whole" / "store.json").read_text())
    assert [s["url"] for s in recorded["stores"]] == [stage2_store, train_store]

    run = tmp_path / "killed"
    proc = subprocess.Popen([*PIPELINE, "train", "--out", str(run), *BASE, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline, metrics = time.time() + 300, run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and any(
            json.loads(ln)["step"] >= 4 for ln in metrics.read_text().splitlines() if ln.endswith("}"))):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run / "checkpoints").name == "step_00000003"
    _train(run, *args)
    assert [(r["step"], r["loss"], r["data/store0_images"]) for r in _records(run)] == \
        [(r["step"], r["loss"], r["data/store0_images"]) for r in whole]
    # the other store order is another run: refused, as another store is
    proc = _train(run, "--store", train_store, "--store", stage2_store, "--steps", "9", check=False)
    assert proc.returncode == 2 and "another fingerprint" in " ".join(proc.stderr.split())


def test_stage_two_starts_from_stage_one_weights_and_records_it(train_store, stage2_store, tmp_path):
    from safetensors.torch import load_file

    from train.data import StoreBatches
    from train.model import build_model
    from train.rundir import read_run
    from train.trainer import batch_to_device, compute_terms
    from train.checkpoint import load_checkpoint
    from train.losses import arkd_loss
    from storage.store import FeatureStore

    stage1 = tmp_path / "stage1"
    _train(stage1, "--store", train_store, "--steps", "3")
    stage2 = tmp_path / "stage2"
    _train(stage2, "--store", stage2_store, "--store", train_store, "--init-from", str(stage1), "--steps", "1",
           "--set", "data.seq_len=160", "--set", "loss.arkd=0.5")
    record = json.loads((stage2 / "store.json").read_text())
    assert record["init_from"]["run"] == str(stage1.resolve()) and record["init_from"]["step"] == 3
    # independent of the trainer's loading: the stage-1 checkpoint's loss on stage 2's first microbatch,
    # computed here, is the first loss stage 2 logged (a fresh init would give another)
    cfg, _ = read_run(stage2)
    ds = StoreBatches([stage2_store, train_store], ["dino"], cfg.data, patch=16, registers=cfg.model.registers, seed=0)
    mix = ds.reader
    plan = next(PlanStream(mix.indexes, cfg.data, registers=cfg.model.registers, seed=0).steps(0))
    torch.manual_seed(123)
    model = build_model(cfg, FeatureStore.open(stage2_store), ["dino"])
    load_checkpoint(latest_checkpoint(stage1 / "checkpoints"), model)
    batch = batch_to_device(ds[plan], torch.device("cpu"))
    with torch.no_grad():
        terms, _ = compute_terms(model.eval(), batch, cfg)
        preds, _ = model(batch["pixels"], batch["layout"])  # ARKD from the model's own outputs, not the trainer's terms
        target = model.spaces["dino"]["summary"].normalize(batch["targets"]["dino"]["summary"])
        arkd = 0.5 * float(arkd_loss(preds["dino"]["summary"], target))
    first = _records(stage2)[0]
    assert first["loss"] == pytest.approx(float(sum(terms.values())), rel=1e-5)
    assert arkd > 0 and first["loss/dino/arkd"] == pytest.approx(arkd, rel=1e-4)
    # stage 2 trains its own optimizer from the loaded weights: the PHI-S spaces stay stage 1's
    w1 = load_file(str(latest_checkpoint(stage1 / "checkpoints") / "model.safetensors"))
    w2 = load_file(str(latest_checkpoint(stage2 / "checkpoints") / "model.safetensors"))
    assert torch.equal(w1["spaces.dino.patches.whiten"], w2["spaces.dino.patches.whiten"])
    own = build_model(cfg, FeatureStore.open(stage2_store), ["dino"]).state_dict()["spaces.dino.patches.whiten"]
    assert not torch.allclose(own, w2["spaces.dino.patches.whiten"])  # the stage-2 store's own statistics differ
    assert not torch.equal(w1["student.patch_embed.weight"], w2["student.patch_embed.weight"])


def test_init_from_and_mixtures_refuse_other_teachers_or_students(train_store, stage2_store, tmp_path):
    stage1 = tmp_path / "stage1"
    _train(stage1, "--store", train_store, "--steps", "1")
    other = tmp_path / "other"
    shutil.copytree(stage2_store, other)
    g = zarr.open_group(str(other / "teachers" / "dino"), mode="r+")
    fp = dict(g.attrs["fingerprint"])
    fp["weights"] = {**fp["weights"], "sha256": "0" * 64}
    g.attrs["fingerprint"] = fp
    g.attrs["fingerprint_digest"] = "f" * 64
    from config import load_cli_config
    from train.rundir import prepare_run

    def refused(run, stores, *sets, init=stage1):
        with pytest.raises(ValueError) as exc:  # from the config checks or from prepare_run
            cfg = load_cli_config(TrainConfig, None, {"model.preset": "tiny", "model.init_from": init and str(init)},
                                  ['data.teachers=["dino"]', *sets])
            prepare_run(tmp_path / run, with_stores(cfg, stores))
        assert not (tmp_path / run).exists()
        return " ".join(str(exc.value).split())

    assert "teacher 'dino' is not the same teacher" in refused("a", [str(other)])
    assert "model.depth" in refused("b", [stage2_store], "model.depth=3")
    assert "not a run directory" in refused("c", [stage2_store], init=tmp_path / "nowhere")
    assert "teacher 'dino' is not the one of" in refused("d", [stage2_store, str(other)], init=None)
    assert "both set" in refused("e", [stage2_store], "model.moe.upcycle_from=x")
    assert "loss.arkd names teacher(s) nope" in refused("f", [stage2_store], "loss.arkd.nope=1.0", init=None)
    assert "names a store twice" in refused("g", [stage2_store, stage2_store + "/"], init=None)
    # through the command: one line, exit code 2, nothing written
    proc = _train(tmp_path / "refused", "--store", str(other), "--init-from", str(stage1), "--steps", "1", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "is not the same teacher" in proc.stderr and not (tmp_path / "refused").exists()

    # evaluation takes the same view: a teacher cached at another size is the same teacher, another is refused
    from eval.evaluate import EvalError, evaluate_run

    result = evaluate_run(stage1, stage2_store, ["knn"], bank=stage2_store, device="cpu")
    assert result["knn"]["query_images"] > 0 and set(result["relational_error"]) == {"dino"}
    with pytest.raises(EvalError, match="weights.sha256"):
        evaluate_run(stage1, str(other), ["knn"], device="cpu")
    # ... and one stored with another codec is the same teacher too (the precision on disk differs, not the space)
    recoded = tmp_path / "recoded"
    shutil.copytree(stage2_store, recoded)
    g = zarr.open_group(str(recoded / "teachers" / "dino"), mode="r+")
    g.attrs["fingerprint"] = {**g.attrs["fingerprint"], "dtype": "int8"}
    g.attrs["fingerprint_digest"] = "e" * 64
    assert evaluate_run(stage1, str(recoded), ["knn"], bank=stage2_store, device="cpu")["knn"]["query_images"] > 0
