"""`pipeline compare`: the differing config keys, every eval.json scalar and the final losses per run, read back
against the runs' own files; runs evaluated on different stores and foreign output folders are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import error_line, run_pipeline


def _run(store: str, run, lr: float, seed: int = 0):
    from train.config import TrainConfig, with_stores
    from train.rundir import prepare_run
    from train.trainer import train

    cfg = with_stores(TrainConfig.model_validate({
        "model": {"preset": "tiny"}, "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
        "optim": {"warmup_steps": 1, "lr": lr}, "run": {"steps": 2, "threads": 1, "seed": seed}}), store)
    prepare_run(run, cfg)
    train(cfg, None, run)


def test_compare_tabulates_config_differences_eval_metrics_and_final_losses(train_store, tmp_path):
    from eval.compare import write_comparison
    from eval.evaluate import evaluate_run

    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for run, lr, seed in zip(runs, (1e-3, 3e-3, 1e-3), (0, 0, 1)):
        _run(train_store, run, lr, seed)
    for run in runs[:2]:
        evaluate_run(run, train_store, ["knn"], device="cpu")
    out = tmp_path / "cmp"
    write_comparison(runs, out)  # in-process; the command itself is run below, where it refuses
    result = json.loads((out / "compare.json").read_text())
    assert result["config_keys"] == ["optim.lr", "run.seed"] and result["eval_store"] == train_store
    for row, run in zip(result["runs"], runs):
        records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert row["final"]["loss"] == pytest.approx(records[-1]["loss"])
        saved = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
        for name, value in (saved.get("knn", {}).get("top1") or {}).items():
            assert row["eval"][f"knn.top1.{name}"] == pytest.approx(value)
        assert bool(row["eval"]) == (run != runs[2])  # the unevaluated run has only its losses
    table = (out / "compare.md").read_text()
    assert "| a | 0.001 | 0 |" in table and "knn.top1.student/cls" in table and "| c |" in table
    assert (out / "compare.png").stat().st_size > 2000
    write_comparison(runs[:2], out)  # an earlier comparison in the folder is replaced
    # evaluated on another store (a copy at another path): refused, naming both
    other = str(tmp_path / "copy")
    shutil.copytree(train_store, other)
    evaluate_run(runs[2], other, ["knn"], bank=train_store, device="cpu")
    line = error_line(run_pipeline("compare", *runs, "--out", tmp_path / "cmp2"), "different eval stores", other,
                      train_store)
    assert str(runs[2]) in line and not (tmp_path / "cmp2").exists()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a comparison's"):
        write_comparison(runs[:2], out)
    with pytest.raises(ValueError, match="two or more"):
        write_comparison(runs[:1], tmp_path / "one")
