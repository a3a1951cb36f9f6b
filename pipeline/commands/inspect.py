"""`pipeline inspect STORE`: one screen about a feature store."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ..console import console


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def inspect_store(
    store: Annotated[str, typer.Argument(help="store directory or fsspec URL")],
    as_json: Annotated[bool, typer.Option("--json", help="print the facts as JSON")] = False,
) -> None:
    """Images, failures, teachers, dims, bytes on disk per image and per token, compression, PHI-S."""
    from storage.inspect import describe_store
    from storage.store import StoreError

    try:
        facts = describe_store(store)
    except StoreError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(facts, indent=2, default=str))
        return
    pol = facts["image_policy"]
    console.print(f"[bold]{facts['url']}[/bold]  (format v{facts['format_version']}, {facts['created_by']})")
    console.print(f"image policy: patch {pol['patch_size']}, tokens [{pol['min_tokens']}, {pol['max_tokens']}], {pol['format']}")
    im = facts["images"]
    if im is None:
        console.print("[yellow]images not complete (an interrupted cache-teachers: rerun it to finish)[/yellow]")
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in im["failure_reasons"].items())
    tpi = im["tokens_per_image"]
    console.print(
        f"images: {im['count']} ({im['failed']} failed{': ' + reasons if reasons else ''}); tokens/image "
        f"min {tpi['min']} mean {tpi['mean']:.1f} max {tpi['max']}, total {tpi['total']}; "
        f"pixels {_mb(im['pixel_bytes_on_disk'])} ({_mb(im['pixel_bytes_per_image'])}/image); labels: {'yes' if im['labels'] else 'no'}"
    )
    table = Table("teacher", "dims (summary/patch)", "regs", "dtype", "units", "targets on disk", "per image",
                  "per token", "compression", "PHI-S files", "PHI-S summary / patches")
    for name, t in facts["teachers"].items():
        phis = " / ".join(
            f"{p['method']} s={p['scale']:.3g} top={p['top_eigen_share']:.2f}" if p else "-" for p in t["phis"].values()
        )
        ratio = f"{t['compression_ratio']:.2f}x" if t["compression_ratio"] else "-"
        status = f"{t['units_committed']}/{t['units_total']}" + ("" if t["complete"] else " (incomplete)")
        table.add_row(
            name + (" (resampled)" if t["resampled"] else ""),
            f"{t['dims']['summary']}/{t['dims']['patches']}",
            str(t["num_registers"]), t["dtype"], status, _mb(t["bytes_on_disk"]),
            _mb(t["bytes_per_image"]), f"{t['bytes_per_token']:.0f} B", ratio, _mb(t["phis_bytes"]), phis,
        )
    console.print(table)
