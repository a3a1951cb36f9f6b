"""`pipeline sweep`: the grid and named runs it expands to, each run's config equal to base + overrides built
directly, a sweep killed inside a checkpoint resumed to the uninterrupted sweep's numbers with finished runs
untouched, the same runs as Ray tasks, and bad sweeps refused in one line."""

from __future__ import annotations

import json

import pytest

from cli_helpers import assert_ok, error_line, run_pipeline

SWEEP = """
tasks = ["knn"]
[base_set]
"model.preset" = "tiny"
"data.seq_len" = 160
"data.seqs_per_batch" = 2
"data.workers" = 0
"optim.warmup_steps" = 1
"run.steps" = 3
"run.threads" = 1
"run.checkpoint_every" = 1
[grid]
"optim.lr" = [0.001, 0.003]
[[runs]]
name = "arkd"
set = {"loss.arkd" = 1.0}
"""


def _records(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_grid_and_the_named_runs_expand_and_bad_sweeps_are_refused(tmp_path):
    from config import ConfigError
    from pipeline.sweep import SweepConfig, expand

    cfg = SweepConfig.model_validate({"grid": {"optim.lr": [1e-3, 3e-3], "model.moe.layers": ["none", "odd"]},
                                      "runs": [{"name": "tas", "set": {"loss": {"tas": 0.5}}}]})
    runs = expand(cfg)
    assert [r.name for r in runs] == ["optim.lr=0.001,model.moe.layers=none", "optim.lr=0.001,model.moe.layers=odd",
                                      "optim.lr=0.003,model.moe.layers=none", "optim.lr=0.003,model.moe.layers=odd",
                                      "tas"]
    assert runs[-1].overrides == {"loss.tas": 0.5} and runs[1].overrides == {"optim.lr": 1e-3, "model.moe.layers": "odd"}
    for bad, match in [({}, "no runs"), ({"runs": [{"name": "a"}, {"name": "a"}]}, "twice"),
                       ({"runs": [{"name": "compare"}]}, "plain folder names")]:
        with pytest.raises(ConfigError, match=match):
            expand(SweepConfig.model_validate(bad))


def test_a_sweep_trains_evaluates_compares_and_resumes_after_a_kill(train_store, tmp_path):
    from config import ConfigError
    from pipeline.sweep import run_sweep
    from train.config import TrainConfig, with_stores
    from train.rundir import read_run

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP)
    whole = tmp_path / "whole"
    run_sweep(sweep, train_store, whole, device="cpu")  # in-process: the code the command runs
    names = ["optim.lr=0.001", "optim.lr=0.003", "arkd"]
    base = {"model": {"preset": "tiny"}, "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
            "optim": {"warmup_steps": 1}, "run": {"steps": 3, "threads": 1, "checkpoint_every": 1}}
    for name, extra in zip(names, ({"optim": {"warmup_steps": 1, "lr": 1e-3}}, {"optim": {"warmup_steps": 1, "lr": 3e-3}},
                                   {"loss": {"arkd": 1.0}})):
        cfg, _ = read_run(whole / name)  # the run's config is base + its overrides, built here directly
        assert cfg == with_stores(TrainConfig.model_validate({**base, **extra}), train_store), name
        assert "knn" in json.loads((whole / name / "eval.json").read_text())
    table = json.loads((whole / "compare" / "compare.json").read_text())
    assert [r["run"].split("/")[-1] for r in table["runs"]] == names
    assert set(table["config_keys"]) == {"optim.lr", "loss.arkd"}
    # killed inside the second checkpoint of the second run, then the same command again
    broken = tmp_path / "broken"
    killed = run_pipeline("sweep", sweep, "--store", train_store, "--out", broken,
                          env={"AMOE_FAULT": "checkpoint.rename@5"}, new_session=True)
    assert killed.returncode != 0 and (broken / names[0] / "eval.json").exists()
    first = {p: p.stat().st_mtime_ns for p in (broken / names[0]).rglob("*") if p.is_file()}
    again = assert_ok(run_pipeline("sweep", sweep, "--store", train_store, "--out", broken))
    assert f"{names[0]}: skipped (finished)" in again.stdout and f"{names[1]}: trained from step 1" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in first} == first  # the finished run was not touched
    for name in names:
        assert [r["loss"] for r in _records(broken / name)] == [r["loss"] for r in _records(whole / name)], name
    # refused before any work: a config key that does not exist (one line from the command), a foreign folder
    bad = tmp_path / "bad.toml"
    bad.write_text(SWEEP.replace('"optim.lr"', '"optim.learning_rate"'))
    error_line(run_pipeline("sweep", bad, "--store", train_store, "--out", tmp_path / "b"), "optim.learning_rate")
    assert not (tmp_path / "b").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to write"):
        run_sweep(sweep, train_store, tmp_path / "mine", device="cpu")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="no runs"):
        bad.write_text('tasks = ["knn"]\n')
        run_sweep(bad, train_store, tmp_path / "c", device="cpu")


def test_the_runs_as_ray_tasks_equal_the_sequential_sweep(train_store, tmp_path):
    from pipeline.sweep import run_sweep

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(SWEEP.replace('"run.steps" = 3', '"run.steps" = 2').replace(
        '[[runs]]\nname = "arkd"\nset = {"loss.arkd" = 1.0}\n', ""))
    seq, ray = tmp_path / "seq", tmp_path / "ray"
    run_sweep(sweep, train_store, seq, device="cpu")
    done = run_sweep(sweep, train_store, ray, ray_address="local", device="cpu")
    assert set(done) == {"optim.lr=0.001", "optim.lr=0.003"}
    for name in done:
        assert [r["loss"] for r in _records(ray / name)] == [r["loss"] for r in _records(seq / name)]
        assert json.loads((ray / name / "eval.json").read_text())["knn"] == json.loads(
            (seq / name / "eval.json").read_text())["knn"]


def test_the_demo_ablation_sweep_is_a_valid_sweep_and_its_random_pool_is_seeded(train_store, tmp_path):
    """`pipeline demo --ablations` writes a sweep file: every run's config is valid against a store, the random
    pool run trains on its own store, and the pool is a seeded sample of the curated pool's size."""
    import tomllib

    from config import dump_toml
    from pipeline.commands.demo import ABLATION_RUNS, ABLATION_STEPS, DEMO_TRAIN, _random_pool
    from pipeline.sweep import SweepConfig, _dotted, _train_config, expand

    base = {f"{s}.{k}": v for s, fields in DEMO_TRAIN.items() for k, v in fields.items()}
    runs = [{**r, **({"store": "elsewhere"} if r.get("store") == "random" else {})} for r in ABLATION_RUNS]
    cfg = SweepConfig.model_validate({"base_set": {**base, "run.steps": ABLATION_STEPS}, "runs": runs})
    again = SweepConfig.model_validate(tomllib.loads(dump_toml(cfg)))  # the file the demo writes reads back
    assert _dotted(again.base_set) == _dotted(cfg.base_set) and expand(again) == expand(cfg)
    expanded = expand(again)
    assert [r.name for r in expanded] == ["dense", "moe", "dense_arkd", "dense_random_pool"]
    assert [r.store for r in expanded] == [None, None, None, "elsewhere"]
    configs = {r.name: _train_config(again, None, r, train_store) for r in expanded}
    assert configs["moe"].model.moe_layer_ids() == [1, 3] and configs["dense"].model.moe_layer_ids() == []
    assert configs["dense_arkd"].loss.arkd == 1.0 and all(c.run.steps == ABLATION_STEPS for c in configs.values())
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"/img/{i}.png\n" for i in range(50)))
    picked = _random_pool(listing, 20, tmp_path / "pool.txt").read_text().split()
    assert len(set(picked)) == 20 and picked == _random_pool(listing, 20, tmp_path / "again.txt").read_text().split()
