"""`pipeline train`: a student from a store; the run directory records config and store fingerprint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.markup import escape

from config import load_cli_config

from ..console import console, errors, progress, user_errors


def train(
    out: Annotated[Path, typer.Option("--out", help="run directory (created; an existing one is resumed)")],
    store: Annotated[Optional[list[str]], typer.Option(
        "--store", help="feature store written by cache-teachers; repeat it to mix several (weights: the "
                        "data.stores tables of --config, else equal)")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with TrainConfig sections")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="student preset: tiny, demo, amoe-dense, amoe, m2ot-b")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="optimizer steps")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        "--init-from", help="start from another run's latest weights with a new optimizer (AMoE stage 2 from "
                            "stage 1): same teachers (the image policy may differ), same student shape")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override any field: section.key=value")] = None,
) -> None:
    """Distil the store's teachers into a student; resumes from the run's last checkpoint if there is one."""
    from train.config import TrainConfig, with_stores
    from train.distributed import barrier, init_distributed
    from train.rundir import prepare_run, run_lock

    with user_errors(str(out)):
        cfg = load_cli_config(TrainConfig, config, {"model.preset": model, "run.steps": steps,
                                                    "model.init_from": str(init_from) if init_from else None}, set_)
        cfg = with_stores(cfg, store)
        rank, world = init_distributed(cfg.run.device)
        with run_lock(out) if rank == 0 else contextlib.nullcontext():  # one run per directory at a time
            # rank 0 decides (fingerprints, where an --init-from run starts) and writes store.json; the
            # other ranks then read that record, so every rank starts from the same checkpoint
            meta = prepare_run(out, cfg) if rank == 0 else None
            barrier()
            if rank != 0:
                meta = prepare_run(out, cfg, write=False)
            result = _train(cfg, out, meta, rank)
    if rank == 0:
        resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
        started = (f" from {meta['init_from']['run']} step {meta['init_from']['step']}"
                   if "init_from" in meta and not result.resumed_from else "")
        console.print(f"trained {result.steps} steps{resumed}{started} in {result.seconds:.1f} s: final loss "
                      f"{result.last_loss:.4f}, {result.tokens_per_s:.0f} tokens/s, data wait "
                      f"{100 * result.data_wait:.1f}% of step time -> {out}")


def _train(cfg, out: Path, meta: dict, rank: int):
    """The trainer with a progress bar on rank 0; a diverged run stops with its own one-line message."""
    from train.trainer import TrainingDiverged
    from train.trainer import train as run_training

    with progress(disable=rank != 0) as bar:
        task = bar.add_task("train", total=cfg.run.steps, info="")

        def on_step(r: dict) -> None:
            bar.update(task, completed=r["step"] + 1,
                       info=f"loss {r['loss']:.4f}  {r['tokens_per_s']:.0f} tok/s  data-wait {100 * r['data_wait']:.1f}%")

        try:
            return run_training(cfg, None, out, fingerprint_meta={"store_fingerprint": meta["fingerprint"]},
                                on_step=on_step, init_checkpoint=(meta.get("init_from") or {}).get("checkpoint"))
        except TrainingDiverged as exc:
            errors.print(f"[red]stopped:[/red] {escape(' '.join(str(exc).split()))}")
            raise typer.Exit(2) from None
