"""The `pipeline` command. Subcommands are registered here; their bodies live in pipeline/commands/."""

from __future__ import annotations

import os

import typer

from .commands import cache as cache_cmd
from .commands import compare as compare_cmd
from .commands import curate as curate_cmd
from .commands import data as data_cmd
from .commands import demo as demo_cmd
from .commands import eval as eval_cmd
from .commands import inspect as inspect_cmd
from .commands import report as report_cmd
from .commands import sweep as sweep_cmd
from .commands import train as train_cmd

app = typer.Typer(
    name="pipeline",
    help="Agglomerative MoE vision models: curate a pool, cache teachers into a Zarr feature store, train and evaluate students from it, run the demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cmd.app, name="data", help="Write the bundled real image sets (demo, long-tailed pool).")
app.command("curate", no_args_is_help=True)(curate_cmd.curate)
app.command("cache-teachers", no_args_is_help=True)(cache_cmd.cache_teachers)
app.command("inspect", no_args_is_help=True)(inspect_cmd.inspect_store)
app.command("train", no_args_is_help=True)(train_cmd.train)
app.command("eval", no_args_is_help=True)(eval_cmd.evaluate)
app.command("report", no_args_is_help=True)(report_cmd.report)
app.command("compare", no_args_is_help=True)(compare_cmd.compare)
app.command("sweep", no_args_is_help=True)(sweep_cmd.sweep)
app.command("demo")(demo_cmd.demo)


def main() -> None:
    if os.environ.get("AMOE_FAULT"):  # fault injection (storage.faults) kills this command's process group
        os.environ["AMOE_FAULT_PGID"] = str(os.getpgrp())
    app()


if __name__ == "__main__":
    main()
