"""The trainer on a real cached store: exact resume after SIGKILL, NaN stop, torchrun equivalence, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cli_helpers import error_line, run_pipeline
from train.checkpoint import latest_checkpoint
from train.config import OptimConfig, TrainConfig
from train.trainer import lr_at

PIPELINE = [sys.executable, "-m", "pipeline.cli"]
BASE = ["--model", "tiny", "--set", "data.seq_len=160", "--set", "data.seqs_per_batch=2", "--set", "data.workers=1",
        "--set", "run.log_every=1", "--set", "optim.warmup_steps=2", "--set", "run.threads=1",
        "--set", "data.flip=true", "--set", "data.crop=true"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(store: str, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_pipeline("train", "--store", store, "--out", out, *BASE, *extra)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_resume_after_sigkill_gives_the_same_loss_curve(train_store, tmp_path):
    steps = ["--steps", "9", "--set", "run.checkpoint_every=3"]
    _train(train_store, tmp_path / "whole", *steps)
    whole = _losses(tmp_path / "whole")
    assert [s for s, _ in whole] == list(range(9))

    run = tmp_path / "killed"
    proc = subprocess.Popen([*PIPELINE, "train", "--store", train_store, "--out", str(run), *BASE, *steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and any(
            json.loads(ln)["step"] >= 6 for ln in metrics.read_text().splitlines() if ln.endswith("}"))):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # past the step-6 checkpoint, with metrics logged beyond it
    proc.wait()
    assert latest_checkpoint(run / "checkpoints").name == "step_00000006"
    _train(train_store, run, *steps)
    assert _losses(run) == whole, "resumed run diverged from the uninterrupted one"


def test_non_finite_loss_stops_naming_step_and_term(train_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(train_store, store)
    summary = zarr.open_group(str(store), mode="r+")["teachers/dino/summary"]
    ok = zarr.open_group(str(store), mode="r")["images/ok"][:]
    rows = np.flatnonzero(ok)
    values = summary[:]
    values[rows[len(rows) // 2:]] = np.nan  # half the images: a step soon meets one
    summary[:] = values
    run = tmp_path / "run"
    proc = _train(str(store), run, "--steps", "20", "--set", "run.checkpoint_every=1", "--set", "loss.phis=false",
                  check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "non-finite loss" in text and "dino/summary" in text
    bad_step = int(text.split("stopped: step ")[1].split(":")[0])
    last = latest_checkpoint(run / "checkpoints")
    # the checkpoint after step k is trusted once step k's loss, the first computed with its weights, is
    # sane: the one saved just before the NaN never was, so LATEST is the one before it
    if bad_step <= 1:
        assert last is None
    else:
        assert last is not None and last.name == f"step_{bad_step - 1:08d}"
        from safetensors.torch import load_file
        assert all(torch.isfinite(v).all() for v in load_file(str(last / "model.safetensors")).values())


def test_torchrun_two_processes_equal_one_process_with_accumulation(train_store, tmp_path):
    common = ["--steps", "3", "--set", "run.checkpoint_every=3", "--set", "data.workers=0"]
    _train(train_store, tmp_path / "single", *common, "--set", "optim.accumulation=2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "pipeline.cli", "train", "--store", train_store, "--out", str(tmp_path / "ddp"), *BASE, *common]
    proc = subprocess.run(torchrun, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert [s for s, _ in single] == [s for s, _ in ddp] == [0, 1, 2]
    np.testing.assert_allclose([l for _, l in ddp], [l for _, l in single], rtol=1e-5)
    from safetensors.torch import load_file
    a = load_file(str(latest_checkpoint(tmp_path / "single" / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ddp" / "checkpoints") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_another_store_fingerprint_or_config_is_refused(train_store, tmp_path):
    run = tmp_path / "run"
    _train(train_store, run, "--steps", "1")
    other = tmp_path / "other"
    shutil.copytree(train_store, other)
    g = zarr.open_group(str(other / "teachers" / "dino"), mode="r+")
    g.attrs["fingerprint_digest"] = "0" * 64
    proc = _train(str(other), run, "--steps", "2", check=False)
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "another fingerprint" in text and "teachers.dino" in text
    proc = _train(train_store, run, "--steps", "2", "--set", "model.depth=3", check=False)
    assert proc.returncode == 2 and "model.depth" in proc.stderr
    _train(train_store, run, "--steps", "2")  # more steps on the same store and config: resumes
    assert [s for s, _ in _losses(run)] == [0, 1]
    # a run recorded by an older version, before run.compile existed, resumes with that field's default
    config = run / "config.toml"
    config.write_text("".join(ln for ln in config.read_text().splitlines(True) if not ln.startswith("compile")))
    _train(train_store, run, "--steps", "3")
    assert [s for s, _ in _losses(run)] == [0, 1, 2]
    config.write_text(config.read_text().replace("[run]", "[run]\nno_such_field = 1"))
    error_line(_train(train_store, run, "--steps", "4", check=False), "config.toml", "no longer validates")


def test_bad_config_is_a_clear_error(train_store, tmp_path):
    proc = _train(train_store, tmp_path / "r", "--steps", "1", "--set", "model.nope=1", check=False)
    assert proc.returncode != 0 and "model.nope" in " ".join((proc.stdout + proc.stderr).split())
    proc = _train(train_store, tmp_path / "r2", "--steps", "1", "--set", "data.seq_len=8", check=False)
    assert proc.returncode == 2 and "raise data.seq_len" in " ".join(proc.stderr.split())


def test_lr_schedule_warmup_then_decay():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == pytest.approx(1.0) and lr_at(14, cfg, 14) == pytest.approx(0.1)
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)
    lin = cfg.model_copy(update={"schedule": "linear"})
    assert lr_at(9, lin, 14) == pytest.approx(0.55) and lr_at(6, lin, 14) == pytest.approx(1 - 0.9 * 0.2)


def test_presets_resolve_and_fields_override():
    cfg = TrainConfig.model_validate({"model": {"preset": "amoe", "depth": 2}})
    assert cfg.model.depth == 2 and cfg.model.moe.experts == 28 and cfg.model.head_dim == 128
    with pytest.raises(ValueError, match="unknown model preset"):
        TrainConfig.model_validate({"model": {"preset": "nope"}})


def test_moe_student_trains_from_the_same_store_and_upcycles_from_dense(train_store, tmp_path):
    """Only the config changes: routing losses and per-layer metrics appear in the logs."""
    moe = ["--set", "model.moe.layers=odd", "--set", "model.moe.experts=4", "--set", "model.moe.top_k=2",
           "--set", "model.moe.backend=loop"]
    _train(train_store, tmp_path / "dense", "--steps", "2")
    _train(train_store, tmp_path / "moe", "--steps", "2", *moe,
           "--set", f"model.moe.upcycle_from={tmp_path / 'dense'}")
    records = [json.loads(ln) for ln in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/router" in records[0] and "moe/0/expert_usage_entropy" in records[0]
    assert 0 < records[0]["moe/0/token_routing_entropy"] <= 1.0 + 1e-6
    proc = _train(train_store, tmp_path / "moe2", "--steps", "1", *moe,
                  "--set", f"model.moe.upcycle_from={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "no checkpoint found" in " ".join(proc.stderr.split())


def test_eval_writes_knn_for_student_heads_and_teachers_and_report(train_store, tmp_path):
    run = tmp_path / "run"
    _train(train_store, run, "--steps", "3")
    proc = run_pipeline("eval", run, "--store", train_store, "--tasks", "knn", "--k", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ev = json.loads((run / "eval.json").read_text())
    top1 = ev["knn"]["top1"]
    assert set(top1) == {"student/cls", "student/dino", "student/siglip", "teacher/dino", "teacher/siglip"}
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    assert ev["knn"]["query_images"] == ev["knn"]["bank_images"] == 40 and ev["knn"]["classes"] == 10
    # the queries are the bank: no image votes for itself (tests/train/test_values.py checks the values)
    assert ev["knn"]["self_excluded"] is True
    assert {"dino/summary", "dino/patches", "dino/registers", "siglip/summary", "siglip/patches"} <= set(ev["cosine"])
    assert set(ev["relational_error"]) == {"dino", "siglip"} and all(0 < v < 2 for v in ev["relational_error"].values())
    proc = run_pipeline("report", run)
    assert proc.returncode == 0 and (run / "loss.png").stat().st_size > 1000
    text = (run / "report.md").read_text()
    assert "kNN top-1" in text and "student head siglip" in text and "![loss](loss.png)" in text
    bad = run_pipeline("eval", run, "--store", train_store, "--tasks", "knn,depth")
    assert bad.returncode == 2 and "unknown task(s) ['depth']" in " ".join(bad.stderr.split())
    none = run_pipeline("eval", tmp_path, "--store", train_store)
    assert none.returncode == 2 and "not a run directory" in " ".join(none.stderr.split())


def test_loss_curve_does_not_depend_on_the_number_of_loader_workers(train_store, tmp_path):
    from train.trainer import train

    curves = []
    for workers in (0, 2):
        cfg = TrainConfig.model_validate({
            "model": {"preset": "tiny"}, "run": {"steps": 3, "log_every": 1, "threads": 1},
            "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": workers, "flip": True, "crop": True},
        })
        result = train(cfg, train_store, tmp_path / f"w{workers}")
        curves.append([r["loss"] for r in result.history])
    assert curves[0] == curves[1]


# ------------------------------------------------------------------ nothing lost, nothing silently wrong
def test_a_compiled_student_trains_like_the_eager_one(train_store, tmp_path):
    """``run.compile``: the whole student (MoE layers on the Triton operators included) traced by
    torch.compile gives the eager loss curve, and its checkpoint loads into an eager model."""
    from train.trainer import train

    curves = {}
    for compiled in (False, True):
        cfg = TrainConfig.model_validate({
            "model": {"preset": "tiny", "moe": {"layers": "odd", "experts": 4, "top_k": 2, "backend": "torch"}},
            "run": {"steps": 2, "log_every": 1, "threads": 1, "compile": compiled, "compile_backend": "aot_eager"},
            "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
        })
        result = train(cfg, train_store, tmp_path / f"compiled_{compiled}")
        curves[compiled] = [r["loss"] for r in result.history]
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    from safetensors.torch import load_file

    compiled = load_file(latest_checkpoint(tmp_path / "compiled_True" / "checkpoints") / "model.safetensors")
    eager = load_file(latest_checkpoint(tmp_path / "compiled_False" / "checkpoints") / "model.safetensors")
    assert compiled.keys() == eager.keys()  # same names: resumable, upcyclable, evaluable eagerly


def test_a_diverging_run_never_leaves_latest_on_exploded_weights(train_store, tmp_path):
    """lr=30: step 0's update already ruins the weights (|w| ~ 1e4 while the loss it reports is still fine);
    the next loss explodes, then turns NaN. No checkpoint ever gave a sane loss, so none is LATEST."""
    run = tmp_path / "run"
    proc = _train(train_store, run, "--steps", "30", "--set", "optim.lr=30", "--set", "optim.warmup_steps=0",
                  "--set", "run.checkpoint_every=1", check=False)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "stopped: step" in text and "LATEST now names no checkpoint" in text, text
    assert latest_checkpoint(run / "checkpoints") is None
    kept = sorted((run / "checkpoints").glob("step_*"))
    metas = [json.loads((p / "state.json").read_text()) for p in kept]
    assert kept and not any(m["trusted"] for m in metas)  # kept on disk, never trusted
    losses = dict(_losses(run))
    assert all(losses[m["step"]] > 10 * min(losses.values()) for m in metas if m["trusted"] is False)


def test_checkpoints_are_trusted_by_the_next_loss_and_pruning_keeps_the_newest_trusted(tmp_path):
    from train.checkpoint import fall_back_to_trusted, mark_trusted, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, model, opt, {"best_loss": 1.0}, keep=1)
        if step < 4:
            mark_trusted(root, step, trusted=step < 3)  # step 3's weights gave an exploding loss
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert latest_checkpoint(root).name == "step_00000004"  # unverified, the newest: a normal resume uses it
    assert fall_back_to_trusted(root).name == "step_00000002"
    assert latest_checkpoint(root).name == "step_00000002"


def test_an_overflowing_learning_rate_is_a_named_stop(train_store, tmp_path):
    proc = _train(train_store, tmp_path / "run", "--steps", "2", "--set", "optim.lr=1e39", "--set",
                  "optim.warmup_steps=0", check=False)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "stopped: step 0" in text and "overflow" in text and "Traceback" not in text, text
    proc = _train(train_store, tmp_path / "run2", "--steps", "2", "--set", "optim.lr=inf", check=False)
    error_line(proc, "optim.lr")


def test_a_store_that_is_not_a_store_is_one_line_in_train_and_eval(train_store, tmp_path):
    error_line(_train(str(tmp_path / "nothing"), tmp_path / "run", "--steps", "1", check=False), "no feature store",
               str(tmp_path / "nothing"))
    assert not (tmp_path / "run").exists()  # the refused run leaves no empty directory behind
    kept = tmp_path / "kept"
    kept.mkdir()
    error_line(_train(str(tmp_path / "nothing"), kept, "--steps", "1", check=False), "no feature store")
    assert kept.is_dir() and not any(kept.iterdir())  # a folder the user made is kept as it was
    run = tmp_path / "trained"
    _train(train_store, run, "--steps", "1")
    proc = run_pipeline("eval", run, "--store", tmp_path / "nothing")
    error_line(proc, "no feature store")


def test_eval_refuses_a_teacher_with_another_fingerprint(train_store, tmp_path):
    run = tmp_path / "run"
    _train(train_store, run, "--steps", "1")
    other = tmp_path / "other"
    shutil.copytree(train_store, other)
    g = zarr.open_group(str(other / "teachers" / "dino"), mode="r+")
    fp = dict(g.attrs["fingerprint"])
    fp["model_kwargs"] = {**fp["model_kwargs"], "embed_dim": 64}
    from storage.fingerprint import digest

    g.attrs.update({"fingerprint": fp, "fingerprint_digest": digest(fp)})
    proc = run_pipeline("eval", run, "--store", other)
    error_line(proc, "teacher 'dino'", "model_kwargs.embed_dim")
    assert not (run / "eval.json").exists()
    # the same teacher as an older version recorded it (no compute_dtype: float32) is the same teacher
    legacy = {k: v for k, v in g.attrs["fingerprint"].items() if k != "compute_dtype"}
    legacy["model_kwargs"] = zarr.open_group(train_store, mode="r")["teachers/dino"].attrs["fingerprint"]["model_kwargs"]
    g.attrs.update({"fingerprint": legacy, "fingerprint_digest": digest(legacy)})
    proc = run_pipeline("eval", run, "--store", other, "--tasks", "knn", "--k", "5")
    assert proc.returncode == 0, proc.stderr


def test_one_run_directory_holds_one_run_at_a_time(train_store, tmp_path):
    from storage.locks import WriterLock
    from storage.fsutil import filesystem

    run = tmp_path / "run"
    run.mkdir()
    with WriterLock(filesystem(str(run))[0], str(run / ".lock"), f"run directory {run}"):
        error_line(_train(train_store, run, "--steps", "1", check=False), f"run directory {run}",
                   "being written by another process")
    assert not (run / "metrics.jsonl").exists()
    _train(train_store, run, "--steps", "1")  # released: it runs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    error_line(_train(train_store, mine, "--steps", "1", check=False), "not a run directory")
    assert sorted(p.name for p in mine.iterdir() if p.name != ".lock") == ["notes.txt"]
